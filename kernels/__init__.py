"""Kernels with PyTorch references and one dispatch point per op (installed as ``alpro.kernels``).

The model calls only the functions exported here. Backends: ``alpro.kernels.attention`` (reference / sdpa /
triton / xformers) and ``alpro.kernels.contrastive`` (reference / chunked / triton); ``auto`` picks the Triton
kernels on CUDA and the fast exact PyTorch paths on CPU. The Triton modules (``attention_triton``,
``contrastive_triton``) are imported lazily, on first use, so ``TRITON_INTERPRET`` can still be chosen. See
docs/kernels.md.
"""

from alpro.kernels.attention import (
    get_attention_backend,
    set_attention_backend,
    spatial_attention,
    temporal_attention,
)
from alpro.kernels.contrastive import (
    contrastive_loss,
    get_contrastive_backend,
    local_similarity,
    set_contrastive_backend,
)

__all__ = [
    "temporal_attention",
    "spatial_attention",
    "set_attention_backend",
    "get_attention_backend",
    "contrastive_loss",
    "local_similarity",
    "set_contrastive_backend",
    "get_contrastive_backend",
]
