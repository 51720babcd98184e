"""CPU paths of :mod:`alpro.kernels` that need no Triton: the chunked contrastive loss, the dispatch, the layouts.

The Triton kernels themselves are tested in ``test_kernels_interpret.py`` (interpreter) and
``test_kernels_compile.py`` (sm_80 / sm_90 builds); nothing here imports them.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from alpro.kernels import attention as A
from alpro.kernels import contrastive as CL
from alpro.kernels import (
    contrastive_loss,
    local_similarity,
    set_attention_backend,
    set_contrastive_backend,
    spatial_attention,
    temporal_attention,
)


def features(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def loss_and_grads(backend: str, va, ta, temp, B: int, offset: int):
    """Local rows = block ``offset // B`` of the gathered features, as after all_gather_with_grad."""
    va, ta, temp = (x.detach().clone().requires_grad_() for x in (va, ta, temp))
    loss = contrastive_loss(va[offset : offset + B], ta[offset : offset + B], va, ta, temp, offset, backend=backend)
    loss.backward()
    return loss.detach(), va.grad, ta.grad, temp.grad


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so the tests cross chunk boundaries (and a ragged last chunk)."""
    monkeypatch.setattr(CL, "CHUNK_LOGITS", 7 * 64)


@pytest.mark.parametrize("B,W,rank", [(16, 1, 0), (13, 4, 2), (9, 3, 2)])
def test_chunked_matches_reference(small_chunks, B, W, rank):
    va, ta, temp = features(B * W, 32, 0), features(B * W, 32, 1), torch.tensor(0.07)
    chunked = loss_and_grads("chunked", va, ta, temp, B, rank * B)
    reference = loss_and_grads("reference", va, ta, temp, B, rank * B)
    for got, want in zip(chunked, reference):  # fp32, logits up to 1/0.07: rounding of ~1e-6 relative
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_gradcheck_fp64(small_chunks):
    x = features(11, 8, 0, torch.float64).requires_grad_()
    y = features(19, 8, 1, torch.float64).requires_grad_()
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(CL.similarity_lse_chunked, (x, y, scale), fast_mode=True)


def test_chunked_bf16_accumulates_in_fp32():
    va, ta, temp = features(24, 32, 0, torch.bfloat16), features(24, 32, 1, torch.bfloat16), torch.tensor(0.05)
    ref = loss_and_grads("reference", va.double(), ta.double(), temp.double(), 24, 0)  # same (rounded) inputs
    got = loss_and_grads("chunked", va, ta, temp, 24, 0)
    naive = loss_and_grads("reference", va, ta, temp, 24, 0)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    # fp32 accumulation: at least as close to the fp64 loss as the reference computed with bf16 logits
    assert (got[0].double() - ref[0]).abs() <= (naive[0].double() - ref[0]).abs() + 1e-6
    torch.testing.assert_close(got[1].double(), ref[1], rtol=0, atol=1e-2)  # bf16 gradient storage


def test_chunked_saves_only_features():
    """What the chunked path keeps for backward is O(B*D); the reference keeps (B, G) logits."""
    B, D = 256, 32
    va, ta = features(B, D, 0).requires_grad_(), features(B, D, 1).requires_grad_()
    temp = torch.tensor(0.07, requires_grad=True)

    def largest_saved(backend: str) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            contrastive_loss(va, ta, temp=temp, backend=backend)
        return max(sizes)

    assert largest_saved("reference") == B * B
    assert largest_saved("chunked") == B * D


def test_gathered_loss_is_the_mean_of_the_full_batch_loss():
    """Each rank's (local rows x global columns) loss, averaged over ranks, equals the one-process full-batch
    loss: the rank offset puts the positives on the right columns."""
    B, W = 6, 3
    va, ta, temp = features(B * W, 16, 0), features(B * W, 16, 1), torch.tensor(0.1)
    full = contrastive_loss(va, ta, temp=temp, backend="reference")
    for backend in ("reference", "chunked"):
        per_rank = [contrastive_loss(va[r * B : (r + 1) * B], ta[r * B : (r + 1) * B], va, ta, temp, r * B,
                                     backend=backend) for r in range(W)]  # fmt: skip
        torch.testing.assert_close(torch.stack(per_rank).mean(), full, rtol=1e-6, atol=1e-6)


def test_local_similarity_is_the_local_block_of_the_global_logits():
    B, W, r = 5, 3, 1
    va, ta, temp = features(B * W, 16, 0), features(B * W, 16, 1), torch.tensor(0.07)
    sim_v2t = va[r * B : (r + 1) * B] @ ta.t() / temp  # (B, G), what the reference materialises
    local = local_similarity(va[r * B : (r + 1) * B], ta[r * B : (r + 1) * B], temp)
    torch.testing.assert_close(local, sim_v2t[:, r * B : (r + 1) * B])


def test_contrastive_loss_rejects_bad_layouts():
    v = features(4, 8, 0)
    with pytest.raises(ValueError, match="rank_offset"):
        contrastive_loss(v, v, torch.cat([v, v]), torch.cat([v, v]), 0.07, rank_offset=5)
    with pytest.raises(ValueError, match="unknown backend"):
        contrastive_loss(v, v, backend="cuda")
    with pytest.raises(ValueError, match="unknown contrastive backend"):
        set_contrastive_backend("fast")


def test_contrastive_chunked_under_torch_compile():
    va, ta, temp = features(12, 16, 0), features(12, 16, 1), torch.tensor(0.07, requires_grad=True)
    compiled = torch.compile(lambda v, t, tau: contrastive_loss(v, t, temp=tau, backend="chunked"), backend="aot_eager")
    torch.testing.assert_close(compiled(va, ta, temp), contrastive_loss(va, ta, temp=temp, backend="reference"))


# ------------------------------------------------------------------------------------------------ attention


def qkv(B: int, rows: int, H: int, Dh: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, rows, 3 * H * Dh, generator=g).to(dtype)


@pytest.mark.parametrize("T,N", [(1, 7), (4, 9), (8, 3)])
def test_sdpa_matches_reference(T, N):
    H, Dh = 2, 16
    qt, qs = qkv(2, N * T, H, Dh), qkv(2, 1 + N * T, H, Dh, seed=1)
    torch.testing.assert_close(temporal_attention(qt, T, H, backend="sdpa"),
                               temporal_attention(qt, T, H, backend="reference"), rtol=1e-5, atol=1e-6)  # fmt: skip
    for got, want in zip(spatial_attention(qs, T, H, backend="sdpa"), spatial_attention(qs, T, H, backend="reference")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_spatial_reference_semantics():
    """Frame t attends over [CLS, its N patches]; patch rows keep the (n, t) order; CLS outputs are per frame."""
    B, N, T, H, Dh = 1, 3, 2, 1, 4
    x = qkv(B, 1 + N * T, H, Dh)
    cls_out, patch_out = spatial_attention(x, T, H, backend="reference")
    for t in range(T):
        rows = [0] + [1 + n * T + t for n in range(N)]
        q, k, v = x[0, rows].split(H * Dh, dim=-1)
        o = torch.softmax(q @ k.t() / Dh**0.5, dim=-1) @ v  # (1+N, C)
        torch.testing.assert_close(cls_out[0, t], o[0])
        torch.testing.assert_close(patch_out[0, [n * T + t for n in range(N)]], o[1:])


def test_xformers_path_layout(monkeypatch):
    """xformers is CUDA-only and not installed here: a stand-in with its (batch, seq, heads, dim) contract checks
    that our views and reshapes feed it the right tensors."""

    def memory_efficient_attention(q, k, v, scale=None):  # BMHK in, BMHK out
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    x = qkv(2, 1 + 5 * 4, 3, 16)
    got = A.spatial_attention_reference(x, 4, 3, attend=A._attend_xformers)
    for g, want in zip(got, spatial_attention(x, 4, 3, backend="reference")):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="CUDA"):  # installed or not, CPU tensors never go to xformers
        spatial_attention(x, 4, 3, backend="xformers")


def test_attention_dispatch_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("flash")
    with pytest.raises(ValueError, match="not a multiple of T"):
        temporal_attention(qkv(1, 10, 1, 8), 4, 1)
    with pytest.raises(ValueError, match="unknown attention backend"):
        temporal_attention(qkv(1, 8, 1, 8), 4, 1, backend="cuda")


def test_auto_is_fast_on_cpu():
    """auto resolves to SDPA on CPU tensors (bf16 too) and matches the reference."""
    x = qkv(2, 1 + 4 * 4, 2, 16, dtype=torch.bfloat16)
    assert A._resolve(None, x, 4, 2, "spatial_attention") == "sdpa"
    for got, want in zip(spatial_attention(x, 4, 2), spatial_attention(x.float(), 4, 2, backend="reference")):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)  # bf16 outputs


# ------------------------------------------------------------------------------------------- precision knobs


def test_tf32_switch_drives_the_kernels_precision():
    """set_tf32 (train.tf32) flips PyTorch's switch; fp32 tl.dot operands follow it, 16-bit ones never use TF32."""
    from alpro.kernels.triton_support import dot_precision, set_tf32, tf32_enabled

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        set_tf32(True)
        assert tf32_enabled() and torch.backends.cudnn.allow_tf32
        assert dot_precision(torch.float32) == "tf32" and dot_precision(torch.bfloat16) == "ieee"
        set_tf32(False)
        assert not tf32_enabled() and not torch.backends.cudnn.allow_tf32
        assert dot_precision(torch.float32) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_read_through_the_new_api_never_raises():
    """After the new ``fp32_precision`` API is used, the legacy ``allow_tf32`` getter raises; the kernels' reader
    does not (checked in a fresh process: mixing the APIs is sticky)."""
    import subprocess
    import sys

    code = ("import torch; from alpro.kernels.triton_support import tf32_enabled, dot_precision\n"
            "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
            "assert tf32_enabled() and dot_precision(torch.float32) == 'tf32'\n"
            "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
            "assert not tf32_enabled()\n"
            "torch.set_float32_matmul_precision('high'); print(tf32_enabled())")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"


def test_gpu_recipes_train_in_bf16_and_fp32_stays_a_knob():
    from pathlib import Path

    from alpro.train.config import load_run_config

    recipes = sorted((Path(__file__).resolve().parents[1] / "launch" / "configs").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        cfg = load_run_config(path)
        assert (cfg.train.precision, cfg.train.tf32) == ("bf16", False), path.name
    exact = load_run_config(recipes[0], ["--train.precision", "fp32", "--train.tf32", "true"])
    assert (exact.train.precision, exact.train.tf32) == ("fp32", True)
