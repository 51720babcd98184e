"""The DALI decoder (CPU device here; the GPU graph differs only in device='mixed') against PyAV."""

from __future__ import annotations

import media_factory as mf
import pytest
import torch
from data_fixtures import write_shards

from alpro.config import from_dict
from alpro.data import CLIP_STD, DataConfig, build_eval_loader, build_tokenizer, build_train_loader
from alpro.data.dali import choose_decoder
from alpro.errors import AlproError

pytestmark = pytest.mark.dali

# Tolerance for resize differences (swscale vs DALI resize, and their YUV->RGB conversions), in 0..255 pixel
# levels: measured mean ~6 at a 2x downscale of these 64x48 clips, ~2 at the pre-training resize.
MEAN_LEVELS, MAX_LEVELS = 10.0, 140.0


def _cfg(path, decoder, **kw):
    base = {"train": {"video": str(path)}, "val": {"video": str(path)}, "frame_size": 32, "num_frames": 4,
            "batch_size": 2, "num_workers": 0, "decoder": decoder, "pem": {"patch_size": 8}}
    return from_dict(DataConfig, {**base, **kw})


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(train_texts=["clip number shows a moving square caption two of"])


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised videos in 0..255 pixel levels (per channel std)."""
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1) * 255
    return (a - b).abs() * std


@pytest.mark.parametrize("task,split", [("retrieval", "val"), ("pretrain", "train")])
def test_dali_and_pyav_give_the_same_batches(loader_shards, tok, task, split):
    vp9 = loader_shards["vp9"]
    batches = {}
    for decoder in ("pyav", "dali"):
        cfg = _cfg(vp9, decoder)
        loader = (build_eval_loader(cfg, task, tok, 0, 1) if split == "val"
                  else build_train_loader(cfg, task, tok, 0, 1, seed=4))
        batches[decoder] = list(loader)
        assert loader.metrics()["skipped"] == 0
    assert len(batches["pyav"]) == len(batches["dali"]) == 2
    for a, b in zip(batches["pyav"], batches["dali"]):
        assert a.keys == b.keys and torch.equal(a.input_ids, b.input_ids)
        levels = _levels(a.video, b.video)
        assert levels.mean() < MEAN_LEVELS and levels.max() < MAX_LEVELS, (levels.mean(), levels.max())
        if a.pem_box is not None:
            assert torch.equal(a.pem_box, b.pem_box) and torch.equal(a.mlm_input_ids, b.mlm_input_ids)


def test_dali_on_cpu_refuses_h264_up_front(loader_shards, tok):
    with pytest.raises(AlproError, match="cannot be decoded by DALI on the CPU"):
        list(build_eval_loader(_cfg(loader_shards["video"], "dali"), "retrieval", tok, 0, 1))


def test_auto_picks_pyav_without_a_gpu():
    assert choose_decoder(_cfg("x", "auto")) == ("dali" if torch.cuda.is_available() else "pyav")


def test_a_corrupt_clip_in_a_dali_batch_falls_back_to_pyav(tmp_path, tok):
    good = [mf.make_video(tmp_path / f"g{i}.webm", codec="vp9", seconds=1, gop=8, seed=i) for i in range(3)]
    bad = mf.make_not_video(tmp_path / "bad.webm")
    samples = [{"key": f"g{i}", "path": p, "media": "video", "captions": [f"clip {i}"]} for i, p in enumerate(good)]
    samples.insert(1, {"key": "bad", "path": bad, "media": "video", "captions": ["bad"], "meta_from": good[0]})
    shards = write_shards(tmp_path / "shards", samples)
    out = {}
    for decoder in ("pyav", "dali"):
        # One worker: DataLoader workers of DALI runs start from a fork server (see Loader._loader).
        loader = build_eval_loader(_cfg(shards, decoder, num_workers=1), "retrieval", tok, 0, 1)
        out[decoder] = list(loader)
        metrics = loader.metrics()
        assert metrics["skipped/decode_error"] == 1
    assert metrics["skipped/dali_batch_fallbacks"] == 1  # the batch holding the bad clip, re-decoded by PyAV
    for a, b in zip(out["pyav"], out["dali"]):
        assert a.keys == b.keys and torch.equal(a.valid, b.valid)
        assert _levels(a.video, b.video).mean() < MEAN_LEVELS
    assert [k for b in out["dali"] for k, ok in zip(b.keys, b.valid.tolist()) if ok] == ["g0", "g1", "g2"]
