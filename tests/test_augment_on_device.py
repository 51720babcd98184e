"""``data.augment_on: device`` (issue 12.5): the DataLoader workers decode and crop, send uint8 clips with each
clip's drawn RandAugment ops, and the loader finishes the batch on the training device. On the CPU every batch
must equal the one the loader makes with ``augment_on: loader`` bit for bit (``torch.equal``): pre-training
(crop, RandAugment, PEM crop input) in the main process and from 2 workers, evaluation with padding rows,
``pipe:`` streaming, and a video source that also holds pictures (finished in the worker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alpro.config import ConfigError, from_dict
from alpro.data import DataConfig, build_eval_loader, build_tokenizer, build_train_loader, corpus_texts
from alpro.data.batch import Batch
from alpro.data.decode import decode_video, meta_from_json
from alpro.data.samples import read_meta
from alpro.data.shards import Reader, resolve
from alpro.data.transforms import ClipParams, ClipTransform, finish_batch

FIELDS = ("video", "crop_video", "pem_box", "pem_mask", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels",
          "valid", "answer_ids")


def make_cfg(shards, **kw) -> DataConfig:
    base = {"train": {"video": str(shards["video"])}, "test": {"video": str(shards["video"])}, "frame_size": 32,
            "num_frames": 4, "batch_size": 3, "eval_batch_size": 3, "num_workers": 0, "max_text_len": 16,
            "pem": {"patch_size": 8}, "randaugment": {"num_ops": 2}}
    return from_dict(DataConfig, {**base, **kw})


@pytest.fixture(scope="module")
def tok(loader_shards):
    return build_tokenizer(train_texts=corpus_texts(make_cfg(loader_shards), "pretrain"))


def assert_same(a: Batch, b: Batch) -> None:
    assert a.keys == b.keys and a.texts == b.texts and a.video_ops is None and b.video_ops is None
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("workers", [0, 2])
def test_pretraining_batches_are_bit_identical(loader_shards, tok, workers):
    batches = {}
    for where in ("loader", "device"):
        cfg = make_cfg(loader_shards, num_workers=workers, augment_on=where,
                       train={"video": str(loader_shards["video"]), "image": str(loader_shards["image"])})
        loader = build_train_loader(cfg, "pretrain", tok, rank=0, world_size=1, seed=5)
        batches[where] = [b for _ in range(2) for b in loader]
        loader.close()
    kinds = {b.type for b in batches["loader"]}
    assert kinds == {"video", "image"}  # both streams were drawn, each finished where it should be
    for a, b in zip(batches["loader"], batches["device"], strict=True):
        assert_same(a, b)
        assert a.video.dtype == torch.float32 and a.crop_video is not None


def test_worker_batches_cross_as_uint8_with_their_ops(loader_shards, tok):
    cfg = make_cfg(loader_shards, augment_on="device")
    loader = build_train_loader(cfg, "pretrain", tok, rank=0, world_size=1, seed=5)
    raw, _ = next(loader.source.batches(0, len(loader), lambda step: 0))
    assert raw.video.dtype == torch.uint8 and raw.video.shape == (3, 4, 32, 32, 3)  # (B, T, H, W, C) as decoded
    assert raw.crop_video is None and len(raw.video_ops) == 3 and all(len(ops) == 2 for ops in raw.video_ops)
    finished = next(iter(loader))
    assert finished.video_ops is None and finished.video.dtype == torch.float32
    assert finished.crop_video is not None and finished.crop_video.shape == finished.video.shape
    loader.close()


@pytest.mark.parametrize("task", ["retrieval", "qa"])
def test_evaluation_batches_and_padding_are_bit_identical(loader_shards, tok, task):
    vocab = {"one": 0, "two": 1}
    out = {}
    for where in ("loader", "device"):
        cfg = make_cfg(loader_shards, augment_on=where, num_workers=1)
        loader = build_eval_loader(cfg, task, tok, rank=1, world_size=2, split="test", answer_vocab=vocab)
        out[where] = list(loader)
        loader.close()
    assert any(not bool(b.valid.all()) for b in out["loader"]) or task == "qa"
    for a, b in zip(out["loader"], out["device"], strict=True):
        assert_same(a, b)


def test_streaming_batches_are_bit_identical(loader_shards, tok):
    video = loader_shards["video"]
    out = {}
    for where in ("loader", "device"):
        cfg = make_cfg(loader_shards, augment_on=where, resampled=True,
                       stream_buffer=3, train={"video": f"pipe:cat {video}/shard-{{000000..000002}}.tar",
                                               "video_index": str(video / "index.json.zst")})
        loader = build_train_loader(cfg, "pretrain", tok, rank=0, world_size=1, seed=3)
        it = iter(loader)
        out[where] = [next(it) for _ in range(3)]
        loader.close()
    for a, b in zip(out["loader"], out["device"], strict=True):
        assert_same(a, b)


def test_finish_batch_equals_the_loaders_transform_and_zeroes_padding(loader_shards):
    cfg = make_cfg(loader_shards)
    tf = ClipTransform(cfg, "pretrain", train=True)
    shardset, reader = resolve(str(loader_shards["video"]), "test"), Reader()
    key, members = reader.sample(*shardset.locate(0))
    frames, _ = decode_video(members["mp4"], np.array([0, 2, 4, 6]), meta_from_json(read_meta(members)), tf.resize)
    params = [ClipParams(crop=(1, 3), ops=("Rotate", "Sharpness")), None, ClipParams(crop=(4, 0), ops=())]
    video = torch.zeros((3, 4, 32, 32, 3), dtype=torch.uint8)  # (B, T, H, W, C)
    for i, p in enumerate(params):
        if p is not None:
            video[i].copy_(tf.crop_hwc(frames.permute(0, 2, 3, 1), p))
    out = finish_batch(video, [None if p is None else p.ops for p in params], tf.magnitude, tf.frame_size)
    for i, p in enumerate(params):
        expected = torch.zeros(4, 3, 32, 32) if p is None else tf.apply(frames, p)
        assert torch.equal(out[i], expected.transpose(0, 1)), i
    # a mixed batch (a clip next to a picture) is finished in the worker with the same values
    hwc = tf.crop_hwc(frames.permute(0, 2, 3, 1).contiguous(), params[0])
    assert torch.equal(tf.finish(hwc.permute(0, 3, 1, 2).contiguous(), params[0].ops), tf.apply(frames, params[0]))
    assert torch.equal(decode_video(members["mp4"], np.array([0, 2, 4, 6]), meta_from_json(read_meta(members)),
                                    tf.resize, channels_last=True)[0], frames.permute(0, 2, 3, 1))


def test_augment_on_is_validated(loader_shards):
    with pytest.raises(ConfigError, match="augment_on"):
        make_cfg(loader_shards, augment_on="gpu")
    assert make_cfg(loader_shards, augment_on="auto").augments_on_device() == torch.cuda.is_available()
    assert make_cfg(loader_shards, augment_on="device").augments_on_device()
