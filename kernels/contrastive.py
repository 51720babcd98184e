"""Video-text contrastive loss (ALPRO's VTC / InfoNCE): PyTorch reference and the single dispatch point.

ALPRO (``alpro_models.py``; LAVIS ``alpro_retrieval.py``): with L2-normalised 256-d features, local batch B on
each rank and features gathered from all ranks (with gradients)::

    sim_v2t = video_local @ text_all.T / temp      # (B, G)
    sim_t2v = text_local  @ video_all.T / temp     # (B, G)
    target  = arange(B) + rank_offset              # rank_offset = global_rank * B (not local_rank: §2.1 bug)
    loss    = (CE(sim_v2t, target) + CE(sim_t2v, target)) / 2

``temp`` is a learnable 0-d tensor; gradients flow to both features and ``temp``.
With one process ``video_all is video_local`` and ``rank_offset == 0``.

Backends (``backend=`` or :func:`set_contrastive_backend`):

- ``reference``: the formula above; materialises the (B, G) logits (several copies in the backward).
- ``chunked``: the same maths as ``logsumexp(logits) - positive`` per row, with the log-sum-exp computed by a
  custom autograd function over row chunks that recomputes each chunk in the backward: O(B*D + chunk*G)
  memory, any device. The positives are an O(B*D) product left to autograd.
- ``triton``: the same decomposition with fused kernels (:mod:`alpro.kernels.contrastive_triton`): no logit
  ever reaches memory. CUDA, or CPU under ``TRITON_INTERPRET=1``.
- ``auto`` (default): CUDA -> ``triton`` when installed (feature dim <= 256), else ``chunked``; CPU ->
  ``reference`` up to ``AUTO_CHUNKED_MIN_LOGITS`` logits per direction (ALPRO's 16 x 256 is tiny), ``chunked``
  beyond.

All paths accumulate in fp32 and return an fp32 loss; gradients reach ``temp`` in every path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alpro.kernels import triton_support

_BACKEND = "auto"
BACKENDS = ("auto", "reference", "chunked", "triton")
# Below this many logits per direction (16 MB in fp32) the reference is cheap and bit-compatible with ALPRO's
# formula; above it ``auto`` switches to the chunked path on CPU.
AUTO_CHUNKED_MIN_LOGITS = 1 << 22
CHUNK_LOGITS = 1 << 22  # logits held per chunk by the chunked path: rows = CHUNK_LOGITS // G


def set_contrastive_backend(name: str) -> None:
    """Process-wide default backend for :func:`contrastive_loss` (the model's config sets it at build time)."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown contrastive backend {name!r}; choose one of {BACKENDS}")
    _BACKEND = name


def get_contrastive_backend() -> str:
    return _BACKEND


# ----------------------------------------------------------------------------------------------- references


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


class _ChunkedSimilarityLSE(torch.autograd.Function):
    """``logsumexp_j(scale * x_i . y_j)`` over row chunks; the backward recomputes each chunk's probabilities.

    Peak memory is O((M + N) * D + chunk * N) instead of the reference's several (M, N) matrices. Everything
    is computed in fp32, or fp64 for fp64 inputs (CPU bf16 matmuls are slow and inaccurate anyway).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, chunk: int) -> torch.Tensor:  # type: ignore[override]
        acc = torch.promote_types(x.dtype, torch.float32)
        ya, sa = y.to(acc), scale.to(acc)
        lse = torch.empty(x.shape[0], device=x.device, dtype=acc)
        for i in range(0, x.shape[0], chunk):
            lse[i : i + chunk] = torch.logsumexp((x[i : i + chunk].to(acc) @ ya.t()).mul_(sa), dim=1)
        ctx.chunk = chunk
        ctx.save_for_backward(x, y, scale, lse)
        return lse

    @staticmethod
    def backward(ctx, dlse: torch.Tensor):  # type: ignore[override]
        x, y, scale, lse = ctx.saved_tensors
        acc = lse.dtype
        ya, sa = y.to(acc), scale.to(acc)
        dx = torch.empty(x.shape, device=x.device, dtype=acc)
        dy = torch.zeros(y.shape, device=y.device, dtype=acc)
        dscale = torch.zeros((), device=x.device, dtype=acc)
        for i in range(0, x.shape[0], ctx.chunk):
            x_c = x[i : i + ctx.chunk].to(acc)
            logits = x_c @ ya.t()  # (chunk, N), unscaled
            # P * dlse, built in place: two (chunk, N) buffers live at a time (logits and p)
            p = (logits * sa).sub_(lse[i : i + ctx.chunk, None]).exp_().mul_(dlse[i : i + ctx.chunk, None])
            dx[i : i + ctx.chunk] = p @ ya
            dy += p.t() @ x_c
            dscale += (p * logits).sum()
        return (dx * sa).to(x.dtype), (dy * sa).to(y.dtype), dscale.to(scale.dtype).reshape(scale.shape), None


def similarity_lse_chunked(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, D), (N, D), 0-d scale -> (M,) ``logsumexp_j(scale * x_i . y_j)`` in O(M*D + N*D) memory."""
    chunk = max(1, min(x.shape[0], CHUNK_LOGITS // max(1, y.shape[0])))
    return _ChunkedSimilarityLSE.apply(x, y, scale, chunk)


def _similarity_lse_triton(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from alpro.kernels import contrastive_triton  # lazy: defining the kernels fixes the interpreter mode

    return contrastive_triton.similarity_lse_op(x, y, scale)


def contrastive_loss_lse(
    video_feat: torch.Tensor,
    text_feat: torch.Tensor,
    video_all: torch.Tensor,
    text_all: torch.Tensor,
    temp: torch.Tensor,
    rank_offset: int,
    similarity_lse,
) -> torch.Tensor:
    """The reference's loss as ``mean(lse - positive)`` per direction, with the log-sum-exp from ``similarity_lse``."""
    B = video_feat.shape[0]
    acc = torch.promote_types(video_feat.dtype, torch.float32)  # fp32 accumulation (fp64 stays fp64)
    scale = 1.0 / temp.to(acc)
    pos_text = text_all[rank_offset : rank_offset + B].to(acc)  # the positive of row i is column i + rank_offset
    pos_video = video_all[rank_offset : rank_offset + B].to(acc)
    v2t = similarity_lse(video_feat, text_all, scale) - (video_feat.to(acc) * pos_text).sum(-1) * scale
    t2v = similarity_lse(text_feat, video_all, scale) - (text_feat.to(acc) * pos_video).sum(-1) * scale
    return (v2t.mean() + t2v.mean()) / 2


# ------------------------------------------------------------------------------------------------- dispatch


def _resolve(backend: str | None, video_feat: torch.Tensor, text_all: torch.Tensor) -> str:
    name = backend or _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"contrastive_loss: unknown backend {name!r}; choose one of {BACKENDS}")
    if name in ("auto", "triton"):
        err = triton_support.launch_error(video_feat, "contrastive_loss")
        if not err:
            from alpro.kernels import contrastive_triton

            err = contrastive_triton.check(video_feat, text_all)
        if name == "triton" and err:
            raise ValueError(err)
        if name == "auto":
            if video_feat.is_cuda:
                return "chunked" if err else "triton"
            large = video_feat.shape[0] * text_all.shape[0] > AUTO_CHUNKED_MIN_LOGITS
            return "chunked" if large else "reference"
    return name


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
    B, G = video_feat.shape[0], text_all.shape[0]
    if text_feat.shape[0] != B or video_all.shape[0] != G or not 0 <= rank_offset <= G - B:
        raise ValueError(
            f"contrastive_loss: local batches {B}/{text_feat.shape[0]}, gathered {G}/{video_all.shape[0]} "
            f"and rank_offset {rank_offset} do not fit (need equal sizes and 0 <= offset <= G - B)"
        )
    if not torch.is_tensor(temp):
        temp = torch.tensor(float(temp), device=video_feat.device)
    name = _resolve(backend, video_feat, text_all)
    if name == "reference":
        return contrastive_loss_reference(video_feat, text_feat, video_all, text_all, temp, rank_offset)
    lse = similarity_lse_chunked if name == "chunked" else _similarity_lse_triton
    return contrastive_loss_lse(video_feat, text_feat, video_all, text_all, temp, rank_offset, lse)


def local_similarity(video_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float) -> torch.Tensor:
    """The local (B, B) block ``video_local @ text_local.T / temp`` that VTM's hard-negative sampling needs.

    Never needs the global matrix: the local block of ``sim_v2t`` is exactly this, and that of ``sim_t2v`` is
    its transpose.
    """
    return video_feat @ text_feat.t() / temp
