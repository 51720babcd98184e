"""Pixel transforms as the original (ALPRO.md §3.2, §5), drawn from explicit per-sample generators.

Every random choice is made by ``draw_*`` from a ``numpy.random.Generator`` seeded by (seed, epoch, sample),
and returned as plain data; ``apply_*`` is then a pure function of (pixels, params). That split is what makes
augmentation reproducible, resumable, and identical between the PyAV and DALI decoders.

Clip ops work on (T, C, H, W) float tensors in [0, 255] and treat all frames at once, so a temporally
consistent op is one batched call. Geometric ops reproduce the original's OpenCV calls (forward affine
matrix in pixel coordinates, bilinear, constant fill 128) with ``grid_sample``; the enhance ops follow the
PIL definitions the original's functions document.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from alpro.data.batch import CLIP_MEAN, CLIP_STD
from alpro.data.config import DataConfig

_FILL = 128.0  # the original's replace_value for geometric ops
_MAX_LEVEL = 10.0
_MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0
_STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0


@dataclass(frozen=True)
class ClipParams:
    """Augmentation of one video clip: crop position in the resized square, RandAugment ops (in order)."""

    crop: tuple[int, int] | None  # (top, left) of the frame_size crop; None = no crop (already frame_size)
    ops: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageParams:
    """Augmentation of one image: RandomResizedCrop box, flip, RandomAugment ops that passed their coin."""

    box: tuple[int, int, int, int] | None  # (top, left, height, width) in source pixels; None = resize whole
    flip: bool = False
    ops: tuple[str, ...] = ()


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """[0, 255] float (..., 3, H, W) -> CLIP-normalised, as the original's ImageNorm after /255."""
    return frames.sub(_MEAN.to(frames.device)).div_(_STD.to(frames.device))  # one new tensor, same two ops


# ------------------------------------------------------------------------------------------------ RandAugment


def _enhance_factor(magnitude: float) -> float:
    return magnitude / _MAX_LEVEL * 1.8 + 0.1


_GRIDS: dict[tuple, torch.Tensor] = {}


def _grid(forward: np.ndarray, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (1, H, W, 2) sampling grid of ``forward``, built once per (matrix, size, dtype, device): the ops'
    matrices are fixed by the magnitude, so a worker builds a handful of grids and reuses them for every clip
    (building one costs about as much as the grid_sample it feeds)."""
    key = (forward.tobytes(), h, w, dtype, str(device))
    grid = _GRIDS.get(key)
    if grid is None:
        full = np.vstack([forward, [0.0, 0.0, 1.0]])
        inv = torch.tensor(np.linalg.inv(full)[:2], dtype=torch.float64, device=device)  # (2, 3)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                                torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
        pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)  # (H, W, 3) homogeneous output pixels
        src = pts @ inv.T  # (H, W, 2) source pixel coordinates (x, y); float64 keeps integer shifts exact
        grid = torch.stack([2 * src[..., 0] / max(w - 1, 1) - 1, 2 * src[..., 1] / max(h - 1, 1) - 1], dim=-1)
        grid = grid.to(dtype).unsqueeze(0)
        if len(_GRIDS) >= 64:
            _GRIDS.clear()
        _GRIDS[key] = grid
    return grid


def _warp(frames: torch.Tensor, forward: np.ndarray) -> torch.Tensor:
    """cv2.warpAffine(frames, forward, borderValue=128) for (T, C, H, W): dst(p) = src(forward^-1 p), bilinear,
    pixel centres at integer coordinates."""
    t, c, h, w = frames.shape
    grid = _grid(forward, h, w, frames.dtype, frames.device).expand(t, h, w, 2)
    out = F.grid_sample(frames - _FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.add_(_FILL)


def _rotation(degrees: float, h: int, w: int) -> np.ndarray:
    """cv2.getRotationMatrix2D((w/2, h/2), degrees, 1): counter-clockwise on screen."""
    a, b = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    cx, cy = w / 2, h / 2
    return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


def _gray_mean(frames: torch.Tensor) -> torch.Tensor:
    """Per-frame mean of PIL's luma L = 0.299 R + 0.587 G + 0.114 B, shape (T, 1, 1, 1)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    return (frames * weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)


def _sharpness(frames: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ImageEnhance.Sharpness as the original: blend with a 3x3 smooth filter, borders left untouched."""
    if factor == 1.0:
        return frames
    kernel = torch.ones(3, 3, dtype=frames.dtype, device=frames.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(3, 1, 3, 3)
    degenerate = F.conv2d(frames, kernel, groups=3)  # (T, C, H-2, W-2): the interior
    out = frames.clone()
    out[..., 1:-1, 1:-1] = degenerate + factor * (frames[..., 1:-1, 1:-1] - degenerate)
    return out


def apply_op(frames: torch.Tensor, name: str, magnitude: float, frame_size: int) -> torch.Tensor:
    """One RandAugment op at ``magnitude`` (original scale 0..10) on (T, C, H, W) in [0, 255].

    Magnitudes are the original's deterministic ones (its random sign is commented out): shear 0.03*M,
    rotate 3*M degrees, translate M px at 224 -- scaled by frame_size / 224 here so that debug sizes keep the
    same relative shift (exactly M px at 224)."""
    h, w = frames.shape[-2:]
    level = magnitude / _MAX_LEVEL
    if name == "Identity":
        return frames
    if name == "HorizontalFlip":
        return frames.flip(-1)
    if name == "Brightness":
        factor = _enhance_factor(magnitude)
        if factor == 1.0:  # x * 1.0 == x exactly: skip a pass (the default magnitude 5 gives factor 1.0)
            return frames.clamp(0, 255)
        return (frames * factor).clamp(0, 255)
    if name == "Contrast":
        factor = _enhance_factor(magnitude)
        if factor == 1.0:
            return frames
        mean = _gray_mean(frames)
        return ((frames - mean) * factor + mean).clamp(0, 255)
    if name == "Sharpness":
        return _sharpness(frames, _enhance_factor(magnitude)).clamp(0, 255)
    if name == "ShearX":
        return _warp(frames, np.array([[1.0, level * 0.3, 0.0], [0.0, 1.0, 0.0]]))
    if name == "ShearY":
        return _warp(frames, np.array([[1.0, 0.0, 0.0], [level * 0.3, 1.0, 0.0]]))
    if name in ("TranslateX", "TranslateY"):
        offset = level * 10.0 * frame_size / 224.0
        dx, dy = (offset, 0.0) if name == "TranslateX" else (0.0, offset)
        return _warp(frames, np.array([[1.0, 0.0, -dx], [0.0, 1.0, -dy]]))
    if name == "Rotate":
        return _warp(frames, _rotation(level * 30.0, h, w))
    raise ValueError(f"unknown RandAugment op {name!r}")


# ------------------------------------------------------------------------------------------- clip transforms


class ClipTransform:
    """Video of one task and split: decode-time square resize, optional crop, optional RandAugment.

    Pre-training / prompter train: resize to ``resize`` (256 at 224) ignoring aspect, one random
    ``frame_size`` crop for all frames, TemporalConsistentRandomAugment(2, 5). Their evaluation: the centre
    crop. Retrieval / QA: resize straight to ``frame_size``; RandAugment in QA training (and in retrieval
    training if ``randaugment.retrieval``)."""

    def __init__(self, cfg: DataConfig, task: str, train: bool):
        self.frame_size = cfg.frame_size
        self.resize = cfg.resize_for(task)
        self.train = train
        ra = cfg.randaugment
        use = ra.video and (task in ("pretrain", "prompter", "qa") or (task == "retrieval" and ra.retrieval))
        self.ops = list(ra.ops) if (train and use) else []
        self.num_ops = ra.num_ops if self.ops else 0
        self.magnitude = ra.magnitude

    def draw(self, rng: np.random.Generator) -> ClipParams:
        crop = None
        if self.resize > self.frame_size:
            margin = self.resize - self.frame_size
            crop = (int(rng.integers(0, margin + 1)), int(rng.integers(0, margin + 1))) if self.train else (
                margin // 2, margin // 2)
        ops = tuple(str(o) for o in rng.choice(self.ops, size=self.num_ops, replace=False)) if self.num_ops else ()
        return ClipParams(crop=crop, ops=ops)

    def apply(self, frames: torch.Tensor, params: ClipParams) -> torch.Tensor:
        """(T, C, resize, resize) uint8 or float [0, 255] -> (T, C, S, S) float32 CLIP-normalised."""
        # Crop first: only the kept pixels are converted (the same values). A non-contiguous input (DALI's
        # channels-last frames) keeps the old order so that every op sees the memory layout it always saw.
        if not frames.is_contiguous():
            frames = frames.float()
        return self.finish(self.crop(frames, params), params.ops)

    def crop(self, frames: torch.Tensor, params: ClipParams) -> torch.Tensor:
        """The ``frame_size`` crop of (T, C, resize, resize) frames: a view, same dtype."""
        if params.crop is None:
            return frames
        top, left = params.crop
        return frames[..., top : top + self.frame_size, left : left + self.frame_size]

    def crop_hwc(self, frames: torch.Tensor, params: ClipParams) -> torch.Tensor:
        """:meth:`crop` of channels-last (T, resize, resize, C) frames."""
        if params.crop is None:
            return frames
        top, left = params.crop
        return frames[:, top : top + self.frame_size, left : left + self.frame_size]

    def finish(self, frames: torch.Tensor, ops: tuple[str, ...]) -> torch.Tensor:
        """Cropped (T, C, S, S) [0, 255] frames -> float32, RandAugment ``ops`` in order, CLIP-normalised."""
        return finish_clip(frames, ops, self.magnitude, self.frame_size)


def finish_clip(frames: torch.Tensor, ops: tuple[str, ...], magnitude: float, frame_size: int) -> torch.Tensor:
    """(T, C, S, S) [0, 255] -> (T, C, S, S) float32: the clip's RandAugment ops in order, then normalised.
    The ops see the layout of ``frames.float()`` (the crop of contiguous frames converts to contiguous)."""
    frames = frames.float()
    for name in ops:
        frames = apply_op(frames, name, magnitude, frame_size)
    return normalize(frames)


def finish_batch(video: torch.Tensor, ops: list[tuple[str, ...] | None], magnitude: float,
                 frame_size: int) -> torch.Tensor:
    """A batch the loader left unfinished (``data.augment_on: device``): (B, T, S, S, C) uint8 [0, 255] as decoded
    and each clip's ops (None = a padding row) -> (B, C, T, S, S) float32 CLIP-normalised on ``video``'s device,
    every clip exactly as :meth:`ClipTransform.apply` would have made it (padding rows are 0, as the loader's)."""
    b, t, h, w, c = video.shape
    out = torch.empty((b, c, t, h, w), dtype=torch.float32, device=video.device)
    for i, names in enumerate(ops):
        if names is None:
            out[i].zero_()
        else:
            clip = video[i].permute(0, 3, 1, 2).contiguous()  # (T, C, S, S), the layout of the loader's crop
            out[i].copy_(finish_clip(clip, names, magnitude, frame_size).transpose(0, 1))
    return out


class ImageTransform:
    """Pre-training images (ALPRO.md §3.2): RandomResizedCrop(frame_size, scale (0.2, 1), bicubic), horizontal
    flip, RandomAugment(2, 7) with each op applied with p=0.5, then tiled to the clip length by the caller.
    Evaluation (or ``randaugment.image: false``): a plain bicubic resize to frame_size."""

    def __init__(self, cfg: DataConfig, train: bool):
        ra = cfg.randaugment
        self.frame_size = cfg.frame_size
        self.augment = train and ra.image
        self.ops = list(ra.image_ops)
        self.num_ops, self.magnitude, self.op_prob = ra.image_num_ops, ra.image_magnitude, ra.image_op_prob
        self.min_scale = ra.image_min_scale

    def draw(self, rng: np.random.Generator, height: int, width: int) -> ImageParams:
        if not self.augment:
            return ImageParams(box=None)
        box = _resized_crop_box(rng, height, width, (self.min_scale, 1.0), (3 / 4, 4 / 3))
        flip = bool(rng.random() < 0.5)
        names = rng.choice(self.ops, size=self.num_ops, replace=True) if self.num_ops else []
        ops = tuple(str(n) for n in names if rng.random() <= self.op_prob)
        return ImageParams(box=box, flip=flip, ops=ops)

    def apply(self, image: torch.Tensor, params: ImageParams) -> torch.Tensor:
        """(C, H, W) uint8 -> (1, C, S, S) float32 CLIP-normalised."""
        size = [self.frame_size, self.frame_size]
        if params.box is None:
            out = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        else:
            top, left, h, w = params.box
            out = TF.resized_crop(image, top, left, h, w, size, interpolation=InterpolationMode.BICUBIC,
                                  antialias=True)
        out = out.float().clamp(0, 255).unsqueeze(0)
        if params.flip:
            out = out.flip(-1)
        for name in params.ops:
            out = apply_op(out, name, self.magnitude, self.frame_size)
        return normalize(out)


def _resized_crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with an explicit generator: 10 tries at a random area and
    log-uniform aspect, then the centre crop clamped to the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
