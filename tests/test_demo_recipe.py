"""The demo recipe (launch/configs/demo/*.yaml and the demo's entities step): configs that resolve, a frame the
encoder's patch grid covers, image crops that keep the captioned objects, PEM entities that are the corpus nouns."""

from __future__ import annotations

from pathlib import Path

import pytest

from alpro.corpus.entities import main as entities_main
from alpro.corpus.entities import read_entities
from alpro.corpus.synth import generate
from alpro.train.config import load_run_config

DEMO = Path(__file__).resolve().parents[1] / "launch" / "configs" / "demo"
NO_INIT = ["--init.weights", "null", "--init.prompter", "null", "--init.entities", "null"]


@pytest.mark.parametrize("stage", ["prompter", "pretrain", "qa"])
def test_demo_stage_configs_resolve_and_agree(stage):
    cfg = load_run_config(DEMO / f"{stage}.yaml", NO_INIT)
    assert cfg.stage == stage and cfg.model.vision.image_size == cfg.data.frame_size
    assert cfg.data.pem.patch_size == cfg.model.vision.patch_size
    # The shapes world's captions say "moves left": a flip of a video would make them lie.
    assert "HorizontalFlip" not in cfg.data.randaugment.ops
    # An image crop below ~0.8 of the picture cuts captioned objects out (the caption still names them).
    assert cfg.data.randaugment.image_min_scale >= 0.8
    # QA trains on the pre-trained video features as they are; the contrastive stages train the encoder.
    assert cfg.model.freeze_video_encoder is (stage == "qa")


def test_demo_entities_are_the_corpus_nouns(tmp_path):
    """The demo's entities step: every shape and background of the corpus, no verbs or directions."""
    generate(tmp_path / "corpus", num_clips=60, num_images=10, workers=1, progress=False)
    assert entities_main(["--entities", str(tmp_path / "corpus" / "entities.txt"),
                          "--out", str(tmp_path / "entities.txt")]) == 0
    words = set(read_entities(tmp_path / "entities.txt"))
    assert {"circle", "square", "triangle", "star", "cross", "heart"} <= words
    assert not words & {"moves", "left", "right", "stays", "grows", "spins"}
