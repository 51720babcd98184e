"""Fused similarity log-sum-exp in Triton: the O(B*D)-memory core of the video-text contrastive loss.

InfoNCE splits into a log-sum-exp over each row of the logit matrix and the positive logit (Inf-CL's
decomposition)::

    loss_v2t = mean_i( logsumexp_j(scale * v_i . t_j) - scale * v_i . t_{i+offset} )

The positives are a (B, D) product that autograd handles; the log-sum-exp is the part whose logits never
fit in memory at large batch. This module computes ``lse_i = logsumexp_j(scale * x_i . y_j)`` for local rows
``x (M, D)`` against global columns ``y (N, D)`` with an online max, so only (M,) floats are written:

- forward: one program per row block, looping over column blocks (online softmax, as in FlashAttention);
- backward: ``P = exp(scale * x y^T - lse) * dlse`` is recomputed tile by tile, twice: row blocks own
  ``dx = scale * P y`` and the per-row terms of ``dscale = sum(P * x y^T)``, column blocks own
  ``dy = scale * P^T x``. No atomics anywhere, so the backward is deterministic; the extra recompute costs
  one more pass over the (compute-bound at large B) logits.

The whole feature dim is one tile (``BLOCK_D = next_pow2(D)``, up to 256: ALPRO's projection dim), so each
score tile is a single ``tl.dot``. Calling the op twice (video rows x gathered text, text rows x gathered
video) gives the symmetric loss; with one process those are the row and column log-sum-exps of the same
matrix. :mod:`alpro.kernels.contrastive` assembles the loss and holds the PyTorch twins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from alpro.kernels.triton_support import (
    ARCHS,
    accumulator_dtype,
    device_arch,
    device_guard,
    dot_precision,
    launch,
    launch_error,
    matmul_dtype,
    tl_dtype,
)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E)
MAX_DIM = 256


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _lse_fwd_kernel(
    X, Y, SCALE, LSE,
    M, N, stride_x, stride_y, cols_per_split, stride_lse_split,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Row block x column split: the log-sum-exp of its rows over columns [split * cols_per_split, +cols_per_split)
    (one split: all columns, the final value; several: partial values the launcher combines)."""
    split = tl.program_id(1)
    col_start = split.to(tl.int64) * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    LSE += split.to(tl.int64) * stride_lse_split
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D)[None, :]
    x = tl.load(X + offs_m[:, None] * stride_x + offs_d[None, :], mask=(offs_m < M)[:, None] & d_ok, other=0.0)
    x = x.to(MM_DTYPE)
    scale2 = tl.load(SCALE).to(ACC_DTYPE) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    for start_n in range(col_start, col_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = offs_n < col_end
        y = tl.load(Y + offs_n[:, None] * stride_y + offs_d[None, :], mask=n_ok[:, None] & d_ok, other=0.0)
        s = tl.dot(x, tl.trans(y.to(MM_DTYPE)), input_precision=PRECISION) * scale2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite after the first tile (every split has >= 1 column)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(LSE + offs_m, (m_i + tl.log2(l_i)) / LOG2E, mask=offs_m < M)


@triton.jit
def _lse_bwd_dx_kernel(
    X, Y, SCALE, LSE, DLSE, DX, DSCALE_ROWS,
    M, N, stride_x, stride_y, stride_dx, cols_per_split, stride_dx_split, stride_ds_split,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dx for a row block over a column split, and per-row terms of dscale (both summed over splits by the
    launcher, in a fixed order)."""
    split = tl.program_id(1)
    col_start = split.to(tl.int64) * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    DX += split.to(tl.int64) * stride_dx_split
    DSCALE_ROWS += split.to(tl.int64) * stride_ds_split
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D)[None, :]
    m_ok = offs_m < M
    x = tl.load(X + offs_m[:, None] * stride_x + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
    x = x.to(MM_DTYPE)
    scale = tl.load(SCALE).to(ACC_DTYPE)
    lse2 = tl.load(LSE + offs_m, mask=m_ok, other=0.0) * LOG2E
    g = tl.load(DLSE + offs_m, mask=m_ok, other=0.0)  # 0 on padded rows: their P vanishes

    dx = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    dscale = tl.zeros([BLOCK_M], ACC_DTYPE)
    for start_n in range(col_start, col_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = offs_n < col_end
        y = tl.load(Y + offs_n[:, None] * stride_y + offs_d[None, :], mask=n_ok[:, None] & d_ok, other=0.0)
        y = y.to(MM_DTYPE)
        s = tl.dot(x, tl.trans(y), input_precision=PRECISION)  # raw x . y
        p = tl.exp2(s * (scale * LOG2E) - lse2[:, None]) * g[:, None]
        p = tl.where(n_ok[None, :], p, 0.0)
        dx += tl.dot(p.to(MM_DTYPE), y, input_precision=PRECISION)
        dscale += tl.sum(p * s, 1)
    tl.store(DX + offs_m[:, None] * stride_dx + offs_d[None, :], (dx * scale).to(DX.dtype.element_ty),
             mask=m_ok[:, None] & d_ok)  # fmt: skip
    tl.store(DSCALE_ROWS + offs_m, dscale, mask=m_ok)


@triton.jit
def _lse_bwd_dy_kernel(
    X, Y, SCALE, LSE, DLSE, DY,
    M, N, stride_x, stride_y, stride_dy,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dy for a column block; scores are computed transposed (columns x rows) so dy needs no transpose."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < D)[None, :]
    n_ok = offs_n < N
    y = tl.load(Y + offs_n[:, None] * stride_y + offs_d[None, :], mask=n_ok[:, None] & d_ok, other=0.0)
    y = y.to(MM_DTYPE)
    scale = tl.load(SCALE).to(ACC_DTYPE)

    dy = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    for start_m in range(0, M, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = offs_m < M
        x = tl.load(X + offs_m[:, None] * stride_x + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
        x = x.to(MM_DTYPE)
        lse2 = tl.load(LSE + offs_m, mask=m_ok, other=0.0) * LOG2E
        g = tl.load(DLSE + offs_m, mask=m_ok, other=0.0)
        pt = tl.exp2(tl.dot(y, tl.trans(x), input_precision=PRECISION) * (scale * LOG2E) - lse2[None, :])
        pt = tl.where(m_ok[None, :], pt * g[None, :], 0.0)
        dy += tl.dot(pt.to(MM_DTYPE), x, input_precision=PRECISION)
    tl.store(DY + offs_n[:, None] * stride_dy + offs_d[None, :], (dy * scale).to(DY.dtype.element_ty),
             mask=n_ok[:, None] & d_ok)  # fmt: skip


# ---------------------------------------------------------------------------------------------- tuning
# Not yet timed on a GPU (none on this project's machines). The whole feature dim is one tile, so tiles are sized
# by registers and shared memory; every list below is what ptxas compiles for sm_80 and sm_90 at D = 256 without
# spilling and within shared memory (`python -m alpro.kernels.compile_check`, asserted by
# tests/test_kernels_compile.py). Measured: 64 x 64 fp32 forward tiles with 3 stages need 192 KB on sm_80 (A100
# allows 163 KB); in the backward the (BLOCK, 256) fp32 accumulator is what spills -- 64 rows x 4 warps spill
# 64-840 B -- so the backward uses 8 warps or 32-row tiles. At large B the op is compute-bound
# (~b*B/(b+B) FLOP/B), where the 128-row forward tiles halve the column traffic per row.


def _configs(*specs: tuple[int, int, int, int]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> triton.Config list."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in specs]


def _same(table: dict) -> dict:
    return {arch: table for arch in ARCHS}


# "ieee": fp32 operands with the TF32 switch off (FMA dots): the wide lists spill 32-7120 B there, these do not.
LSE_FWD_CONFIGS = _same({
    "narrow": _configs((64, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 8, 2)),
    "wide": _configs((64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)),
    "ieee": _configs((32, 32, 8, 1), (64, 32, 8, 1), (32, 16, 4, 1), (16, 32, 4, 1)),
})
LSE_BWD_DX_CONFIGS = _same({
    "narrow": _configs((32, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2)),
    "wide": _configs((32, 32, 4, 2), (32, 32, 8, 2)),
    "ieee": _configs((16, 32, 8, 1), (32, 16, 8, 1), (32, 32, 8, 1), (16, 16, 4, 1)),
})
LSE_BWD_DY_CONFIGS = _same({
    "narrow": _configs((64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2)),
    "wide": _configs((32, 32, 4, 2), (64, 32, 8, 2)),
    "ieee": _configs((16, 32, 8, 1), (32, 16, 8, 1), (32, 32, 8, 1), (16, 16, 4, 1)),
})
TABLES = {"lse_fwd": LSE_FWD_CONFIGS, "lse_bwd_dx": LSE_BWD_DX_CONFIGS, "lse_bwd_dy": LSE_BWD_DY_CONFIGS}
KERNELS = {"lse_fwd": _lse_fwd_kernel, "lse_bwd_dx": _lse_bwd_dx_kernel, "lse_bwd_dy": _lse_bwd_dy_kernel}


def width_class(block_d: int, mm_dtype, precision: str = "tf32") -> str:
    """16-bit operands ("narrow"), TF32 operands ("wide") or IEEE fp32 operands ("ieee"); D <= 256 in each."""
    if mm_dtype == tl.float32:
        return "ieee" if precision == "ieee" else "wide"
    return "narrow"


def candidates(name: str, arch: int, meta: dict) -> list[triton.Config]:
    return TABLES[name][arch][width_class(meta["BLOCK_D"], meta["MM_DTYPE"], meta["PRECISION"])]


def _tuned(name: str):
    def prune(configs, named_args, **kwargs):
        return candidates(name, device_arch(named_args["X"]), kwargs)

    configs = [c for arch in ARCHS for width in TABLES[name][arch].values() for c in width]
    # PRECISION keyed: the TF32 switch changes the width class (Triton's key has the dtypes, not the constexprs)
    return triton.autotune(configs, key=["BLOCK_D", "PRECISION"], prune_configs_by={"early_config_prune": prune})(
        KERNELS[name]
    )


TUNED = {name: _tuned(name) for name in TABLES}
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}  # the one config used when interpreting


def _launch(name: str, grid, args: tuple, meta: dict, x: torch.Tensor) -> None:
    """Autotuned on GPUs; one pinned config when torch's deterministic flag is set (autotuning picks by timing,
    and other tiles sum the log-sum-exp and the gradients in another order)."""
    cands = candidates(name, device_arch(x), meta)
    launch(name, TUNED[name], KERNELS[name], grid, args, meta, cands, _INTERPRETER_CONFIG,
           pin=torch.are_deterministic_algorithms_enabled())  # fmt: skip


# ---------------------------------------------------------------------------------------------- launchers


def check(x: torch.Tensor, y: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on these features (None when they can). Used by the dispatch."""
    err = launch_error(x, "contrastive_loss")
    if err:
        return err
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        return f"contrastive_loss: features must be (M, D) and (N, D), got {tuple(x.shape)} and {tuple(y.shape)}"
    if x.shape[1] > MAX_DIM:
        return f"contrastive_loss: the Triton kernels support feature dims up to {MAX_DIM}, got {x.shape[1]}"
    return None


def _prepare(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    err = check(x, y)
    if err:
        raise ValueError(err)
    dtype = torch.promote_types(x.dtype, y.dtype)
    x, y = (t.to(dtype) if t.stride(-1) == 1 else t.to(dtype).contiguous() for t in (x, y))
    return x, y, scale.detach().reshape(1).to(accumulator_dtype(dtype))


def _meta(x: torch.Tensor) -> dict:
    mm = matmul_dtype(x.dtype)
    D = x.shape[1]
    return {"D": D, "BLOCK_D": max(16, triton.next_power_of_2(D)), "MM_DTYPE": tl_dtype(mm),
            "ACC_DTYPE": tl_dtype(accumulator_dtype(x.dtype)), "PRECISION": dot_precision(mm)}  # fmt: skip


# Column split of the forward and dx kernels (row blocks x column splits, partial results combined by the launcher
# in a fixed order). One program per row block leaves a GPU idle at ALPRO's local batch (16 rows: 1 program against
# 256 ... 32,768 gathered columns), so splitting the columns multiplies the programs. Default 1 (the simpler
# kernel, one pass, no partial buffers) until a GPU measures the split (gpu_check times both); "auto" aims at two
# programs per SM with >= MIN_COLS_PER_SPLIT columns each; an int fixes the number of splits.
_COLUMN_SPLIT: int | str = 1
MIN_COLS_PER_SPLIT = 512


def set_column_split(splits: int | str) -> None:
    """1 (default), an int > 1, or "auto". See the comment above."""
    global _COLUMN_SPLIT
    if splits != "auto" and (not isinstance(splits, int) or splits < 1):
        raise ValueError(f"column split must be a positive int or 'auto', got {splits!r}")
    _COLUMN_SPLIT = splits


def get_column_split() -> int | str:
    return _COLUMN_SPLIT


def column_splits(M: int, N: int, device: torch.device) -> int:
    """How many column splits the forward and dx kernels use for (M, D) rows against (N, D) columns."""
    if _COLUMN_SPLIT != "auto":
        return max(1, min(int(_COLUMN_SPLIT), N))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    row_programs = triton.cdiv(M, 64)
    return max(1, min(triton.cdiv(2 * sms, row_programs), N // MIN_COLS_PER_SPLIT))


def lse_forward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x, y, scale = _prepare(x, y, scale)
    M, N = x.shape[0], y.shape[0]
    splits = column_splits(M, N, x.device)
    per_split = triton.cdiv(N, splits)
    splits = triton.cdiv(N, per_split)  # no empty split
    # One split writes the final (M,) values; several write (splits, M) partial log-sum-exps combined below.
    lse = torch.empty(*((splits,) if splits > 1 else ()), M, device=x.device, dtype=accumulator_dtype(x.dtype))

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), splits

    with device_guard(x):
        _launch("lse_fwd", grid, (x, y, scale, lse, M, N, x.stride(0), y.stride(0), per_split,
                                  lse.stride(0) if splits > 1 else 0), _meta(x), x)  # fmt: skip
    return lse if splits == 1 else torch.logsumexp(lse, dim=0)


def lse_backward(
    dlse: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_dtype, y_dtype, scale_dtype = x.dtype, y.dtype, scale.dtype
    x, y, scale32 = _prepare(x, y, scale)
    acc = accumulator_dtype(x.dtype)
    dlse = dlse.to(acc).contiguous()
    M, N = x.shape[0], y.shape[0]
    splits = column_splits(M, N, x.device)
    per_split = triton.cdiv(N, splits)
    splits = triton.cdiv(N, per_split)
    # One split writes dx in the input dtype; several write fp32 partials summed below (fixed order).
    dx = torch.empty_like(x) if splits == 1 else torch.empty(splits, M, x.shape[1], device=x.device, dtype=acc)
    dy = torch.empty_like(y)
    dscale_rows = torch.empty(splits, M, device=x.device, dtype=acc)
    meta = _meta(x)
    dx_split_stride = 0 if splits == 1 else dx.stride(0)

    def grid_m(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), splits

    def grid_n(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]),)

    with device_guard(x):
        _launch("lse_bwd_dx", grid_m,
                (x, y, scale32, lse, dlse, dx, dscale_rows, M, N, x.stride(0), y.stride(0), dx.stride(-2), per_split,
                 dx_split_stride, dscale_rows.stride(0)), meta, x)  # fmt: skip
        _launch("lse_bwd_dy", grid_n,
                (x, y, scale32, lse, dlse, dy, M, N, x.stride(0), y.stride(0), dy.stride(0)), meta, x)  # fmt: skip
    if splits > 1:
        dx = dx.sum(0).to(x.dtype)
    dscale = dscale_rows.sum().to(scale_dtype).reshape(scale.shape)
    return dx.to(x_dtype), dy.to(y_dtype), dscale


# ----------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("alpro::similarity_lse", mutates_args=())
def similarity_lse_op(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, D), (N, D), 0-d scale -> (M,) ``logsumexp_j(scale * x_i . y_j)`` in fp32 (fp64 for fp64 inputs)."""
    return lse_forward(x, y, scale)


@similarity_lse_op.register_fake
def _(x, y, scale):
    return x.new_empty(x.shape[0], dtype=accumulator_dtype(torch.promote_types(x.dtype, y.dtype)))


@torch.library.custom_op("alpro::similarity_lse_backward", mutates_args=())
def similarity_lse_backward_op(
    dlse: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return lse_backward(dlse, x, y, scale, lse)


@similarity_lse_backward_op.register_fake
def _(dlse, x, y, scale, lse):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _grad(ctx, dlse):
    x, y, scale, lse = ctx.saved_tensors
    return similarity_lse_backward_op(dlse, x, y, scale, lse)


similarity_lse_op.register_autograd(_grad, setup_context=_setup)
