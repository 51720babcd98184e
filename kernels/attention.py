"""Divided space-time attention (TimeSformer): PyTorch references and the single dispatch point.

Token layout (TimeSformer / ALPRO): a clip is ``[CLS, (n, t) for n in 0..N-1 for t in 0..T-1]`` -- space-major,
time innermost -- so patch ``(n, t)`` sits at row ``1 + n*T + t``. Both ops take the packed output of the
block's ``qkv`` Linear (q, k, v concatenated on the last dim, each split into heads) and return the attention
output *before* the ``proj`` Linear, in the same row layout, so the model never permutes or copies.

- ``temporal_attention(qkv (B, N*T, 3C))``: each spatial location attends over its T frames (CLS excluded;
  the caller passes only the patch rows). Returns (B, N*T, C).
- ``spatial_attention(qkv (B, 1+N*T, 3C))``: each frame t attends over ``[CLS, (0,t), ..., (N-1,t)]``; the CLS
  row is shared by (copied into) every frame. Returns ``(cls_out (B, T, C), patch_out (B, N*T, C))``.

Backends (``backend=`` or :func:`set_attention_backend`):

- ``reference``: explicit softmax, the TimeSformer maths, with the rearrange/cat copies.
- ``sdpa``: the same rearrangements around ``F.scaled_dot_product_attention``.
- ``triton``: fused kernels (:mod:`alpro.kernels.attention_triton`) that read ``qkv`` by strides. CUDA tensors,
  or CPU tensors when ``TRITON_INTERPRET=1`` was set before the first Triton call (slow; for tests).
- ``xformers``: ``memory_efficient_attention`` around the same rearrangements; CUDA only, imported lazily.
- ``auto`` (default): CUDA -> ``triton`` when installed and the shape is supported, else ``xformers`` when
  installed, else ``sdpa``; CPU -> ``sdpa``, never the interpreter. Measured fwd+bwd on 2 CPU cores, fp32,
  197 tokens, 12 x 64 heads (benchmarks/bench_kernels.py): temporal pass 2.8-3.8x faster than ``reference``,
  spatial pass within +-10%.

``deterministic`` (Triton only; the other paths ignore it): None follows
``torch.are_deterministic_algorithms_enabled()``. True pins one tile config per kernel on GPUs (autotuning picks by
timing, and another tile shape sums in another order) and makes the spatial backward atomic-free; the temporal
backward has no atomics in either mode.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from alpro.kernels import triton_support

_BACKEND = "auto"
BACKENDS = ("auto", "reference", "sdpa", "triton", "xformers")


def set_attention_backend(name: str) -> None:
    """Process-wide default backend for both attention ops (the model's config sets it at build time)."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _BACKEND = name


def get_attention_backend() -> str:
    return _BACKEND


# ----------------------------------------------------------------------------------------------- references


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, L, 3C) -> q, k, v each (G, H, L, Dh), as TimeSformer's Attention does."""
    G, L, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(G, L, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _attend_reference(qkv: torch.Tensor, num_heads: int, scale: float | None) -> torch.Tensor:
    """Softmax attention exactly as TimeSformer writes it. (G, L, 3C) -> (G, L, C)."""
    G, L, C3 = qkv.shape
    q, k, v = _split_heads(qkv, num_heads)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale  # (G, H, L, L)
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(G, L, C3 // 3)


def _attend_sdpa(qkv: torch.Tensor, num_heads: int, scale: float | None) -> torch.Tensor:
    G, L, C3 = qkv.shape
    q, k, v = _split_heads(qkv, num_heads)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (G, H, L, Dh)
    return o.transpose(1, 2).reshape(G, L, C3 // 3)


def _attend_xformers(qkv: torch.Tensor, num_heads: int, scale: float | None) -> torch.Tensor:
    """xformers takes (batch, seq, heads, head_dim): the qkv view itself, no permute."""
    import xformers.ops as xops

    G, L, C3 = qkv.shape
    q, k, v = qkv.reshape(G, L, 3, num_heads, C3 // (3 * num_heads)).unbind(2)  # each (G, L, H, Dh)
    return xops.memory_efficient_attention(q, k, v, scale=scale).reshape(G, L, C3 // 3)


_ATTEND = {"reference": _attend_reference, "sdpa": _attend_sdpa, "xformers": _attend_xformers}


def temporal_attention_reference(
    qkv: torch.Tensor, num_frames: int, num_heads: int, scale: float | None = None, *, attend=_attend_reference
) -> torch.Tensor:
    """(B, N*T, 3C) -> (B, N*T, C): attention within each run of T consecutive rows."""
    B, L, C3 = qkv.shape
    T = num_frames
    if L % T:
        raise ValueError(f"temporal_attention: {L} patch rows is not a multiple of T={T}")
    o = attend(qkv.reshape(B * (L // T), T, C3), num_heads, scale)  # (B*N, T, C)
    return o.reshape(B, L, C3 // 3)


def spatial_attention_reference(
    qkv: torch.Tensor, num_frames: int, num_heads: int, scale: float | None = None, *, attend=_attend_reference
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1+N*T, 3C) -> (cls_out (B, T, C), patch_out (B, N*T, C)): per-frame attention with CLS copied in."""
    B, L, C3 = qkv.shape
    T = num_frames
    if (L - 1) % T:
        raise ValueError(f"spatial_attention: {L} rows is not 1 + N*T for T={T}")
    N = (L - 1) // T
    cls = qkv[:, :1].unsqueeze(1).expand(B, T, 1, C3)  # (B, T, 1, 3C)
    patches = qkv[:, 1:].reshape(B, N, T, C3).transpose(1, 2)  # (B, T, N, 3C)
    seq = torch.cat([cls, patches], dim=2).reshape(B * T, 1 + N, C3)
    o = attend(seq, num_heads, scale).reshape(B, T, 1 + N, C3 // 3)
    cls_out = o[:, :, 0]  # (B, T, C)
    patch_out = o[:, :, 1:].transpose(1, 2).reshape(B, N * T, C3 // 3)  # back to (n, t) row order
    return cls_out, patch_out


# ------------------------------------------------------------------------------------------------- dispatch


def _xformers_installed() -> bool:
    return importlib.util.find_spec("xformers") is not None


def _triton_error(qkv: torch.Tensor, num_frames: int, num_heads: int, op: str) -> str | None:
    err = triton_support.launch_error(qkv, op)
    if err:
        return err
    from alpro.kernels import attention_triton  # lazy: defining the kernels fixes the interpreter mode

    return attention_triton.check(qkv, num_frames, num_heads, op)


def _resolve(backend: str | None, qkv: torch.Tensor, num_frames: int, num_heads: int, op: str) -> str:
    name = backend or _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"{op}: unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "auto":
        if qkv.is_cuda and triton_support.triton_installed() and not _triton_error(qkv, num_frames, num_heads, op):
            return "triton"
        if qkv.is_cuda and _xformers_installed():
            return "xformers"
        return "sdpa"
    if name == "triton":
        err = _triton_error(qkv, num_frames, num_heads, op)
        if err:
            raise ValueError(err)
    if name == "xformers" and not (qkv.is_cuda and _xformers_installed()):
        raise ValueError(f"{op}: backend 'xformers' needs the xformers package and a CUDA tensor (got {qkv.device})")
    return name


def temporal_attention(
    qkv: torch.Tensor,
    num_frames: int,
    num_heads: int,
    scale: float | None = None,
    backend: str | None = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Temporal half of divided space-time attention. See the module docstring for layouts."""
    name = _resolve(backend, qkv, num_frames, num_heads, "temporal_attention")
    if name == "triton":
        from alpro.kernels import attention_triton

        return attention_triton.temporal_attention(qkv, num_frames, num_heads, scale, deterministic)
    return temporal_attention_reference(qkv, num_frames, num_heads, scale, attend=_ATTEND[name])


def spatial_attention(
    qkv: torch.Tensor,
    num_frames: int,
    num_heads: int,
    scale: float | None = None,
    backend: str | None = None,
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial half of divided space-time attention. See the module docstring for layouts."""
    name = _resolve(backend, qkv, num_frames, num_heads, "spatial_attention")
    if name == "triton":
        from alpro.kernels import attention_triton

        return attention_triton.spatial_attention(qkv, num_frames, num_heads, scale, deterministic)
    return spatial_attention_reference(qkv, num_frames, num_heads, scale, attend=_ATTEND[name])
