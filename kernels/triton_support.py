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
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp64 runs (with fp64 accumulation) only under the interpreter: it exists for torch.autograd.gradcheck.
INTERPRETER_DTYPES = (*SUPPORTED_DTYPES, torch.float64)


_CAPTURE: list | None = None  # set by capture_launches(): launches are recorded instead of run


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def can_launch(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (meta tensors while capturing)."""
    if _CAPTURE is not None and t.device.type == "meta":
        return triton_installed()
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


def tf32_enabled() -> bool:
    """PyTorch's TF32 switch for fp32 matmuls, read through the API that never raises.

    ``torch.backends.cuda.matmul.fp32_precision`` reflects every way of setting it (``allow_tf32 = True``,
    ``torch.set_float32_matmul_precision("high")``, the new ``fp32_precision`` API); "none" inherits the global
    ``torch.backends.fp32_precision``. Reading the legacy ``allow_tf32`` raises once the new API was used.
    """
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def set_tf32(enabled: bool) -> None:
    """The TF32 switch for fp32 matmuls and convolutions: cuBLAS, cuDNN and these kernels' fp32 ``tl.dot``.

    Off, fp32 training reproduces the original (IEEE fp32 on CUDA cores, ~67 TFLOP/s on an H100); on, fp32
    matmuls use TF32 tensor cores (~495 TFLOP/s dense; 10-bit mantissa inputs, fp32 accumulation). bf16/fp16
    training is unaffected (its matmuls use 16-bit tensor cores either way). Set through the legacy flags, which
    every PyTorch reader (old API and new) still understands; mixing in the new ``fp32_precision`` setters makes
    the legacy getters raise.
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands, following PyTorch's own TF32 switch for matmuls."""
    if dtype == torch.float32 and tf32_enabled():
        return "tf32"
    return "ieee"


# --------------------------------------------------------------------------------------- config choice
# Autotune lists are kept per architecture family: sm_80 (A100: 163 KB shared memory per block) and sm_90 (H100 /
# H200: 227 KB, wgmma). Other GPUs use the family whose limits they share; Triton's autotuner skips any config
# that runs out of resources there.
ARCHS = (80, 90)


def arch_family(capability: tuple[int, int]) -> int:
    """Which config lists a GPU of this compute capability uses: 90 for Hopper / data-centre Blackwell, else 80."""
    return 90 if capability[0] in (9, 10) else 80


def device_arch(t: torch.Tensor) -> int:
    """The config family for the GPU holding ``t`` (80 for interpreter and meta tensors)."""
    if t.is_cuda:
        return arch_family(torch.cuda.get_device_capability(t.device))
    return _CAPTURE_ARCH if _CAPTURE is not None else 80


_FORCED: dict[str, object] = {}
_CAPTURE_ARCH = 80


@contextlib.contextmanager
def forced_config(kernel: str, config) -> Iterator[None]:
    """Launch kernel ``kernel`` (e.g. ``"spatial_fwd"``) with ``config`` (a ``triton.Config``) instead of
    autotuning or the interpreter's config: how gpu_check runs every shipped config in turn."""
    previous = _FORCED.get(kernel)
    _FORCED[kernel] = config
    try:
        yield
    finally:
        if previous is None:
            _FORCED.pop(kernel, None)
        else:
            _FORCED[kernel] = previous


def forced(kernel: str):
    return _FORCED.get(kernel)


@dataclass
class Launch:
    """One kernel launch as a launcher would make it: the kernel's name, its JIT function, positional arguments,
    constexpr meta-parameters and the configs it would run with on the capturing architecture (the autotuning
    candidates, or the one forced or pinned config)."""

    name: str
    kernel: object
    args: tuple
    meta: dict
    configs: list = field(default_factory=list)


@contextlib.contextmanager
def capture_launches(arch: int) -> Iterator[list[Launch]]:
    """Run the real launchers on ``meta`` tensors and record each launch instead of running it.

    ``compile_check`` uses this to compile exactly what a launch at ALPRO's shapes builds (same argument list,
    same integer values, so Triton specialises them the same way) without a GPU. Meta tensors report
    ``data_ptr() == 0``: 16-byte aligned, like every CUDA allocation.
    """
    global _CAPTURE, _CAPTURE_ARCH
    _CAPTURE, _CAPTURE_ARCH = [], arch
    try:
        yield _CAPTURE
    finally:
        _CAPTURE, _CAPTURE_ARCH = None, 80


def capturing() -> list[Launch] | None:
    return _CAPTURE


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU even when another device is current (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def deterministic_requested(flag: bool | None) -> bool:
    """``None`` follows ``torch.use_deterministic_algorithms``."""
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


def tl_dtype(dtype: torch.dtype):
    """The ``triton.language`` dtype for a torch dtype (for ``tl.constexpr`` arguments)."""
    import triton.language as tl

    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }[dtype]


def launch(name: str, tuned, kernel, grid, args: tuple, meta: dict, candidates: list, interpreter_config: dict,
           pin: bool = False) -> None:  # fmt: skip
    """Launch one kernel: a forced config if one is set, else the first candidate when ``pin`` (deterministic
    runs: autotuning picks by timing, and another tile config sums in another order), else autotune over the
    candidates on GPUs; under the interpreter one fixed config (autotune with >= 2 configs fails there).

    ``candidates`` is the pruned list for this launch on this GPU's architecture; while capturing
    (:func:`capture_launches`) nothing runs and the launch is recorded with its candidates.
    """
    config = forced(name)
    if config is None and pin and not interpreting():
        config = candidates[0]
    if _CAPTURE is not None:
        _CAPTURE.append(Launch(name, kernel, args, dict(meta), [config] if config is not None else list(candidates)))
        return
    if config is not None:
        kernel[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                    num_stages=config.num_stages)  # fmt: skip
    elif interpreting():
        kernel[grid(interpreter_config)](*args, **meta, **interpreter_config, num_warps=4, num_stages=1)
    else:
        tuned[grid](*args, **meta)


def describe_config(config) -> str:
    """``BLOCK_M=64,BLOCK_N=32,w4,s2``: a config as the tables and gpu_check's rows name it."""
    if config is None:
        return ""
    blocks = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks},w{config.num_warps},s{config.num_stages}"
