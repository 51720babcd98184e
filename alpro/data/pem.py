"""PEM inputs (ALPRO.md §2.4 "Random crop"): one patch-aligned box per clip and what the prompter sees.

The box is drawn per sample in the worker (cheap, reproducible); the two derived tensors are built once per
batch where the batch is assembled (in the DataLoader worker; in the consumer for DALI batches): the patch mask
with one comparison and the crop input as fills around each box plus one copy of it, instead of a padded copy
per frame as in the original collator."""

from __future__ import annotations

import math

import numpy as np
import torch

from alpro.data.batch import CLIP_MEAN, CLIP_STD, batch_tensor
from alpro.data.config import PemConfig


def draw_box(rng: np.random.Generator, height: int, width: int, cfg: PemConfig) -> tuple[int, int, int, int]:
    """(top, left, h, w) as the original's ``random_erase``: area U(0.3, 0.5) of the frame, aspect U(0.3, 3.33),
    w = int(sqrt(s / r)), h = int(sqrt(s * r)), left/top uniform over the frame, all four snapped down to the
    patch grid, redrawn until the box fits. One guard the original lacks: a box that snaps to zero width or
    height is redrawn too (impossible at 224 with patch 16; possible at debug sizes)."""
    p = cfg.patch_size
    if height < p or width < p:
        raise ValueError(f"frame {height}x{width} is smaller than one {p}px patch")
    while True:
        s = rng.uniform(cfg.min_area, cfg.max_area) * height * width
        r = rng.uniform(cfg.min_aspect, cfg.max_aspect)
        w = int(math.sqrt(s / r))
        h = int(math.sqrt(s * r))
        left = int(rng.integers(0, width))
        top = int(rng.integers(0, height))
        w, h, left, top = w - w % p, h - h % p, left - left % p, top - top % p
        if w > 0 and h > 0 and left + w <= width and top + h <= height:
            return top, left, h, w


def patch_mask(boxes: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """(B, 4) boxes (top, left, h, w) -> (B, Hp*Wp) float32, 1 for patches inside the box (row-major grid)."""
    rows = torch.arange(height // patch) * patch  # (Hp,) top pixel of each patch row
    cols = torch.arange(width // patch) * patch
    top, left, h, w = (boxes[:, i, None] for i in range(4))  # each (B, 1)
    inside_r = (rows >= top) & (rows < top + h)  # (B, Hp)
    inside_c = (cols >= left) & (cols < left + w)  # (B, Wp)
    return (inside_r[:, :, None] & inside_c[:, None, :]).flatten(1).float()


def crop_video(video: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) normalised video -> the same with every pixel outside its box set to the normalised value
    of a 0 pixel (-mean/std), as the original zeroed [0, 255] frames before normalising.

    Built as fills of the strips around each box plus one copy of the box: the values ``torch.where`` over the
    whole batch would select, each pixel written once, a fraction of a masked select in the consumer process."""
    zero = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).to(video)
    fills = zero.tolist()  # the float32 values, exact as Python floats
    h, w = video.shape[-2:]
    out = batch_tensor(tuple(video.shape), video.device, video.dtype)  # shared memory inside a DataLoader worker
    for i, (top, left, bh, bw) in enumerate(boxes.tolist()):
        y0, y1 = min(max(top, 0), h), min(max(top + bh, 0), h)
        x0, x1 = min(max(left, 0), w), min(max(left + bw, 0), w)
        if y1 <= y0 or x1 <= x0:
            y0 = y1 = x0 = x1 = 0  # an empty box: every pixel is outside
        for c, value in enumerate(fills):  # every pixel is written once: the four strips around the box, then it
            plane = out[i, c]  # (T, H, W)
            plane[:, :y0].fill_(value)
            plane[:, y1:].fill_(value)
            plane[:, y0:y1, :x0].fill_(value)
            plane[:, y0:y1, x1:].fill_(value)
        out[i, :, :, y0:y1, x0:x1] = video[i, :, :, y0:y1, x0:x1]
    return out
