"""PEM random crop: the box constraints of the original and the derived mask / crop tensors."""

from __future__ import annotations

import math

import numpy as np
import torch

from alpro.data import CLIP_MEAN, CLIP_STD
from alpro.data.config import PemConfig
from alpro.data.pem import crop_video, draw_box, patch_mask


def test_boxes_are_patch_aligned_fit_and_keep_the_original_area_and_aspect():
    cfg = PemConfig()
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(2000):
        top, left, h, w = draw_box(rng, 224, 224, cfg)
        assert top % 16 == left % 16 == h % 16 == w % 16 == 0
        assert h > 0 and w > 0 and top + h <= 224 and left + w <= 224
        # Before snapping: area in [0.3, 0.5] * 224^2 and aspect h/w in [0.3, 3.33]; snapping removes < 16 px.
        assert h * w <= 0.5 * 224 * 224 * 3.34 / 3.33 + 1
        assert (h + 16) * (w + 16) >= 0.3 * 224 * 224 * 0.99
        assert 0.3 * (w / (w + 16)) <= h / w <= (1 / 0.3) * ((h + 16) / h)
        areas.append(h * w / 224**2)
    assert 0.2 < np.mean(areas) < 0.45  # snapping down shrinks the 0.3-0.5 draw


def test_small_debug_frames_never_get_an_empty_box():
    rng = np.random.default_rng(1)
    for _ in range(500):
        top, left, h, w = draw_box(rng, 32, 32, PemConfig(patch_size=16))
        assert h >= 16 and w >= 16 and top + h <= 32 and left + w <= 32


def test_patch_mask_and_crop_video():
    boxes = torch.tensor([[16, 32, 32, 48], [0, 0, 64, 64]])
    mask = patch_mask(boxes, 64, 64, 16)  # 4x4 grid
    grid0 = mask[0].view(4, 4)
    expected = torch.zeros(4, 4)
    expected[1:3, 2:4] = 1  # rows 16..47, cols 32..79 clipped to the grid
    assert torch.equal(grid0, expected) and mask[1].sum() == 16 and mask.dtype == torch.float32
    video = torch.randn(2, 3, 4, 64, 64)
    crop = crop_video(video, boxes)
    assert torch.equal(crop[1], video[1])
    inside = crop[0, :, :, 16:48, 32:64]
    assert torch.equal(inside, video[0, :, :, 16:48, 32:64])
    zero = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    outside = crop[0, :, :, :16, :]
    torch.testing.assert_close(outside, zero.view(3, 1, 1, 1).expand_as(outside))
    assert math.isclose(float((crop[0] != video[0]).float().mean()), 1 - 32 * 32 / 64**2, rel_tol=1e-6)
