"""RandAugment ops against the original's OpenCV / PIL semantics, and the per-task transforms' determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alpro.config import from_dict
from alpro.data import CLIP_MEAN, CLIP_STD, DataConfig
from alpro.data.transforms import ClipTransform, ImageTransform, apply_op, normalize


def _clip(t=2, h=224, w=224, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, 3, h, w), generator=g).float()


def test_translate_shifts_content_by_magnitude_pixels_with_grey_fill():
    # Tolerance 0.02 of 255: grid_sample un-normalises coordinates in float32.
    x = _clip()
    out = apply_op(x, "TranslateX", 5, frame_size=224)  # M=5 -> 5 px at 224, content moves left
    torch.testing.assert_close(out[..., :-5], x[..., 5:], atol=0.02, rtol=0)
    assert torch.allclose(out[..., -5:], torch.tensor(128.0))
    out = apply_op(x, "TranslateY", 5, frame_size=224)
    torch.testing.assert_close(out[..., :-5, :], x[..., 5:, :], atol=0.02, rtol=0)
    # Scaled with frame_size for debug sizes: 5 * 112 / 224 = 2.5 px -> half-pixel blend.
    small = _clip(h=112, w=112)
    half = apply_op(small, "TranslateX", 5, frame_size=112)
    torch.testing.assert_close(half[..., :-3], 0.5 * (small[..., 2:-1] + small[..., 3:]), atol=0.02, rtol=0)


def test_shear_x_is_about_the_top_left_origin_as_cv2():
    x = _clip()
    out = apply_op(x, "ShearX", 5, frame_size=224)  # forward [[1, 0.15, 0], [0, 1, 0]]
    torch.testing.assert_close(out[..., 0, :], x[..., 0, :], atol=0.02, rtol=0)  # row 0 does not move
    torch.testing.assert_close(out[..., 20, 3:], x[..., 20, :-3], atol=0.02, rtol=0)  # 0.15 * 20 = 3 px right
    out = apply_op(x, "ShearY", 5, frame_size=224)
    torch.testing.assert_close(out[..., 40:, 20], x[..., 37:-3, 20], atol=0.02, rtol=0)


def test_rotate_is_counter_clockwise_about_the_centre():
    x = torch.zeros(1, 3, 65, 65)
    cx = cy = 65 / 2
    x[..., 32, 52] = 255.0  # 19.5 px right of the centre (pixel centres at integer coordinates)
    out = apply_op(x, "Rotate", 5, frame_size=224)  # 15 degrees
    y_new, x_new = divmod(int(out[0, 0].argmax()), 65)
    a = math.radians(15)
    assert abs(x_new - (cx + (52 - cx) * math.cos(a) + (32 - cy) * math.sin(a))) <= 1
    assert abs(y_new - (cy - (52 - cx) * math.sin(a) + (32 - cy) * math.cos(a))) <= 1
    assert y_new < 32  # moved up: counter-clockwise on screen


def test_enhance_ops_are_no_ops_at_magnitude_5_as_the_original():
    x = _clip()
    for name in ("Contrast", "Brightness", "Sharpness", "Identity"):
        assert torch.equal(apply_op(x, name, 5, 224), x), name


def test_enhance_ops_at_magnitude_7_follow_pil():
    x = _clip(t=1, h=16, w=16)
    factor = 7 / 10 * 1.8 + 0.1
    torch.testing.assert_close(apply_op(x, "Brightness", 7, 224), (x * factor).clamp(0, 255))
    sharp = apply_op(x, "Sharpness", 7, 224)
    kernel = np.ones((3, 3)) / 13
    kernel[1, 1] = 5 / 13
    img = x[0].numpy()
    ref = img.copy()
    for c in range(3):
        for i in range(1, 15):
            for j in range(1, 15):
                blur = (img[c, i - 1 : i + 2, j - 1 : j + 2] * kernel).sum()
                ref[c, i, j] = np.clip(blur + factor * (img[c, i, j] - blur), 0, 255)
    torch.testing.assert_close(sharp[0], torch.from_numpy(ref), atol=0.02, rtol=0)
    contrast = apply_op(x, "Contrast", 7, 224)
    mean = (0.299 * x[0, 0] + 0.587 * x[0, 1] + 0.114 * x[0, 2]).mean()
    torch.testing.assert_close(contrast, ((x - mean) * factor + mean).clamp(0, 255), atol=1e-3, rtol=1e-5)
    assert torch.equal(apply_op(x, "HorizontalFlip", 5, 224), x.flip(-1))


def test_normalize_uses_clip_mean_and_std():
    x = torch.full((1, 3, 2, 2), 255.0)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(normalize(x)[0, :, 0, 0], expected)


def _cfg(**kw) -> DataConfig:
    return from_dict(DataConfig, kw)


def test_pretrain_clip_transform_is_seeded_and_temporally_consistent():
    cfg = _cfg(frame_size=64)
    tf = ClipTransform(cfg, "pretrain", train=True)
    assert tf.resize == 73 and tf.num_ops == 2
    draws = [tf.draw(np.random.default_rng(s)) for s in range(40)]
    assert draws[3] == tf.draw(np.random.default_rng(3))  # same seed, same parameters
    assert len({d.ops for d in draws}) > 10 and all(len(set(d.ops)) == 2 for d in draws)  # 2 distinct ops
    assert all(0 <= d.crop[0] <= 9 and 0 <= d.crop[1] <= 9 for d in draws)
    frame = torch.randint(0, 256, (1, 3, 73, 73), dtype=torch.uint8)
    static = frame.expand(4, -1, -1, -1)  # the same frame 4 times
    for d in draws[:10]:
        out = tf.apply(static, d)
        assert out.shape == (4, 3, 64, 64)
        assert all(torch.equal(out[0], out[t]) for t in range(1, 4)), d  # same crop and ops on every frame


def test_task_transforms_follow_the_original():
    cfg = _cfg(frame_size=64)
    qa = ClipTransform(cfg, "qa", train=True)
    assert qa.resize == 64 and qa.num_ops == 2  # QA: resize to 224-equivalent, RandAug(2, 5)
    ret = ClipTransform(cfg, "retrieval", train=True)
    assert ret.resize == 64 and ret.num_ops == 0  # constructed but never applied in the original
    assert ClipTransform(_cfg(frame_size=64, randaugment={"retrieval": True}), "retrieval", True).num_ops == 2
    ev = ClipTransform(cfg, "pretrain", train=False)
    assert ev.draw(np.random.default_rng(0)).crop == (4, 4) and ev.num_ops == 0  # centre crop, no augmentation


def test_image_transform_random_resized_crop_and_ops():
    cfg = _cfg(frame_size=32)
    tf = ImageTransform(cfg, train=True)
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    draws = [tf.draw(np.random.default_rng(s), 60, 80) for s in range(200)]
    for d in draws:
        top, left, h, w = d.box
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.2 * 4800 * 0.9 <= h * w <= 4800 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
        assert set(d.ops) <= {"Identity", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
                              "TranslateY", "Rotate"}
    n_ops = [len(d.ops) for d in draws]
    assert 0.8 < np.mean(n_ops) < 1.2  # 2 ops, each kept with p=0.5
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6
    out = tf.apply(image, draws[0])
    assert out.shape == (1, 3, 32, 32)
    assert torch.equal(out, tf.apply(image, tf.draw(np.random.default_rng(0), 60, 80)))
    plain = ImageTransform(cfg, train=False)
    assert plain.draw(np.random.default_rng(0), 60, 80).box is None
    assert plain.apply(image, plain.draw(np.random.default_rng(0), 60, 80)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("name", ["ShearX", "Rotate", "TranslateX"])
def test_geometric_ops_fill_with_grey_outside(name):
    x = torch.zeros(1, 3, 32, 32)
    out = apply_op(x, name, 10, frame_size=32)
    assert out.max() == 128.0 and (out == 128.0).any() and out.min() == 0.0
