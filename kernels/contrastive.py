"""Video-text contrastive loss (ALPRO's VTC / InfoNCE): PyTorch reference and the single dispatch point.

ALPRO (``alpro_models.py``; LAVIS ``alpro_retrieval.py``): with L2-normalised 256-d features, local batch B on
each rank and features gathered from all ranks (with gradients)::

    sim_v2t = video_local @ text_all.T / temp      # (B, G)
    sim_t2v = text_local  @ video_all.T / temp     # (B, G)
    target  = arange(B) + rank_offset              # rank_offset = global_rank * B (not local_rank: §2.1 bug)
    loss    = (CE(sim_v2t, target) + CE(sim_t2v, target)) / 2

``temp`` is a learnable 0-d tensor; gradients flow to both features and ``temp``.
With one process ``video_all is video_local`` and ``rank_offset == 0``.

Backends: ``reference`` (materialises the (B, G) logits), plus ``chunked`` / ``triton`` (O(B*D) memory) in
:mod:`alpro.kernels` when available. ``auto`` picks per device and size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BACKEND = "auto"
BACKENDS = ("auto", "reference")


def set_contrastive_backend(name: str) -> None:
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown contrastive backend {name!r}; choose one of {BACKENDS}")
    _BACKEND = name


def contrastive_loss_reference(
    video_feat: torch.Tensor,
    text_feat: torch.Tensor,
    video_all: torch.Tensor,
    text_all: torch.Tensor,
    temp: torch.Tensor,
    rank_offset: int = 0,
) -> torch.Tensor:
    B = video_feat.shape[0]
    target = torch.arange(B, device=video_feat.device) + rank_offset
    sim_v2t = video_feat @ text_all.t() / temp
    sim_t2v = text_feat @ video_all.t() / temp
    return (F.cross_entropy(sim_v2t.float(), target) + F.cross_entropy(sim_t2v.float(), target)) / 2


def contrastive_loss(
    video_feat: torch.Tensor,
    text_feat: torch.Tensor,
    video_all: torch.Tensor | None = None,
    text_all: torch.Tensor | None = None,
    temp: torch.Tensor | float = 0.07,
    rank_offset: int = 0,
    backend: str | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over local rows x global columns. ``*_all`` default to the local features."""
    video_all = video_feat if video_all is None else video_all
    text_all = text_feat if text_all is None else text_all
    if not torch.is_tensor(temp):
        temp = torch.tensor(float(temp), device=video_feat.device)
    return contrastive_loss_reference(video_feat, text_feat, video_all, text_all, temp, rank_offset)


def local_similarity(video_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float) -> torch.Tensor:
    """The local (B, B) block ``video_local @ text_local.T / temp`` that VTM's hard-negative sampling needs.

    Never needs the global matrix: the local block of ``sim_v2t`` is exactly this, and that of ``sim_t2v`` is
    its transpose.
    """
    return video_feat @ text_feat.t() / temp
