"""Fused divided space-time attention in Triton: kernels -> launchers -> ``torch.library`` custom ops.

Both passes read q, k and v straight from the packed ``qkv`` Linear output ``(B, L, 3C)`` by strides (column
``h*Dh`` for q, ``C + h*Dh`` for k, ``2C + h*Dh`` for v, i.e. TimeSformer's ``reshape(B, L, 3, H, Dh)``) and
write the attention output in the same row order, so the model never permutes, concatenates or copies.
Layouts are described in :mod:`alpro.kernels.attention`, whose PyTorch references these kernels must match.

Temporal pass (each spatial location over its T frames). The groups are runs of T consecutive rows, so a tile
of ``BLOCK_M`` rows holds ``BLOCK_M // T`` whole groups and attention inside the tile is block-diagonal: one
``BLOCK_M x BLOCK_M`` score tile, masked to ``row // T == col // T``, covers every key of every query in it.
``tl.dot`` needs tiles of at least 16, and T is 1..32 in practice; packing groups keeps the tensor cores fed
(most of the masked products are wasted, but they are ~0.1% of the model's FLOPs and the pass is bound by
memory traffic: 3 reads + 1 write of each element). A single tile also means no online softmax, no saved
log-sum-exp and a backward in one program per tile with no atomics: deterministic by construction.

Spatial pass (per frame t: ``[CLS, (0,t), ..., (N-1,t)]``, CLS shared by all frames). Sequence position 0 is
the clip's CLS row, position p >= 1 is row ``1 + (p-1)*T + t``; rows are gathered by that index arithmetic.
FlashAttention-2 forward (online softmax, log2-domain log-sum-exp saved per row) with masked tiles, so any
token count works (197 = 1 + 14*14). Backward, two variants:

- ``deterministic=True``: a dQ kernel (query tile stationary) and a dK/dV kernel (key tile stationary), each
  owning its outputs; the CLS row, used by all T frames, gets per-frame partial gradients in a small
  ``(B, T, 3C)`` fp32 buffer summed afterwards in a fixed order. Bitwise reproducible.
- ``deterministic=False`` (default unless ``torch.use_deterministic_algorithms(True)``): one dK/dV kernel that
  also adds each tile's dQ contribution with fp32 atomics, so scores are recomputed once instead of twice.

Grids put the large index (groups x tiles) on axis 0 (limit 2**31-1) and heads on axis 1 (limit 65535), and
the batch offset is 64-bit, so B*T*H far beyond 65535 launches (a known failure of (batch*heads)-on-axis-1
grids). Accumulation is fp32 for every input dtype; P and dS are cast to the input dtype before their
matmuls as in FlashAttention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from alpro.kernels.triton_support import (
    ARCHS,
    accumulator_dtype,
    deterministic_requested,
    device_arch,
    device_guard,
    dot_precision,
    interpreting,
    launch,
    launch_error,
    matmul_dtype,
    tf32_enabled,
    tl_dtype,
)

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * LOG2E)
MAX_HEAD_DIM = 128
MAX_TEMPORAL_FRAMES = 64  # a tile holds whole groups; the largest tile every temporal config list has is 64


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _temporal_fwd_kernel(
    QKV, OUT,
    stride_qkv_b, stride_qkv_l, stride_o_b, stride_o_l,
    L, T, C, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows_per_tile = (BLOCK_M // T) * T  # whole groups only
    tiles = tl.cdiv(L, rows_per_tile)
    pid = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    b = pid // tiles
    offs_i = tl.arange(0, BLOCK_M)
    rows = (pid % tiles) * rows_per_tile + offs_i
    offs_d = tl.arange(0, BLOCK_D)
    mask = ((offs_i < rows_per_tile) & (rows < L))[:, None] & (offs_d < HEAD_DIM)[None, :]

    qkv = QKV + b * stride_qkv_b + rows[:, None] * stride_qkv_l + h * HEAD_DIM + offs_d[None, :]
    q = tl.load(qkv, mask=mask, other=0.0).to(MM_DTYPE)
    k = tl.load(qkv + C, mask=mask, other=0.0).to(MM_DTYPE)
    v = tl.load(qkv + 2 * C, mask=mask, other=0.0).to(MM_DTYPE)

    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (sm_scale * LOG2E)  # log2 domain
    # Block-diagonal mask. The diagonal is always kept, so padded rows never produce NaN.
    s = tl.where((offs_i[:, None] // T) == (offs_i[None, :] // T), s, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    o = tl.dot(p.to(MM_DTYPE), v, input_precision=PRECISION) / tl.sum(p, 1)[:, None]

    o_ptrs = OUT + b * stride_o_b + rows[:, None] * stride_o_l + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _temporal_bwd_kernel(
    QKV, DO, DQKV,
    stride_qkv_b, stride_qkv_l, stride_do_b, stride_do_l, stride_dqkv_b, stride_dqkv_l,
    L, T, C, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows_per_tile = (BLOCK_M // T) * T
    tiles = tl.cdiv(L, rows_per_tile)
    pid = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    b = pid // tiles
    offs_i = tl.arange(0, BLOCK_M)
    rows = (pid % tiles) * rows_per_tile + offs_i
    offs_d = tl.arange(0, BLOCK_D)
    mask = ((offs_i < rows_per_tile) & (rows < L))[:, None] & (offs_d < HEAD_DIM)[None, :]
    col = h * HEAD_DIM + offs_d[None, :]

    qkv = QKV + b * stride_qkv_b + rows[:, None] * stride_qkv_l + col
    q = tl.load(qkv, mask=mask, other=0.0).to(MM_DTYPE)
    k = tl.load(qkv + C, mask=mask, other=0.0).to(MM_DTYPE)
    v = tl.load(qkv + 2 * C, mask=mask, other=0.0).to(MM_DTYPE)
    do = tl.load(DO + b * stride_do_b + rows[:, None] * stride_do_l + col, mask=mask, other=0.0).to(MM_DTYPE)

    # Recompute the whole (block-diagonal) softmax: every key of every query is in this tile.
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (sm_scale * LOG2E)
    s = tl.where((offs_i[:, None] // T) == (offs_i[None, :] // T), s, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]

    dv = tl.dot(tl.trans(p).to(MM_DTYPE), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None])  # rowsum(P * dP) == rowsum(dO * O): no need to load O
    dq = tl.dot(ds.to(MM_DTYPE), k, input_precision=PRECISION) * sm_scale
    dk = tl.dot(tl.trans(ds).to(MM_DTYPE), q, input_precision=PRECISION) * sm_scale

    dqkv = DQKV + b * stride_dqkv_b + rows[:, None] * stride_dqkv_l + col
    tl.store(dqkv, dq.to(DQKV.dtype.element_ty), mask=mask)
    tl.store(dqkv + C, dk.to(DQKV.dtype.element_ty), mask=mask)
    tl.store(dqkv + 2 * C, dv.to(DQKV.dtype.element_ty), mask=mask)


@triton.jit
def _frame_rows(pos, t, T):
    """Spatial sequence position -> token row: 0 is the clip's CLS, p >= 1 is patch p-1 of frame t."""
    return tl.where(pos == 0, 0, 1 + (pos - 1) * T + t)


@triton.jit
def _load_frame_rows(CLS, PATCH, stride_cls_t, stride_patch_l, pos, t, T, S, col, d_ok):
    """Rows of a (cls (T, C), patch (N*T, C)) pair in spatial sequence order: CLS copy of frame t, then patches."""
    is_cls = (pos == 0)[:, None] & d_ok[None, :]
    is_patch = ((pos > 0) & (pos < S))[:, None] & d_ok[None, :]
    x = tl.load(CLS + (t + pos * 0)[:, None] * stride_cls_t + col, mask=is_cls, other=0.0)
    x += tl.load(PATCH + ((pos - 1) * T + t)[:, None] * stride_patch_l + col, mask=is_patch, other=0.0)
    return x


@triton.jit
def _spatial_fwd_step(q, qkv, start_n, t, T, S, C, col, d_ok, stride_qkv_l, qk_scale, m_i, l_i, acc,
                      WIDTH: tl.constexpr, MM_DTYPE: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """One key tile of ``WIDTH`` columns of the online softmax (the tail-tile variant's body)."""
    offs_n = start_n + tl.arange(0, WIDTH)
    kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
    kv = qkv + _frame_rows(offs_n, t, T)[:, None] * stride_qkv_l + col
    k = tl.load(kv + C, mask=kv_mask, other=0.0).to(MM_DTYPE)
    v = tl.load(kv + 2 * C, mask=kv_mask, other=0.0).to(MM_DTYPE)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where((offs_n < S)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(MM_DTYPE), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _spatial_fwd_kernel(
    QKV, CLS_O, PATCH_O, LSE,
    stride_qkv_b, stride_qkv_l, stride_cls_b, stride_cls_t, stride_patch_b, stride_patch_l,
    T, S, C, H, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, TAIL_N: tl.constexpr = 0,
):  # fmt: skip
    """TAIL_N = 0: key tiles of BLOCK_N up to S (the last one masked). TAIL_N > 0 (opt-in, ``set_tail_tiles``):
    whole BLOCK_N tiles, then the remainder in narrower TAIL_N tiles (197 keys at 64: 192 + 16, not 256)."""
    m_tiles = tl.cdiv(S, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    g = pid // m_tiles  # frame group = b*T + t
    b = g // T
    t = g % T
    offs_m = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col = h * HEAD_DIM + offs_d[None, :]
    qk_scale = sm_scale * LOG2E

    qkv = QKV + b * stride_qkv_b
    q_mask = (offs_m < S)[:, None] & d_ok[None, :]
    q = tl.load(qkv + _frame_rows(offs_m, t, T)[:, None] * stride_qkv_l + col, mask=q_mask, other=0.0)
    q = q.to(MM_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    if TAIL_N == 0:
        for start_n in range(0, S, BLOCK_N):  # m_i finite after the first tile: it always holds the CLS key
            m_i, l_i, acc = _spatial_fwd_step(q, qkv, start_n, t, T, S, C, col, d_ok, stride_qkv_l, qk_scale, m_i,
                                              l_i, acc, BLOCK_N, MM_DTYPE, PRECISION)  # fmt: skip
    else:
        s_full = (S // BLOCK_N) * BLOCK_N
        for start_n in range(0, s_full, BLOCK_N):
            m_i, l_i, acc = _spatial_fwd_step(q, qkv, start_n, t, T, S, C, col, d_ok, stride_qkv_l, qk_scale, m_i,
                                              l_i, acc, BLOCK_N, MM_DTYPE, PRECISION)  # fmt: skip
        for start_n in range(s_full, S, TAIL_N):  # the first tile processed holds the CLS key either way
            m_i, l_i, acc = _spatial_fwd_step(q, qkv, start_n, t, T, S, C, col, d_ok, stride_qkv_l, qk_scale, m_i,
                                              l_i, acc, TAIL_N, MM_DTYPE, PRECISION)  # fmt: skip

    o = (acc / l_i[:, None]).to(CLS_O.dtype.element_ty)
    is_cls = (offs_m == 0)[:, None] & d_ok[None, :]
    is_patch = ((offs_m > 0) & (offs_m < S))[:, None] & d_ok[None, :]
    tl.store(CLS_O + b * stride_cls_b + (t + offs_m * 0)[:, None] * stride_cls_t + col, o, mask=is_cls)
    patch_rows = (offs_m - 1) * T + t
    tl.store(PATCH_O + b * stride_patch_b + patch_rows[:, None] * stride_patch_l + col, o, mask=is_patch)
    tl.store(LSE + (g * H + h) * S + offs_m, m_i + tl.log2(l_i), mask=offs_m < S)  # log2-domain LSE


@triton.jit
def _spatial_bwd_dq_kernel(
    QKV, CLS_O, PATCH_O, DCLS, DPATCH, LSE, DELTA, DQKV, CLS_GRAD,
    stride_qkv_b, stride_qkv_l, stride_cls_b, stride_cls_t, stride_patch_b, stride_patch_l,
    stride_dcls_b, stride_dcls_t, stride_dpatch_b, stride_dpatch_l, stride_dqkv_b, stride_dqkv_l,
    T, S, C, H, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    COMPUTE_DQ: tl.constexpr, MM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Delta = rowsum(dO * O) for a query tile, then (if COMPUTE_DQ) its dQ over all keys."""
    m_tiles = tl.cdiv(S, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    g = pid // m_tiles
    b = g // T
    t = g % T
    offs_m = (pid % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col = h * HEAD_DIM + offs_d[None, :]

    o = _load_frame_rows(CLS_O + b * stride_cls_b, PATCH_O + b * stride_patch_b, stride_cls_t, stride_patch_l,
                         offs_m, t, T, S, col, d_ok).to(ACC_DTYPE)  # fmt: skip
    do = _load_frame_rows(DCLS + b * stride_dcls_b, DPATCH + b * stride_dpatch_b, stride_dcls_t, stride_dpatch_l,
                          offs_m, t, T, S, col, d_ok)  # fmt: skip
    delta = tl.sum(do.to(ACC_DTYPE) * o, 1)
    row_stat = (g * H + h) * S + offs_m
    tl.store(DELTA + row_stat, delta, mask=offs_m < S)
    if COMPUTE_DQ:
        qk_scale = sm_scale * LOG2E
        qkv = QKV + b * stride_qkv_b
        q_mask = (offs_m < S)[:, None] & d_ok[None, :]
        q = tl.load(qkv + _frame_rows(offs_m, t, T)[:, None] * stride_qkv_l + col, mask=q_mask, other=0.0)
        q = q.to(MM_DTYPE)
        do = do.to(MM_DTYPE)
        lse = tl.load(LSE + row_stat, mask=offs_m < S, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
        for start_n in range(0, S, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
            kv = qkv + _frame_rows(offs_n, t, T)[:, None] * stride_qkv_l + col
            k = tl.load(kv + C, mask=kv_mask, other=0.0).to(MM_DTYPE)
            v = tl.load(kv + 2 * C, mask=kv_mask, other=0.0).to(MM_DTYPE)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
            p = tl.where((offs_n < S)[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(MM_DTYPE), k, input_precision=PRECISION)
        dq *= sm_scale
        # Patch queries own their row; the CLS query of frame t writes its partial gradient to CLS_GRAD[b, t].
        is_patch = ((offs_m > 0) & (offs_m < S))[:, None] & d_ok[None, :]
        dq_rows = DQKV + b * stride_dqkv_b + _frame_rows(offs_m, t, T)[:, None] * stride_dqkv_l + col
        tl.store(dq_rows, dq.to(DQKV.dtype.element_ty), mask=is_patch)
        cls_grad = CLS_GRAD + (g * 3 * C + offs_m * 0)[:, None] + col
        tl.store(cls_grad, dq, mask=(offs_m == 0)[:, None] & d_ok[None, :])


@triton.jit
def _spatial_bwd_dkdv_kernel(
    QKV, DCLS, DPATCH, LSE, DELTA, DQKV, CLS_GRAD, DQ_ACC,
    stride_qkv_b, stride_qkv_l, stride_dcls_b, stride_dcls_t, stride_dpatch_b, stride_dpatch_l,
    stride_dqkv_b, stride_dqkv_l, stride_dq_b, stride_dq_l,
    T, S, C, H, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, MM_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dK and dV of a key tile over all queries; with ATOMIC_DQ also adds dQ into the fp32 DQ_ACC."""
    n_tiles = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    g = pid // n_tiles
    b = g // T
    t = g % T
    offs_n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col = h * HEAD_DIM + offs_d[None, :]
    qk_scale = sm_scale * LOG2E

    qkv = QKV + b * stride_qkv_b
    kv_mask = (offs_n < S)[:, None] & d_ok[None, :]
    kv = qkv + _frame_rows(offs_n, t, T)[:, None] * stride_qkv_l + col
    k = tl.load(kv + C, mask=kv_mask, other=0.0).to(MM_DTYPE)
    v = tl.load(kv + 2 * C, mask=kv_mask, other=0.0).to(MM_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    for start_m in range(0, S, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < S
        rows_m = _frame_rows(offs_m, t, T)
        q = tl.load(qkv + rows_m[:, None] * stride_qkv_l + col, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        q = q.to(MM_DTYPE)
        do = _load_frame_rows(DCLS + b * stride_dcls_b, DPATCH + b * stride_dpatch_b, stride_dcls_t,
                              stride_dpatch_l, offs_m, t, T, S, col, d_ok).to(MM_DTYPE)  # fmt: skip
        row_stat = (g * H + h) * S + offs_m
        lse = tl.load(LSE + row_stat, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row_stat, mask=m_ok, other=0.0)
        # Transposed scores (keys x queries) so dK and dV come out without transposing the accumulators.
        pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        pt = tl.where(m_ok[None, :], pt, 0.0)
        dv += tl.dot(pt.to(MM_DTYPE), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(MM_DTYPE), q, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dst).to(MM_DTYPE), k, input_precision=PRECISION) * sm_scale
            dq_ptrs = DQ_ACC + b * stride_dq_b + rows_m[:, None] * stride_dq_l + col
            tl.atomic_add(dq_ptrs, dq, mask=m_ok[:, None] & d_ok[None, :])
    dk *= sm_scale

    is_patch = ((offs_n > 0) & (offs_n < S))[:, None] & d_ok[None, :]
    dkv = DQKV + b * stride_dqkv_b + _frame_rows(offs_n, t, T)[:, None] * stride_dqkv_l + col
    tl.store(dkv + C, dk.to(DQKV.dtype.element_ty), mask=is_patch)
    tl.store(dkv + 2 * C, dv.to(DQKV.dtype.element_ty), mask=is_patch)
    is_cls = (offs_n == 0)[:, None] & d_ok[None, :]
    cls_grad = CLS_GRAD + (g * 3 * C + offs_n * 0)[:, None] + col
    tl.store(cls_grad + C, dk, mask=is_cls)
    tl.store(cls_grad + 2 * C, dv, mask=is_cls)


# ---------------------------------------------------------------------------------------------- tuning
# Nothing here was timed on a GPU yet (this project's machines have none). Candidates follow the FlashAttention
# Triton kernels' choices for head dims <= 128; each list was then cut, per architecture, to the configs that
# ptxas compiles without spilling registers and within shared memory *as a launch builds them* (Triton
# specialises the integer arguments of a real call: C = 768 and strides divisible by 16),
# measured with `python -m alpro.kernels.compile_check` (tests/test_kernels_compile.py keeps asserting it). Two
# width classes: "narrow" (16-bit operands, head dim <= 64: ALPRO) and "wide" (fp32 operands or head dim 128),
# each compiled at its worst case (bf16/64 and fp32/128). `benchmarks/gpu_check.py` times them where a GPU exists.
# The first config of each list is the one deterministic runs pin.


def _configs(*specs: tuple[int, ...]) -> list[triton.Config]:
    """(BLOCK_M, num_warps, num_stages) or (BLOCK_M, BLOCK_N, num_warps, num_stages) -> triton.Config list."""
    names = ("BLOCK_M",) if len(specs[0]) == 3 else ("BLOCK_M", "BLOCK_N")
    return [triton.Config(dict(zip(names, spec)), num_warps=spec[-2], num_stages=spec[-1]) for spec in specs]


def _same(table: dict) -> dict:
    """One list for both architecture families."""
    return {arch: table for arch in ARCHS}


# Three width classes: "narrow" (16-bit operands, head dim <= 64: ALPRO in bf16/fp16), "wide" (TF32 operands or
# head dim 128) and "ieee" (fp32 operands with the TF32 switch off: the exact-reproduction knob; FMA-based dots
# need far more registers, so only small tiles compile without spills there). Each is compiled at its worst case:
# bf16 / 64, fp32-tf32 / 128 and fp32-ieee / 128.
#
# Temporal: one tile per program and no K loop, so num_stages=1 (nothing to pipeline). Small tiles waste fewer
# block-diagonal products (T=8: 12.5% of a 64-row tile's scores are used, 6% of a 128-row one) but launch more
# programs. Measured spills: 128 rows spill in the narrow backward on sm_80 (576 B) and in both wide passes; in
# IEEE fp32 every 32-row backward tile spills (208-1600 B), so IEEE fp32 supports T <= 16.
TEMPORAL_FWD_CONFIGS = _same({
    "narrow": _configs((32, 4, 1), (64, 4, 1), (128, 8, 1)),
    "wide": _configs((32, 4, 1), (64, 8, 1)),
    "ieee": _configs((16, 4, 1), (16, 8, 1), (32, 8, 1)),
})
TEMPORAL_BWD_CONFIGS = _same({
    "narrow": _configs((32, 4, 1), (64, 4, 1), (64, 8, 1)),
    "wide": _configs((32, 4, 1), (64, 8, 1)),
    "ieee": _configs((16, 4, 1), (16, 8, 1)),
})
# Spatial forward, L = 197: 64-row query tiles use 77% of their rows (4 tiles), 32-row ones 88% (7 tiles).
# 32 x 64 spills 8 B on sm_90; wide 64 x 64 needs 8 warps (4 spill 112-120 B); IEEE needs 8 warps on sm_90.
SPATIAL_FWD_CONFIGS = _same({
    "narrow": _configs((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)),
    "wide": _configs((32, 32, 4, 2), (64, 64, 8, 2)),
    "ieee": _configs((32, 32, 8, 1), (16, 32, 8, 1), (32, 16, 8, 1)),
})
# Backward: dQ keeps one fp32 accumulator, dK/dV two (plus the atomic dQ tile), so the dK/dV kernel gets the
# smaller tiles. As a launch builds them (C = 768 specialised): wide dQ 32 x 64 x 8 warps x 1 stage spills 8 B on
# sm_90 and 32 x 32 x 8 x 2 spills 16 B there, while 32 x 32 x 4 x 2 spills 8 B on sm_80 (in the Delta-only
# launch of the atomic variant), hence one list per architecture. 64 x 64 dK/dV spills on sm_80 (16-392 B) but
# compiles on sm_90 with 0 spills (8 warps, 1 or 2 stages; mostly wgmma): sm_90 only. IEEE dQ at head dim 128
# fits only 16 x 16 x 8 warps.
_DQ_NARROW = _configs((64, 64, 4, 1), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2))
_DQ_IEEE = _configs((16, 16, 8, 1))
SPATIAL_BWD_DQ_CONFIGS = {
    80: {"narrow": _DQ_NARROW, "wide": _configs((32, 32, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2)),
         "ieee": _DQ_IEEE},
    90: {"narrow": _DQ_NARROW, "wide": _configs((32, 32, 8, 1), (64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2),
                                                (32, 32, 4, 2)),
         "ieee": _DQ_IEEE},
}  # fmt: skip
_DKDV_WIDE, _DKDV_IEEE = _configs((32, 16, 4, 1)), _configs((16, 16, 8, 1), (32, 16, 8, 1))
SPATIAL_BWD_DKDV_CONFIGS = {
    80: {"narrow": _configs((64, 32, 4, 2), (64, 32, 8, 1), (32, 32, 4, 2)), "wide": _DKDV_WIDE, "ieee": _DKDV_IEEE},
    90: {"narrow": _configs((64, 32, 4, 2), (64, 32, 8, 1), (32, 32, 4, 2), (64, 64, 8, 1), (64, 64, 8, 2)),
         "wide": _DKDV_WIDE, "ieee": _DKDV_IEEE},
}  # fmt: skip
TABLES = {
    "temporal_fwd": TEMPORAL_FWD_CONFIGS,
    "temporal_bwd": TEMPORAL_BWD_CONFIGS,
    "spatial_fwd": SPATIAL_FWD_CONFIGS,
    "spatial_bwd_dq": SPATIAL_BWD_DQ_CONFIGS,
    "spatial_bwd_dkdv": SPATIAL_BWD_DKDV_CONFIGS,
}


def width_class(block_d: int, mm_dtype, precision: str = "tf32") -> str:
    if mm_dtype == tl.float32 and precision == "ieee":
        return "ieee"
    return "wide" if block_d > 64 or mm_dtype == tl.float32 else "narrow"


def candidates(name: str, arch: int, meta: dict, T: int | None = None) -> list[triton.Config]:
    """The configs autotuning chooses from for kernel ``name`` on ``sm_<arch>`` with constexprs ``meta``
    (``BLOCK_D``, ``MM_DTYPE``, ``PRECISION``); temporal tiles (``T`` given) must hold whole groups of T rows."""
    kept = TABLES[name][arch][width_class(meta["BLOCK_D"], meta["MM_DTYPE"], meta["PRECISION"])]
    return [c for c in kept if c.kwargs["BLOCK_M"] >= T] if T is not None else kept


def max_temporal_frames(meta: dict) -> int:
    """Largest T whose groups fit the temporal tiles of every architecture, forward and backward."""
    return min(max(c.kwargs["BLOCK_M"] for c in TABLES[name][arch][width_class(meta["BLOCK_D"], meta["MM_DTYPE"],
                                                                              meta["PRECISION"])])
               for name in ("temporal_fwd", "temporal_bwd") for arch in ARCHS)  # fmt: skip


def _tuned(name: str, kernel, key: list[str], reset: tuple[str, ...] = ()):
    """Autotune over the architecture's and width class's list. ``PRECISION`` is in every key: the TF32 switch
    changes the width class (and Triton's key has the tensors' dtypes, not the constexprs)."""

    def prune(configs, named_args, **kwargs):
        T = named_args["T"] if name.startswith("temporal") else None
        return candidates(name, device_arch(named_args["QKV"]), kwargs, T)

    configs = [c for arch in ARCHS for width in TABLES[name][arch].values() for c in width]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune}, reset_to_zero=list(reset))(
        kernel
    )


TUNED = {
    "temporal_fwd": _tuned("temporal_fwd", _temporal_fwd_kernel, ["T", "BLOCK_D", "PRECISION"]),
    "temporal_bwd": _tuned("temporal_bwd", _temporal_bwd_kernel, ["T", "BLOCK_D", "PRECISION"]),
    "spatial_fwd": _tuned("spatial_fwd", _spatial_fwd_kernel, ["S", "BLOCK_D", "PRECISION"]),
    "spatial_bwd_dq": _tuned("spatial_bwd_dq", _spatial_bwd_dq_kernel, ["S", "BLOCK_D", "COMPUTE_DQ", "PRECISION"]),
    # reset_to_zero: benchmarking runs repeat the atomic adds into DQ_ACC.
    "spatial_bwd_dkdv": _tuned("spatial_bwd_dkdv", _spatial_bwd_dkdv_kernel,
                               ["S", "BLOCK_D", "ATOMIC_DQ", "PRECISION"], reset=("DQ_ACC",)),
}  # fmt: skip
KERNELS = {
    "temporal_fwd": _temporal_fwd_kernel,
    "temporal_bwd": _temporal_bwd_kernel,
    "spatial_fwd": _spatial_fwd_kernel,
    "spatial_bwd_dq": _spatial_bwd_dq_kernel,
    "spatial_bwd_dkdv": _spatial_bwd_dkdv_kernel,
}


# Narrower tail tiles for the spatial forward (opt-in): at 197 tokens a 64-wide key loop computes 256 columns for
# 197 keys; with TAIL_N = 16 it computes 192 + 16 = 208 (19 % fewer forward scores at 64 x 64). Default 0 (the
# simpler single loop) until a GPU measures it: gpu_check checks and times both (`triton_tail`).
_TAIL_N = 0


def set_tail_tiles(width: int) -> None:
    """0 (default: off) or the tail tile width, a power of two >= 16 (``tl.dot`` needs tiles of at least 16)."""
    global _TAIL_N
    if width != 0 and (width < 16 or width & (width - 1)):
        raise ValueError(f"tail tile width must be 0 or a power of two >= 16, got {width}")
    _TAIL_N = width


def get_tail_tiles() -> int:
    return _TAIL_N


def _interpreter_block(n: int) -> int:
    """The one tile size used under the interpreter: the smallest power of two >= n that tl.dot accepts."""
    return max(16, triton.next_power_of_2(n))


def _launch(name: str, grid, args: tuple, meta: dict, fixed: dict, arch: int, pin: bool, T: int | None = None):
    cands = candidates(name, arch, meta, T)
    launch(name, TUNED[name], KERNELS[name], grid, args, meta, cands, fixed, pin)


# ---------------------------------------------------------------------------------------------- launchers


def check(qkv: torch.Tensor, num_frames: int, num_heads: int, op: str) -> str | None:
    """Why the Triton kernels cannot run ``op`` on this input (None when they can). Used by the dispatch."""
    err = launch_error(qkv, op)
    if err:
        return err
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        return f"{op}: qkv must be (B, L, 3*C) with C divisible by num_heads={num_heads}, got {tuple(qkv.shape)}"
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        return f"{op}: the Triton kernels support head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    rows = qkv.shape[1] if op == "temporal_attention" else qkv.shape[1] - 1
    if num_frames < 1 or rows % num_frames:
        return f"{op}: {qkv.shape[1]} rows do not split into T={num_frames} frames"
    if op == "temporal_attention" and num_frames > MAX_TEMPORAL_FRAMES:
        return f"{op}: the Triton kernel supports T <= {MAX_TEMPORAL_FRAMES}, got {num_frames}"
    if op == "temporal_attention" and not interpreting():
        limit = max_temporal_frames(_meta(qkv, num_heads))
        if num_frames > limit:
            return (f"{op}: the Triton kernel's {qkv.dtype} tiles hold T <= {limit} frames with the TF32 switch "
                    f"{'on' if tf32_enabled() else 'off'}, got {num_frames}")
    return None


def temporal_grid(B: int, L: int, T: int, H: int, block_m: int) -> tuple[int, int]:
    """(batch x row tiles, heads): the large index on axis 0 (limit 2**31-1), heads on axis 1 (limit 65535)."""
    return B * triton.cdiv(L, (block_m // T) * T), H


def spatial_grid(B: int, T: int, S: int, H: int, block: int) -> tuple[int, int]:
    """(frames x sequence tiles, heads), for the tiles of the sequence dimension the kernel iterates over."""
    return B * T * triton.cdiv(S, block), H


def _meta(qkv: torch.Tensor, num_heads: int) -> dict:
    head_dim = qkv.shape[-1] // (3 * num_heads)
    mm = matmul_dtype(qkv.dtype)
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "MM_DTYPE": tl_dtype(mm),
        "ACC_DTYPE": tl_dtype(accumulator_dtype(qkv.dtype)),
        "PRECISION": dot_precision(mm),
    }


def _checked(qkv: torch.Tensor, num_frames: int, num_heads: int, op: str) -> torch.Tensor:
    err = check(qkv, num_frames, num_heads, op)
    if err:
        raise ValueError(err)
    return _unit_stride(qkv)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels address rows by strides but columns as contiguous. Upstream gradients of ``out.sum()`` are
    stride-0 expansions, so they are materialised here."""
    return t if t.stride(-1) == 1 else t.contiguous()


def temporal_forward(
    qkv: torch.Tensor, num_frames: int, num_heads: int, scale: float, deterministic: bool = False
) -> torch.Tensor:
    qkv = _checked(qkv, num_frames, num_heads, "temporal_attention")
    B, L, C3 = qkv.shape
    out = qkv.new_empty(B, L, C3 // 3)

    def grid(meta):
        return temporal_grid(B, L, num_frames, num_heads, meta["BLOCK_M"])

    args = (qkv, out, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), L, num_frames, C3 // 3, scale)
    with device_guard(qkv):
        _launch("temporal_fwd", grid, args, _meta(qkv, num_heads), {"BLOCK_M": _interpreter_block(num_frames)},
                device_arch(qkv), deterministic, T=num_frames)  # fmt: skip
    return out


def temporal_backward(
    dout: torch.Tensor, qkv: torch.Tensor, num_frames: int, num_heads: int, scale: float, deterministic: bool = False
) -> torch.Tensor:
    qkv = _checked(qkv, num_frames, num_heads, "temporal_attention")
    dout = _unit_stride(dout)
    B, L, C3 = qkv.shape
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)

    def grid(meta):
        return temporal_grid(B, L, num_frames, num_heads, meta["BLOCK_M"])

    args = (qkv, dout, dqkv, qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), dqkv.stride(0),
            dqkv.stride(1), L, num_frames, C3 // 3, scale)  # fmt: skip
    with device_guard(qkv):
        _launch("temporal_bwd", grid, args, _meta(qkv, num_heads), {"BLOCK_M": _interpreter_block(num_frames)},
                device_arch(qkv), deterministic, T=num_frames)  # fmt: skip
    return dqkv


def spatial_forward(
    qkv: torch.Tensor, num_frames: int, num_heads: int, scale: float, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (cls_out (B, T, C), patch_out (B, N*T, C), lse (B*T, H, 1+N) fp32 log2-domain, for the backward)."""
    qkv = _checked(qkv, num_frames, num_heads, "spatial_attention")
    B, L, C3 = qkv.shape
    T, C, S = num_frames, C3 // 3, 1 + (L - 1) // num_frames
    cls_out = qkv.new_empty(B, T, C)
    patch_out = qkv.new_empty(B, L - 1, C)
    lse = torch.empty(B * T, num_heads, S, device=qkv.device, dtype=accumulator_dtype(qkv.dtype))

    def grid(meta):
        return spatial_grid(B, T, S, num_heads, meta["BLOCK_M"])

    args = (qkv, cls_out, patch_out, lse, qkv.stride(0), qkv.stride(1), cls_out.stride(0), cls_out.stride(1),
            patch_out.stride(0), patch_out.stride(1), T, S, C, num_heads, scale)  # fmt: skip
    block = min(64, _interpreter_block(S))
    meta = _meta(qkv, num_heads)
    # Not for IEEE fp32 on GPUs: there the tail variant's 32 x 32 tile spills (216 B on sm_80, compile_check).
    ieee = width_class(meta["BLOCK_D"], meta["MM_DTYPE"], meta["PRECISION"]) == "ieee" and not interpreting()
    meta["TAIL_N"] = 0 if ieee else _TAIL_N
    with device_guard(qkv):
        _launch("spatial_fwd", grid, args, meta, {"BLOCK_M": block, "BLOCK_N": block}, device_arch(qkv),
                deterministic)  # fmt: skip
    return cls_out, patch_out, lse


def spatial_backward(
    dcls: torch.Tensor,
    dpatch: torch.Tensor,
    qkv: torch.Tensor,
    cls_out: torch.Tensor,
    patch_out: torch.Tensor,
    lse: torch.Tensor,
    num_frames: int,
    num_heads: int,
    scale: float,
    deterministic: bool,
) -> torch.Tensor:
    qkv = _checked(qkv, num_frames, num_heads, "spatial_attention")
    dcls, dpatch = _unit_stride(dcls), _unit_stride(dpatch)
    B, L, C3 = qkv.shape
    T, C, S = num_frames, C3 // 3, 1 + (L - 1) // num_frames
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    delta = torch.empty_like(lse)
    acc = accumulator_dtype(qkv.dtype)
    cls_grad = torch.empty(B, T, C3, device=qkv.device, dtype=acc)  # per-frame partials of the CLS row
    # The atomic variant accumulates dQ of every row in fp32; the deterministic one gets a 1-element stand-in.
    dq_shape = (1, 1, 1) if deterministic else (B, L, C)
    dq_acc = torch.zeros(dq_shape, device=qkv.device, dtype=acc)
    meta = _meta(qkv, num_heads)
    arch = device_arch(qkv)
    block = min(64, _interpreter_block(S))
    fixed = {"BLOCK_M": block, "BLOCK_N": block}
    common = (T, S, C, num_heads, scale)
    strides_d = (dcls.stride(0), dcls.stride(1), dpatch.stride(0), dpatch.stride(1))

    def grid_m(meta):
        return spatial_grid(B, T, S, num_heads, meta["BLOCK_M"])

    def grid_n(meta):
        return spatial_grid(B, T, S, num_heads, meta["BLOCK_N"])

    with device_guard(qkv):
        dq_args = (qkv, cls_out, patch_out, dcls, dpatch, lse, delta, dqkv, cls_grad, qkv.stride(0), qkv.stride(1),
                   cls_out.stride(0), cls_out.stride(1), patch_out.stride(0), patch_out.stride(1), *strides_d,
                   dqkv.stride(0), dqkv.stride(1), *common)  # fmt: skip
        _launch("spatial_bwd_dq", grid_m, dq_args, {**meta, "COMPUTE_DQ": deterministic}, fixed, arch, deterministic)
        dkdv_args = (qkv, dcls, dpatch, lse, delta, dqkv, cls_grad, dq_acc, qkv.stride(0), qkv.stride(1),
                     *strides_d, dqkv.stride(0), dqkv.stride(1), dq_acc.stride(0), dq_acc.stride(1), *common)  # fmt: skip
        _launch("spatial_bwd_dkdv", grid_n, dkdv_args, {**meta, "ATOMIC_DQ": not deterministic}, fixed, arch,
                deterministic)  # fmt: skip
    if deterministic:
        dqkv[:, 0] = cls_grad.sum(1).to(dqkv.dtype)  # fixed-order sum over the T frames
    else:
        dqkv[..., :C] = dq_acc.to(dqkv.dtype)  # the CLS row's dQ was summed over frames by the atomics
        dqkv[:, 0, C:] = cls_grad[..., C:].sum(1).to(dqkv.dtype)
    return dqkv


# ----------------------------------------------------------------------------------------- custom ops
# custom_op + register_fake make the kernels opaque but traceable for torch.compile (the fake functions give
# shapes); the backward is its own custom op so a compiled backward graph can call it too.


@torch.library.custom_op("alpro::temporal_attention", mutates_args=())
def temporal_attention_op(
    qkv: torch.Tensor, num_frames: int, num_heads: int, scale: float, deterministic: bool
) -> torch.Tensor:
    return temporal_forward(qkv, num_frames, num_heads, scale, deterministic)


@temporal_attention_op.register_fake
def _(qkv, num_frames, num_heads, scale, deterministic):
    B, L, C3 = qkv.shape
    return qkv.new_empty(B, L, C3 // 3)


@torch.library.custom_op("alpro::temporal_attention_backward", mutates_args=())
def temporal_attention_backward_op(
    dout: torch.Tensor, qkv: torch.Tensor, num_frames: int, num_heads: int, scale: float, deterministic: bool
) -> torch.Tensor:
    return temporal_backward(dout, qkv, num_frames, num_heads, scale, deterministic)


@temporal_attention_backward_op.register_fake
def _(dout, qkv, num_frames, num_heads, scale, deterministic):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _temporal_setup(ctx, inputs, output):
    qkv, ctx.num_frames, ctx.num_heads, ctx.scale, ctx.deterministic = inputs
    ctx.save_for_backward(qkv)


def _temporal_grad(ctx, dout):
    (qkv,) = ctx.saved_tensors
    dqkv = temporal_attention_backward_op(dout, qkv, ctx.num_frames, ctx.num_heads, ctx.scale, ctx.deterministic)
    return dqkv, None, None, None, None


temporal_attention_op.register_autograd(_temporal_grad, setup_context=_temporal_setup)


@torch.library.custom_op("alpro::spatial_attention", mutates_args=())
def spatial_attention_op(
    qkv: torch.Tensor, num_frames: int, num_heads: int, scale: float, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return spatial_forward(qkv, num_frames, num_heads, scale, deterministic)


@spatial_attention_op.register_fake
def _(qkv, num_frames, num_heads, scale, deterministic):
    B, L, C3 = qkv.shape
    S = 1 + (L - 1) // num_frames
    lse = qkv.new_empty(B * num_frames, num_heads, S, dtype=accumulator_dtype(qkv.dtype))
    return qkv.new_empty(B, num_frames, C3 // 3), qkv.new_empty(B, L - 1, C3 // 3), lse


@torch.library.custom_op("alpro::spatial_attention_backward", mutates_args=())
def spatial_attention_backward_op(
    dcls: torch.Tensor,
    dpatch: torch.Tensor,
    qkv: torch.Tensor,
    cls_out: torch.Tensor,
    patch_out: torch.Tensor,
    lse: torch.Tensor,
    num_frames: int,
    num_heads: int,
    scale: float,
    deterministic: bool,
) -> torch.Tensor:
    return spatial_backward(dcls, dpatch, qkv, cls_out, patch_out, lse, num_frames, num_heads, scale, deterministic)


@spatial_attention_backward_op.register_fake
def _(dcls, dpatch, qkv, cls_out, patch_out, lse, num_frames, num_heads, scale, deterministic):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _spatial_setup(ctx, inputs, output):
    qkv, ctx.num_frames, ctx.num_heads, ctx.scale, ctx.deterministic = inputs
    cls_out, patch_out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, cls_out, patch_out, lse)


def _spatial_grad(ctx, dcls, dpatch, _dlse):
    qkv, cls_out, patch_out, lse = ctx.saved_tensors
    dcls = torch.zeros_like(cls_out) if dcls is None else dcls  # an unused output gets no gradient
    dpatch = torch.zeros_like(patch_out) if dpatch is None else dpatch
    dqkv = spatial_attention_backward_op(dcls, dpatch, qkv, cls_out, patch_out, lse, ctx.num_frames, ctx.num_heads,
                                         ctx.scale, ctx.deterministic)  # fmt: skip
    return dqkv, None, None, None, None


spatial_attention_op.register_autograd(_spatial_grad, setup_context=_spatial_setup)


# ------------------------------------------------------------------------------------------- entry points


def temporal_attention(
    qkv: torch.Tensor, num_frames: int, num_heads: int, scale: float | None = None, deterministic: bool | None = None
) -> torch.Tensor:
    """(B, N*T, 3C) -> (B, N*T, C). Same contract as :func:`alpro.kernels.attention.temporal_attention`.

    The kernel has no atomics; ``deterministic`` (None follows torch's flag) pins one tile config on GPUs, so
    the result does not depend on what autotuning timed fastest."""
    scale = scale if scale is not None else (qkv.shape[-1] // (3 * num_heads)) ** -0.5
    return temporal_attention_op(qkv, num_frames, num_heads, float(scale), deterministic_requested(deterministic))


def spatial_attention(
    qkv: torch.Tensor, num_frames: int, num_heads: int, scale: float | None = None, deterministic: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1+N*T, 3C) -> (cls_out (B, T, C), patch_out (B, N*T, C)). ``deterministic=None`` follows torch's flag."""
    scale = scale if scale is not None else (qkv.shape[-1] // (3 * num_heads)) ** -0.5
    deterministic = deterministic_requested(deterministic)
    cls_out, patch_out, _ = spatial_attention_op(qkv, num_frames, num_heads, float(scale), deterministic)
    return cls_out, patch_out
