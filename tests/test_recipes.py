"""Every recipe under launch/configs/ resolves (``alpro train --config X --print-config``, in-process: no trainer
is started), and the paper recipes carry the values that matter from ALPRO.md (§2.4.1, §3, §5, §8): per-GPU
batch, learning rate, frames, text length, gradient accumulation and epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alpro.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if yaml.safe_load(p.read_text()).get("stage"))

# recipe: (stage, batch per GPU, lr, frames, max_text_len, grad_accum, epochs), from ALPRO.md §2.4.1 / §3.3 /
# §5.1 / §5.2 / §8 (`train_batch_size`, `learning_rate`, `num_frm`, `max_txt_len`, `gradient_accumulation_steps`,
# `num_train_epochs`).
PAPER = {
    "prompter_webvid_cc3m.yaml": ("prompter", 16, 1e-4, 4, 30, 2, 10),
    "pretrain_webvid_cc3m.yaml": ("pretrain", 16, 1e-4, 4, 30, 1, 10),
    "retrieval_msrvtt.yaml": ("retrieval", 8, 2.5e-5, 8, 40, 1, 5),
    "retrieval_didemo.yaml": ("retrieval", 12, 4e-5, 8, 50, 1, 10),
    "qa_msrvtt.yaml": ("qa", 12, 5e-5, 16, 40, 2, 10),
    "qa_msvd.yaml": ("qa", 12, 5e-5, 16, 40, 2, 15),
}


def resolve(recipe: Path, capsys) -> dict:
    """The config ``alpro train --config recipe --print-config`` prints, parsed back."""
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_recipe_resolves(recipe, capsys):
    cfg = resolve(recipe, capsys)
    assert cfg["stage"] == yaml.safe_load(recipe.read_text())["stage"]
    assert cfg["model"]["vision"]["num_frames"] == cfg["data"]["num_frames"]  # time embedding matches the clips
    assert cfg["data"]["frame_size"] == cfg["model"]["vision"]["image_size"]


def test_every_paper_recipe_is_checked():
    assert {p.name for p in RECIPES if p.parent == CONFIGS} == set(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_have_the_papers_values(name, capsys):
    stage, batch, lr, frames, text_len, accum, epochs = PAPER[name]
    cfg = resolve(CONFIGS / name, capsys)
    data, train = cfg["data"], cfg["train"]
    assert cfg["stage"] == stage
    assert (data["batch_size"], data["num_frames"], data["max_text_len"]) == (batch, frames, text_len)
    assert cfg["optim"]["lr"] == pytest.approx(lr, rel=1e-12)
    assert (train["grad_accum"], train["epochs"]) == (accum, epochs)
    assert data["frame_size"] == 224 and cfg["model"]["vision"]["num_frames"] == frames
