"""Kernels with PyTorch references and one dispatch point per op (installed as ``alpro.kernels``).

The model calls only the functions exported here.
"""

from alpro.kernels.attention import (
    get_attention_backend,
    set_attention_backend,
    spatial_attention,
    temporal_attention,
)
from alpro.kernels.contrastive import contrastive_loss, local_similarity, set_contrastive_backend

__all__ = [
    "temporal_attention",
    "spatial_attention",
    "set_attention_backend",
    "get_attention_backend",
    "contrastive_loss",
    "local_similarity",
    "set_contrastive_backend",
]
