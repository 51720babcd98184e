"""Bad data never stops training: every kind is skipped, replaced deterministically and counted by reason."""

from __future__ import annotations

import os

import media_factory as mf
import pytest
import torch
from data_fixtures import write_foreign, write_shards

from alpro.config import from_dict
from alpro.data import DataConfig, build_eval_loader, build_tokenizer, build_train_loader

BAD_KEYS = {"corrupt", "truncmp4", "nocap", "lies", "badjson", "empty"}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = [mf.make_video(root / f"g{i}.mp4", seconds=2, gop=8, seed=i) for i in range(8)]
    samples = [{"key": f"good{i}", "path": p, "media": "video", "captions": [f"good clip {i}"]}
               for i, p in enumerate(good)]
    samples += [
        {"key": "corrupt", "path": mf.make_corrupt(root / "c.mp4", seconds=2, gop=8), "media": "video",
         "captions": ["corrupt"]},
        {"key": "truncmp4", "path": mf.make_truncated(root / "t.mp4", seconds=2, gop=8), "media": "video",
         "captions": ["truncated clip"], "meta_from": good[0]},
        {"key": "nocap", "path": good[1], "media": "video", "captions": []},
        {"key": "lies", "path": good[2], "media": "video", "captions": ["lying frame count"],
         "override": {"num_frames": 400}},
        {"key": "badjson", "path": good[3], "media": "video", "captions": ["bad json"], "raw_json": b"{not json"},
        {"key": "empty", "path": mf.make_zero_byte(root / "z.mp4"), "media": "video", "captions": ["empty"],
         "meta_from": good[0]},
    ]
    order = [samples[i] for i in (0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 7)]
    out = write_shards(root / "shards", order, per_shard=4)
    # A truncated tar: the last shard loses its final bytes, the index still lists its samples.
    last = sorted(out.glob("*.tar"))[-1]
    os.truncate(last, last.stat().st_size - 3000)
    return out


def _cfg(path, **kw):
    return from_dict(DataConfig, {"train": {"video": str(path)}, "val": {"video": str(path)}, "frame_size": 32,
                                  "num_frames": 4, "batch_size": 2, "num_workers": 1, "pem": {"patch_size": 8},
                                  **kw})


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(train_texts=["good clip lying frame count truncated corrupt bad json foreign"])


def test_bad_samples_are_skipped_replaced_and_counted(bad_shards, tok):
    loader = build_train_loader(_cfg(bad_shards), "pretrain", tok, 0, 1, seed=0)
    assert len(loader) == 7
    keys = []
    for batch in loader:
        assert len(batch.keys) == 2 and batch.video.shape == (2, 3, 4, 32, 32)  # always full
        assert torch.isfinite(batch.video).all()
        keys += batch.keys
    assert not set(keys) & BAD_KEYS
    skipped = {k.split("/", 1)[1]: v for k, v in loader.metrics().items() if k.startswith("skipped/")}
    assert {"decode_error", "missing_text", "frame_count", "bad_metadata", "missing_media"} <= set(skipped)
    assert "truncated" in skipped  # samples cut off by the truncated tar
    # Replacements come from the plan, so a second run (any worker count) gives the same batches.
    again = build_train_loader(_cfg(bad_shards, num_workers=0), "pretrain", tok, 0, 1, seed=0)
    assert [k for b in again for k in b.keys] == keys


def test_evaluation_marks_bad_clips_invalid_instead_of_substituting(bad_shards, tok):
    loader = build_eval_loader(_cfg(bad_shards), "pretrain", tok, 0, 1)
    slots = [(k, ok) for b in loader for k, ok in zip(b.keys, b.valid.tolist())]
    assert len(slots) == 14  # every planned clip keeps its slot, in order
    valid = [k for k, ok in slots if ok]
    assert valid == [k for k in valid if k.startswith("good")] and len(valid) >= 6
    assert len(set(valid)) == len(valid)  # nothing evaluated twice
    assert loader.metrics()["skipped"] == 14 - len(valid)


def test_foreign_video2dataset_shards_are_probed(tmp_path, tok):
    clips = [mf.make_video(tmp_path / f"f{i}.mp4", seconds=1.5, gop=12, seed=20 + i) for i in range(5)]
    shards = write_foreign(tmp_path / "v2d", clips)
    assert not (shards / "index.json.zst").exists()
    cfg = _cfg(shards / "{00000..00001}.tar")
    loader = build_train_loader(cfg, "retrieval", tok, 0, 1, seed=1)
    assert len(loader) == 2  # 5 clips, one caption each, batch 2, drop last
    plan = next(loader.plan())
    assert all(len(i["frames"]) == 4 and max(i["frames"]) < 36 for i in plan["items"])
    batches = list(loader)
    assert all(b.texts[0].startswith("foreign clip") for b in batches)
    ev = build_eval_loader(_cfg(shards), "retrieval", tok, 0, 1)
    assert [k for b in ev for k, ok in zip(b.keys, b.valid.tolist()) if ok] == [
        "000000000", "000000001", "000000002", "000010003", "000010004"]
