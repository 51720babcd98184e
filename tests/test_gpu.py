"""What only a CUDA device can show: the compiled Triton kernels against the reference maths, forward and
backward, in fp32 and bf16 (``gpu`` marker: skipped, with the reason, on a machine without CUDA; run them on the
GPU machine with ``pytest -m gpu``). The interpreter tests (``test_kernels_interpret.py``) cover the same
kernels' logic on the CPU; these cover the compiled code paths and the device's arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alpro.kernels import contrastive_loss, spatial_attention, temporal_attention

pytestmark = pytest.mark.gpu

TOL = {torch.float32: dict(rtol=5e-3, atol=5e-3), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}  # TF32 / bf16


def _grads(fn, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum(o.float().square().sum() for o in outs).backward()
    return (*(o.detach().float() for o in outs), x.grad.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", [temporal_attention, spatial_attention], ids=["temporal", "spatial"])
def test_triton_attention_matches_the_reference_on_cuda(op, dtype):
    T, H, Dh, N = 4, 12, 64, 196
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 1 + N * T, 3 * H * Dh, device="cuda", generator=g).to(dtype)
    got = _grads(lambda t: op(t, T, H, backend="triton"), x)
    want = _grads(lambda t: op(t.float(), T, H, backend="reference"), x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_triton_contrastive_loss_matches_the_reference_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    va = F.normalize(torch.randn(256, 256, device="cuda", generator=g), dim=-1)
    ta = F.normalize(torch.randn(256, 256, device="cuda", generator=g), dim=-1)
    temp = torch.tensor(0.07, device="cuda")
    losses = {}
    for backend in ("triton", "reference"):
        v, t = va.clone().requires_grad_(), ta.clone().requires_grad_()
        loss = contrastive_loss(v[64:128], t[64:128], v, t, temp, 64, backend=backend)
        loss.backward()
        losses[backend] = (loss.detach(), v.grad, t.grad)
    for a, b in zip(losses["triton"], losses["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
