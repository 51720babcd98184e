"""The faster batch path (issue 12.5) delivers bit-identical pixels: each piece against a verbatim copy of the code
it replaced (the float transform with a grid built per clip, stack + permute, ``torch.where`` for the PEM crop),
on real decoded clips, compared with ``torch.equal``; and whole loader batches, in the main process and from
2 workers (shared-memory batches), against batches assembled by the old code from the loader's own plan."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alpro.config import from_dict
from alpro.data import CLIP_MEAN, CLIP_STD, DataConfig, build_tokenizer, build_train_loader, corpus_texts
from alpro.data import transforms as T
from alpro.data.batch import Batch
from alpro.data.decode import decode_video, meta_from_json
from alpro.data.pem import crop_video
from alpro.data.samples import read_meta
from alpro.data.shards import Reader, resolve
from alpro.data.transforms import ClipParams, ClipTransform

OPS = ["Identity", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
       "HorizontalFlip"]

# ------------------------------------------------------------------ the code before issue 12.5, verbatim


def old_warp(frames: torch.Tensor, forward: np.ndarray) -> torch.Tensor:
    t, c, h, w = frames.shape
    full = np.vstack([forward, [0.0, 0.0, 1.0]])
    inv = torch.tensor(np.linalg.inv(full)[:2], dtype=torch.float64, device=frames.device)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=frames.device),
                            torch.arange(w, dtype=torch.float64, device=frames.device), indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)
    src = pts @ inv.T
    grid = torch.stack([2 * src[..., 0] / max(w - 1, 1) - 1, 2 * src[..., 1] / max(h - 1, 1) - 1], dim=-1)
    grid = grid.to(frames.dtype).unsqueeze(0).expand(t, h, w, 2)
    out = F.grid_sample(frames - 128.0, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out + 128.0


def old_normalize(frames: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0
    return (frames - mean) / std


def old_apply(tf: ClipTransform, frames: torch.Tensor, params: ClipParams, monkeypatch) -> torch.Tensor:
    frames = frames.float()
    if params.crop is not None:
        top, left = params.crop
        frames = frames[..., top : top + tf.frame_size, left : left + tf.frame_size]
    with monkeypatch.context() as m:
        m.setattr(T, "_warp", old_warp)
        for name in params.ops:
            frames = T.apply_op(frames, name, tf.magnitude, tf.frame_size)
    return old_normalize(frames)


def old_assemble(pixels: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(pixels).permute(0, 2, 1, 3, 4).contiguous()


def old_crop_video(video: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    b, _, _, h, w = video.shape
    ys, xs = torch.arange(h), torch.arange(w)
    top, left, bh, bw = (boxes[:, i, None] for i in range(4))
    inside = ((ys >= top) & (ys < top + bh))[:, :, None] & ((xs >= left) & (xs < left + bw))[:, None, :]
    zero = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).to(video).view(1, 3, 1, 1, 1)
    return torch.where(inside.view(b, 1, 1, h, w), video, zero)


# ------------------------------------------------------------------------------------------------ fixtures


def make_cfg(shards, **kw) -> DataConfig:
    base = {"train": {"video": str(shards["video"])}, "frame_size": 32, "num_frames": 4, "batch_size": 2,
            "num_workers": 0, "max_text_len": 16, "pem": {"patch_size": 8}}
    return from_dict(DataConfig, {**base, **kw})


@pytest.fixture(scope="module")
def clips(loader_shards) -> list[tuple[str, bytes, object]]:
    shardset, reader = resolve(str(loader_shards["video"]), "test"), Reader()
    out = []
    for gid in range(len(shardset)):
        key, members = reader.sample(*shardset.locate(gid))
        out.append((key, members["mp4"], meta_from_json(read_meta(members))))
    return out


@pytest.fixture(scope="module")
def tok(loader_shards):
    return build_tokenizer(train_texts=corpus_texts(make_cfg(loader_shards), "pretrain"))


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("magnitude", [5, 9])
def test_every_op_on_decoded_clips_is_bit_identical_to_the_old_transform(loader_shards, clips, monkeypatch,
                                                                          magnitude):
    cfg = make_cfg(loader_shards, randaugment={"magnitude": magnitude})
    tf = ClipTransform(cfg, "pretrain", train=True)
    g = np.random.default_rng(magnitude)
    for n, (_, data, meta) in enumerate(clips[:4]):
        frames, _ = decode_video(data, np.array([0, 5, 9, 9]), meta, tf.resize)  # (T, 3, resize, resize) uint8
        for i, a in enumerate(OPS):
            for b in (OPS[(i + n + 1) % len(OPS)], None):
                crop = (int(g.integers(0, tf.resize - tf.frame_size + 1)), int(g.integers(0, 5)))
                params = ClipParams(crop=crop, ops=(a,) if b is None else (a, b))
                new, old = tf.apply(frames, params), old_apply(tf, frames, params, monkeypatch)
                assert new.dtype == old.dtype == torch.float32 and new.shape == old.shape
                assert torch.equal(new, old), (magnitude, params)
                # the grid cache must not carry one clip's grid into another size
                assert torch.equal(tf.apply(frames[:2], params), old_apply(tf, frames[:2], params, monkeypatch))
    # a channels-last input (DALI's frames) and a float input take the same values too
    frames, _ = decode_video(clips[0][1], np.array([1, 2, 3, 4]), clips[0][2], tf.resize)
    cl = frames.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    for params in (ClipParams(crop=(3, 1), ops=("Rotate", "Sharpness")), ClipParams(crop=None, ops=("ShearY",))):
        ref = old_apply(tf, frames, params, monkeypatch)
        assert torch.equal(tf.apply(cl, params), ref)
        assert torch.equal(tf.apply(frames.float(), params), ref)


def test_ops_at_224_are_bit_identical(loader_shards, clips, monkeypatch):
    tf = ClipTransform(make_cfg(loader_shards, frame_size=224), "pretrain", train=True)
    frames, _ = decode_video(clips[1][1], np.array([0, 3, 6, 9]), clips[1][2], tf.resize)
    for a, b in zip(OPS, OPS[5:] + OPS[:5]):
        params = ClipParams(crop=(17, 30), ops=(a, b))
        assert torch.equal(tf.apply(frames, params), old_apply(tf, frames, params, monkeypatch)), params


def test_crop_video_selects_the_same_values_as_torch_where():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(5, 3, 2, 32, 40, generator=g)
    boxes = torch.tensor([[0, 0, 32, 40], [8, 16, 8, 8], [24, 32, 16, 16], [0, 0, 0, 8], [16, 8, 16, 24]])
    new = crop_video(video, boxes)
    assert torch.equal(new, old_crop_video(video, boxes))
    odd = torch.tensor([[-8, -8, 16, 16], [40, 0, 8, 8], [0, 48, 8, 8], [-40, 0, 8, 8], [4, 4, 100, 100]])
    assert torch.equal(crop_video(video, odd), old_crop_video(video, odd))
    assert torch.equal(crop_video(video.transpose(3, 4).contiguous().transpose(3, 4), boxes), new)


def test_a_batch_pickles_small_tensors_by_value_and_keeps_every_field():
    g = torch.Generator().manual_seed(1)
    batch = Batch(type="video", keys=["a", "b"], video=torch.randn(2, 3, 4, 64, 64, generator=g),
                  input_ids=torch.randint(0, 99, (2, 7), generator=g), attention_mask=torch.ones(2, 7, dtype=torch.int64),
                  texts=["x", "y"], pem_box=torch.tensor([[0, 0, 8, 8], [0, 0, 4, 4]]),
                  pem_mask=torch.rand(2, 4, generator=g), valid=torch.tensor([True, False]),
                  mlm_labels=torch.randint(0, 99, (2, 7), generator=g).t())  # non-contiguous
    state = batch.__getstate__()
    assert torch.is_tensor(state["video"]) and not torch.is_tensor(state["input_ids"])
    back = pickle.loads(pickle.dumps(batch))
    for f in dataclasses.fields(Batch):
        a, b = getattr(batch, f.name), getattr(back, f.name)
        if torch.is_tensor(a):
            assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f.name
        else:
            assert a == b, f.name


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_equal_the_old_assembly_of_their_own_plan(loader_shards, clips, tok, monkeypatch, workers):
    """Pre-training batches (RandAugment, PEM crop) from the loader against the old code run on the loader's plan:
    the same decoded frames through the old transform, stack + permute and torch.where."""
    cfg = make_cfg(loader_shards, num_workers=workers, randaugment={"num_ops": 2})
    loader = build_train_loader(cfg, "pretrain", tok, rank=0, world_size=1, seed=11)
    steps = list(loader.plan())
    data = {key: (blob, meta) for key, blob, meta in clips}
    tf = ClipTransform(cfg, "pretrain", train=True)
    warped = 0
    for step, batch in zip(steps, loader, strict=True):
        pixels = []
        for item in step["items"]:
            blob, meta = data[item["key"]]
            frames, _ = decode_video(blob, np.asarray(item["frames"]), meta, tf.resize, cfg.interpolation)
            pixels.append(old_apply(tf, frames, item["clip"], monkeypatch))
            warped += any(op in item["clip"].ops for op in OPS[4:9])
        video = old_assemble(pixels)
        assert batch.video.is_contiguous() and batch.video.dtype == torch.float32
        assert torch.equal(batch.video, video)
        boxes = torch.tensor([item["box"] for item in step["items"]])
        assert torch.equal(batch.pem_box, boxes)
        assert torch.equal(batch.crop_video, old_crop_video(video, boxes))
    assert warped > 0 and math.isfinite(float(batch.video.sum()))
    loader.close()
