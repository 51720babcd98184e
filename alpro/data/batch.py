"""The batch every loader yields and every model consumes.

Shapes use B = batch, C = 3 channels, T = frames, H, W = pixels, L = text length, Hp, Wp = patch grid.
Video is (B, C, T, H, W) -- the layout at the model boundary of the original and LAVIS -- float32, already
normalised with the CLIP mean/std. Images arrive as static clips: the frame tiled T times.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


_BY_VALUE = 1 << 16  # elements: tensors up to this size are pickled by value (tokens, masks, boxes, labels)
_NUMPY_DTYPES = (torch.int64, torch.int32, torch.float32, torch.bool)


@dataclass(frozen=True)
class _ByValue:
    array: np.ndarray


@dataclass
class Batch:
    type: Literal["video", "image"]  # batches are homogeneous; selects the prompter's prompt set
    keys: list[str]  # sample keys (B), as stored in the shards
    video: torch.Tensor  # (B, C, T, H, W) float32, CLIP-normalised
    input_ids: torch.Tensor  # (B, L) int64: caption (pre-train / retrieval) or question (QA), padded
    attention_mask: torch.Tensor  # (B, L) int64, 1 = real token
    texts: list[str] = field(default_factory=list)  # the raw caption / question behind input_ids (B)
    # Set only between a DataLoader worker and the loader's consumer (``data.augment_on: device``): ``video`` is
    # then (B, T, H, W, C) uint8 [0, 255], cropped, and each clip's RandAugment ops (None = padding) are still to
    # apply; ``Loader`` finishes the batch on the training device before yielding it, so models never see it.
    video_ops: list[tuple[str, ...] | None] | None = None

    # MLM (pre-training): the collator's 15% masking, 80/10/10.
    mlm_input_ids: torch.Tensor | None = None  # (B, L) int64, masked copy of input_ids
    mlm_labels: torch.Tensor | None = None  # (B, L) int64, original id at masked positions, -100 elsewhere

    # PEM (pre-training): one box per clip, the same in every frame, snapped to the patch grid.
    crop_video: torch.Tensor | None = None  # (B, C, T, H, W): video with all pixels outside the box set to
    #                                          the normalised value of a 0 pixel, i.e. -mean/std (as the original)
    pem_mask: torch.Tensor | None = None  # (B, Hp*Wp) float32: 1 = patch inside the box, 0 = outside
    #                                       (the original's `mpm_mask` is the complement: 1 - pem_mask)
    pem_box: torch.Tensor | None = None  # (B, 4) int64 (top, left, height, width) in pixels

    # QA
    answer_ids: torch.Tensor | None = None  # (B,) int64 index into the answer vocabulary, -100 if not in it
    answer_types: list[str] | None = None  # (B) e.g. 'color', 'shape', 'count', 'direction'
    answers: list[str] | None = None  # (B) raw answer strings

    # Evaluation: every caption of each clip (retrieval ground truth; DiDeMo paragraph mode joins them).
    all_texts: list[list[str]] | None = None

    # Evaluation batches: False for the padding that evens out the ranks' last batches and for clips that could
    # not be decoded (evaluation never substitutes a clip). Training batches are always full (bad samples are
    # replaced by the plan's next item, with DALI too: a failed DALI batch is re-decoded by PyAV): None.
    valid: torch.Tensor | None = None  # (B,) bool

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        """Small CPU tensors travel by value (as numpy arrays) when a DataLoader worker sends a batch: torch would
        give each its own shared-memory segment, handed over through one socket connection per tensor, which
        costs the consumer more than the bytes. The pixel tensors still travel as shared memory."""
        state = dict(self.__dict__)
        for name, value in state.items():
            if (torch.is_tensor(value) and value.device.type == "cpu" and value.numel() <= _BY_VALUE
                    and not value.requires_grad and value.dtype in _NUMPY_DTYPES):
                state[name] = _ByValue(value.numpy())
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: torch.from_numpy(v.array) if isinstance(v, _ByValue) else v
                              for k, v in state.items()})

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """Move every tensor field to ``device``; other fields are shared."""
        changes = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if torch.is_tensor(getattr(self, f.name))
        }
        return dataclasses.replace(self, **changes)


def batch_tensor(shape: tuple[int, ...], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty batch tensor. In a DataLoader worker a CPU tensor is allocated in shared memory right away, as
    torch's own collate does: sending it to the main process then passes a handle instead of copying the
    whole batch into a new shared segment first."""
    if torch.device(device).type == "cpu" and torch.utils.data.get_worker_info() is not None:
        numel = math.prod(shape)
        storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    return torch.empty(shape, dtype=dtype, device=device)


def pin_batch(batch: Batch) -> Batch:
    """Page-locked copies of the tensors a training step moves to the GPU (``data.pin_memory``)."""
    for name in ("video", "crop_video", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        value = getattr(batch, name)
        if value is not None:
            setattr(batch, name, value.pin_memory())
    return batch
