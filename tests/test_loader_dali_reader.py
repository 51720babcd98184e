"""The full-DALI reader mode (``data.dali_reader: webdataset``) on the CPU, against VP9 shards of the real sharder:
batch contents, frame lists computed in the graph, agreement with PyAV, evaluation coverage across ranks, exact
resume through DALI checkpoints, bad clips, the H.264 refusal and a short run of the real trainer CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import REPO

from alpro.config import from_dict
from alpro.data import (
    CLIP_STD,
    DataConfig,
    build_answer_vocab,
    build_eval_loader,
    build_tokenizer,
    build_train_loader,
)
from alpro.data.dali_reader import DaliReaderSource
from alpro.data.pem import patch_mask
from alpro.data.plan import AUGMENT, FRAMES, choose_source, item_rng
from alpro.data.protocol import BatchSource
from alpro.data.sampling import sample_frames
from alpro.errors import AlproError

pytestmark = pytest.mark.dali

# Resize differences between DALI and swscale (and their YUV->RGB conversions), in 0..255 pixel levels: the
# tolerance of tests/test_loader_dali.py, measured there (mean ~6 at a 2x downscale of these 64x48 clips).
MEAN_LEVELS, MAX_LEVELS = 10.0, 140.0
KEYS = ["v000", "v001", "v002", "v003"]  # the shared VP9 set, in shard order


@pytest.fixture(scope="module")
def vp9(loader_shards) -> Path:
    return loader_shards["vp9"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(train_texts=["clip number shows a moving square caption two of a still image"])


def _cfg(path, **kw) -> DataConfig:
    base = {"train": {"video": str(path)}, "val": {"video": str(path)}, "frame_size": 32, "num_frames": 4,
            "batch_size": 2, "num_workers": 0, "decoder": "dali", "dali_reader": "webdataset",
            "pem": {"patch_size": 8}, "max_text_len": 16}
    for key, value in kw.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return from_dict(DataConfig, base)


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised videos in 0..255 pixel levels (per channel std)."""
    return (a - b).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1) * 255


def _corrupt(src: Path, dst: Path, key: str) -> Path:
    """A copy of a shard set whose clip ``key`` has its container header overwritten (same size, so the DALI
    index and the shard index stay valid): the sharder's output, then disk corruption."""
    shutil.copytree(src, dst)
    for idx in dst.glob("*.idx"):
        fields = [line.split() for line in idx.read_text().splitlines()[1:]]
        for row in fields:
            members = {row[i + 3]: int(row[i + 1]) for i in range(0, len(row), 4)}
            if f"{key}.mp4" in members:
                with open(idx.with_suffix(".tar"), "r+b") as f:
                    f.seek(members[f"{key}.mp4"])
                    f.write(b"\x07" * 64)
                return dst
    raise AssertionError(f"{key} not found in {src}")


def test_pretraining_batches_have_every_field(vp9, tok):
    loader = build_train_loader(_cfg(vp9), "pretrain", tok, 0, 1, seed=3)
    assert isinstance(loader.source, DaliReaderSource) and isinstance(loader.source, BatchSource)
    assert len(loader) == 2  # 4 clips // (2 x 1 rank)
    captions = {f"v00{i}": {f"clip number {i} shows a moving square", f"caption two of clip {i}"} for i in range(4)}
    batches = list(loader) + list(loader)  # two passes
    assert len(batches) == 4
    for batch in batches:
        assert batch.type == "video" and set(batch.keys) <= set(KEYS) and len(batch) == 2
        assert batch.video.shape == (2, 3, 4, 32, 32) and batch.video.dtype == torch.float32
        assert not torch.equal(batch.video[:, :, 0], batch.video[:, :, 3])  # a moving pattern, distinct frames
        assert all(text in captions[key] for key, text in zip(batch.keys, batch.texts))
        assert batch.input_ids.shape == batch.mlm_input_ids.shape == batch.mlm_labels.shape == (2, 16)
        selected = batch.mlm_labels != -100
        assert torch.equal(batch.mlm_input_ids[~selected], batch.input_ids[~selected])
        assert torch.equal(batch.pem_mask, patch_mask(batch.pem_box, 32, 32, 8))
        top, left, h, w = batch.pem_box[0].tolist()
        assert torch.equal(batch.crop_video[0, :, :, top : top + h, left : left + w],
                           batch.video[0, :, :, top : top + h, left : left + w])
        assert batch.valid is None and batch.all_texts is None
    metrics = loader.metrics()
    assert metrics["clips_per_s"] > 0 and metrics["skipped"] == 0 and metrics["decoded_per_delivered"] >= 1


def test_retrieval_and_qa_training_batches(vp9, tok):
    """One item per clip: a random caption (retrieval) or question (QA) each time the clip comes round."""
    shards = vp9
    vocab = build_answer_vocab(str(shards))
    for task in ("retrieval", "qa"):
        loader = build_train_loader(_cfg(shards), task, tok, 0, 1, seed=2, answer_vocab=vocab)
        for batch in list(loader) + list(loader):
            assert batch.video.shape == (2, 3, 4, 32, 32) and batch.pem_box is None and batch.mlm_labels is None
            for key, text in zip(batch.keys, batch.texts):
                i = int(key[1:])
                captions = {f"clip number {i} shows a moving square", f"caption two of clip {i}"}
                assert text in (captions if task == "retrieval" else {f"what color is thing {i} {q}" for q in (0, 1)})
            if task == "qa":
                assert batch.answers and all(vocab[a] == i for a, i in zip(batch.answers, batch.answer_ids.tolist()))
                assert batch.answer_types == ["color", "color"]


@pytest.mark.parametrize("strategy", ["rand", "headtail", "uniform", "uniform_legacy", "segment", "middle"])
def test_frame_lists_and_crops_computed_in_the_graph_are_the_plan_paths(vp9, tok, strategy):
    """The graph's python_function draws with sample_frames and ClipTransform.draw from the sample's seed: the
    deterministic samplers give the plan path's exact indices, the random ones its generator's draws."""
    loader = build_train_loader(_cfg(vp9, train={"sampling": strategy}), "pretrain", tok, 0, 1, seed=5)
    margin = loader.source.items.clip_tf.resize - 32
    for _ in range(4):
        sample = loader.source.stream.next()
        g = item_rng(5, 0, 0, sample.seed, -1, FRAMES)
        assert np.array_equal(sample.frames, sample_frames(strategy, sample.vlen, 4, g))
        if strategy in ("uniform", "uniform_legacy", "middle"):
            assert np.array_equal(sample.frames, sample_frames(strategy, sample.vlen, 4))
        top, left = loader.source.items.clip_tf.draw(item_rng(5, 0, 0, sample.seed, -1, AUGMENT)).crop
        assert sample.crop == pytest.approx((left / margin, top / margin))
        prepared = loader.source.items.prepare_members(sample.key, sample.members, 0, 0, sample.seed, -1, sample.vlen)
        assert np.array_equal(prepared.frames, sample.frames)  # what the consumer re-derives for text / PEM / ops


@pytest.mark.parametrize("task", ["retrieval", "pretrain"])
def test_evaluation_matches_the_pyav_path(vp9, tok, task):
    out = {}
    for decoder in ("pyav", "dali"):
        loader = build_eval_loader(_cfg(vp9, decoder=decoder), task, tok, 0, 1)
        out[decoder] = list(loader)
        assert loader.metrics()["skipped"] == 0
    assert len(out["pyav"]) == len(out["dali"]) == 2
    for a, b in zip(out["pyav"], out["dali"]):
        assert a.keys == b.keys and a.all_texts == b.all_texts and torch.equal(a.valid, b.valid)
        assert torch.equal(a.input_ids, b.input_ids)
        levels = _levels(a.video, b.video)
        assert levels.mean() < MEAN_LEVELS and levels.max() < MAX_LEVELS, (levels.mean(), levels.max())


@pytest.mark.parametrize("world,batch_size", [(2, 3), (3, 1)])
def test_ranks_cover_an_evaluation_split_exactly_once(vp9, tok, world, batch_size):
    seen, lengths = [], set()
    for rank in range(world):
        loader = build_eval_loader(_cfg(vp9, eval_batch_size=batch_size), "retrieval", tok, rank, world)
        batches = list(loader)
        assert len(batches) == len(loader)
        lengths.add(len(batches))
        for batch in batches:
            assert len(batch) == batch_size and batch.valid is not None
            assert all(key == "" for key, ok in zip(batch.keys, batch.valid.tolist()) if not ok)
            seen += [key for key, ok in zip(batch.keys, batch.valid.tolist()) if ok]
    assert seen == KEYS  # every clip once, in shard order across ranks
    assert len(lengths) == 1  # the same number of batches on every rank (collectives line up)


def _same(a, b) -> bool:
    return (a.keys == b.keys and a.texts == b.texts and torch.equal(a.video, b.video)
            and torch.equal(a.mlm_input_ids, b.mlm_input_ids) and torch.equal(a.pem_box, b.pem_box))


def test_a_corrupt_clip_is_replaced_and_dali_checkpoints_resume_exactly(vp9, tok, tmp_path):
    """Training: the bad clip is found by decoding its batch clip by clip and replaced by the stream's next
    sample (batches stay full). A state saved anywhere -- including in the middle of a reader batch, which the
    replacement causes -- restores to the uninterrupted sequence, keys and pixels."""
    shards = _corrupt(vp9, tmp_path / "bad", "v001")
    cfg = _cfg(shards)
    reference = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=9)
    batches, states = [], []

    def batch_stream(loader):
        while True:
            yield from loader

    for batch in batch_stream(reference):
        batches.append(batch)
        states.append(json.loads(json.dumps(reference.state_dict())))  # as the trainer stores it
        if len(batches) == 6:
            break
    assert all(len(b) == 2 and "v001" not in b.keys and "" not in b.keys for b in batches)
    metrics = reference.metrics()
    assert metrics["skipped/decode_error"] >= 1 and metrics["skipped/dali_batch_retries"] >= 1
    partial = next((i for i, s in enumerate(states[:-1]) if s["reader"]["consumed"] % 2), None)
    assert partial is not None  # a state in the middle of a reader batch, after the replacement
    for k in sorted({1, partial}):
        resumed = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=9)
        resumed.load_state_dict(states[k])
        rest = [b for _, b in zip(range(len(batches) - k - 1), batch_stream(resumed))]
        assert len(rest) == len(batches) - k - 1 and all(_same(a, b) for a, b in zip(rest, batches[k + 1 :]))
    with pytest.raises(AlproError, match="same world size"):
        build_train_loader(cfg, "pretrain", tok, 0, 2, seed=9).load_state_dict(states[0])


def test_a_corrupt_clip_in_evaluation_is_marked_invalid(vp9, tok, tmp_path):
    loader = build_eval_loader(_cfg(_corrupt(vp9, tmp_path / "bad", "v001")), "retrieval", tok, 0, 1)
    batches = list(loader)
    assert [b.valid.tolist() for b in batches] == [[True, False], [True, True]]
    assert [k for b in batches for k in b.keys] == ["v000", "", "v002", "v003"]
    metrics = loader.metrics()
    assert metrics["skipped/decode_error"] == 1 and metrics["skipped/dali_batch_retries"] == 1


def test_image_batches_mix_in_with_the_plan_loaders_choice(vp9, loader_shards, tok):
    images = loader_shards["image"]
    loader = build_train_loader(_cfg(vp9, train={"image": str(images)}), "prompter", tok, 0, 1, seed=11)
    assert len(loader) == 2 + 2  # video 4 // 2, images 5 // 2
    for step, batch in enumerate(loader):
        assert batch.type == ["video", "image"][choose_source(11, step, [0.5, 0.5])]
        assert batch.video.shape == (2, 3, 4, 32, 32) and batch.mlm_labels is None and batch.pem_box is None


def test_a_mixed_state_with_its_image_position_resumes_exactly(vp9, loader_shards, tok):
    """The image source's position travels inside the reader state (``images``, in the layout of an indexed
    state) and continues where it was, across the image source's epoch boundary."""
    cfg = _cfg(vp9, train={"image": str(loader_shards["image"])}, resampled=True)
    reference = build_train_loader(cfg, "prompter", tok, 0, 1, seed=11)
    batches, states = [], []
    for batch in reference:
        batches.append(batch)
        states.append(json.loads(json.dumps(reference.state_dict())))
        if len(batches) == 14:  # at seed 11: images at steps 1, 8, 11, 12, 13 (2 image batches per epoch)
            break
    k = 1  # saved right after the first image batch, in the middle of the image source's first epoch
    assert states[k]["images"]["mode"] == "indexed" and states[k]["images"]["step"] == 1
    resumed = build_train_loader(cfg, "prompter", tok, 0, 1, seed=11)
    resumed.load_state_dict(states[k])
    rest = []
    for batch in resumed:
        rest.append(batch)
        if len(rest) == len(batches) - k - 1:
            break
    assert [b.type for b in rest] == [b.type for b in batches[k + 1 :]] and [b.type for b in rest].count("image") == 4
    assert all(a.keys == b.keys and a.texts == b.texts and torch.equal(a.video, b.video)
               for a, b in zip(rest, batches[k + 1 :]))


def test_errors_are_one_clear_line(vp9, loader_shards, tok):
    with pytest.raises(AlproError, match="cannot be decoded by DALI on the CPU.*--codec vp9") as info:
        build_train_loader(_cfg(loader_shards["video"]), "pretrain", tok, 0, 1, seed=0)  # H.264 shards
    assert "\n" not in str(info.value)
    with pytest.raises(AlproError, match="cannot evaluate QA"):
        build_eval_loader(_cfg(vp9), "qa", tok, 0, 1)
    with pytest.raises(AlproError, match="pipe: sources cannot be read"):
        build_train_loader(_cfg("pipe:cat x.tar", train={"video_index": str(vp9 / "index.json.zst")}),
                           "pretrain", tok, 0, 1, seed=0)


def test_the_trainer_cli_runs_on_the_reader(vp9, loader_shards, tmp_path):
    """The prompter debug stage, 4 steps (steps 0-2 are image batches at seed 42, step 3 a video batch), then its
    end-of-training retrieval evaluation through the reader's evaluation loader."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "alpro", "train", "--config", str(REPO / "launch/configs/debug/prompter.yaml"),
           "--train.run_dir", str(run), "--data.decoder", "dali", "--data.dali_reader", "webdataset",
           "--data.train.video", str(vp9), "--data.train.image", str(loader_shards["image"]),
           "--data.test.video", str(vp9), "--train.steps", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("data/decoded_per_delivered", 0) > 0 for r in rows)  # the video step went through DALI
    assert any(r.get("kind") == "eval" and r.get("val/n_videos") == 4 for r in rows)
    state = json.loads((run / "checkpoints" / "step-00000004" / "rank_00000.json").read_text())["loader"]
    assert state["mode"] == "dali_reader" and state["reader"]["checkpoint"] and state["step"] == 4
