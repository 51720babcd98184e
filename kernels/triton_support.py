"""What the Triton paths need to know about the process: is Triton importable, is it interpreting, which dtypes.

Kept free of any ``triton`` import at module level, so the dispatch in :mod:`alpro.kernels.attention` and
:mod:`alpro.kernels.contrastive` can ask "can Triton run this?" on machines without Triton, and so importing
:mod:`alpro.kernels` never fixes the interpreter mode: ``TRITON_INTERPRET=1`` is read when a ``@triton.jit``
kernel is *defined*, so the kernel modules are imported lazily, on first use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp64 runs (with fp64 accumulation) only under the interpreter: it exists for torch.autograd.gradcheck.
INTERPRETER_DTYPES = (*SUPPORTED_DTYPES, torch.float64)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def can_launch(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    return triton_installed() and (t.is_cuda or (t.device.type == "cpu" and interpreting()))


def launch_error(t: torch.Tensor, op: str) -> str | None:
    """Why ``op`` cannot launch a Triton kernel on ``t`` (None when it can)."""
    if not triton_installed():
        return f"{op}: backend 'triton' needs the triton package (pip install triton)"
    if not can_launch(t):
        return f"{op}: backend 'triton' needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors (got {t.device})"
    if t.dtype not in (INTERPRETER_DTYPES if interpreting() else SUPPORTED_DTYPES):
        return f"{op}: backend 'triton' supports float16/bfloat16/float32, not {t.dtype}"
    return None


def matmul_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of ``tl.dot``: the input dtype (tensor cores), except under the interpreter for bf16.

    The interpreter treats bf16 ``tl.dot`` operands as raw 16-bit integers (measured: errors of 1e10), so there
    the tiles are upcast to fp32. Loads, stores and fp32 accumulation are unchanged.
    """
    if dtype == torch.bfloat16 and interpreting():
        return torch.float32
    return dtype


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation (softmax statistics, partial sums) for every GPU dtype; fp64 for interpreter gradchecks."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands, following PyTorch's own TF32 switch for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU even when another device is current (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype for a torch dtype (for ``tl.constexpr`` arguments)."""
    import triton.language as tl

    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }[dtype]
