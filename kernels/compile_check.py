"""Compile every shipped Triton config for real GPUs without one, as a launch builds it, and report what it needs.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`` runs the whole toolchain (the wheel
ships ptxas), so shared memory (from the kernel metadata) and registers / spills (``cuobjdump
--dump-resource-usage`` on the cubin) are known on a CPU-only machine.

What is compiled is what a launch builds: the real launchers run on ``meta`` tensors at ALPRO's shapes under
:func:`alpro.kernels.triton_support.capture_launches`, which records each launch's argument list instead of
running it, and the arguments are then specialised by Triton's own binder (``create_function_from_signature``,
the code ``JITFunction.run`` calls): pointers and integers divisible by 16 get ``tt.divisibility``, integers
equal to 1 become constants, exactly as at a real call with those values. Each architecture family compiles its
own candidate lists (``TABLES[name][arch]``), each width class at its worst case:

- attention "narrow": bf16, head dim 64 (ALPRO: B 16, T 4, 197 tokens, 12 heads, C 768);
- attention "wide": fp32 with the TF32 switch on, head dim 128 (6 heads, C 768);
- attention "ieee": fp32 with the TF32 switch off (FMA dots, the most registers), head dim 128;
- contrastive: bf16, fp32-tf32 and fp32-ieee, D = 256, 16 local rows against 256 gathered ones.

    python -m alpro.kernels.compile_check            # table for sm_80 and sm_90; exit 1 if anything does not fit
    python -m alpro.kernels.compile_check --arch 90
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from alpro.kernels import attention_triton as att
from alpro.kernels import contrastive_triton as ctr
from alpro.kernels import triton_support as ts

# Largest dynamic shared memory per block (opt-in), from the CUDA programming guide's compute-capability table.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255  # per thread; with <= 8 warps (256 threads) that also fits the 64K-register file
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# ALPRO's pre-training shapes (ALPRO.md: 16 clips per GPU, 4 frames, 224 px / 16 = 196 patches, ViT-B 12 x 64).
ALPRO_SHAPE = {"B": 16, "T": 4, "N": 196, "C": 768}
CONTRASTIVE_SHAPE = {"M": 16, "N": 256, "D": ctr.MAX_DIM}  # local batch 16 against 16 GPUs' gathered features


@dataclass(frozen=True)
class Job:
    """One captured launch x one candidate config (x the TF32 switch it was captured under)."""

    name: str
    kernel: triton.runtime.JITFunction
    config: triton.Config
    dtype: torch.dtype
    args: tuple
    meta: tuple[tuple[str, object], ...]  # constexprs other than the config's

    @property
    def precision(self) -> str:
        return str(dict(self.meta).get("PRECISION", ""))


@dataclass(frozen=True)
class Resources:
    shared: int
    registers: int
    spill_bytes: int


def _meta_tensor(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def _capture_attention(dtype: torch.dtype, head_dim: int) -> None:
    """Forward and both backward variants of both passes, through the real launchers."""
    B, T, N, C = (ALPRO_SHAPE[k] for k in ("B", "T", "N", "C"))
    H, scale = C // head_dim, head_dim**-0.5
    qkv_t = _meta_tensor(B, N * T, 3 * C, dtype=dtype)
    att.temporal_forward(qkv_t, T, H, scale)
    att.temporal_backward(_meta_tensor(B, N * T, C, dtype=dtype), qkv_t, T, H, scale)
    qkv_s = _meta_tensor(B, 1 + N * T, 3 * C, dtype=dtype)
    cls_out, patch_out, lse = att.spatial_forward(qkv_s, T, H, scale)
    previous = att.get_tail_tiles()
    try:  # the opt-in narrower tail tiles of the forward
        att.set_tail_tiles(16)
        att.spatial_forward(qkv_s, T, H, scale)
    finally:
        att.set_tail_tiles(previous)
    for deterministic in (True, False):
        att.spatial_backward(torch.empty_like(cls_out), torch.empty_like(patch_out), qkv_s, cls_out, patch_out, lse,
                             T, H, scale, deterministic)  # fmt: skip


def _capture_contrastive(dtype: torch.dtype) -> None:
    """One column split (the default) and four (the opt-in split: other strides, so other specialisations)."""
    M, N, D = (CONTRASTIVE_SHAPE[k] for k in ("M", "N", "D"))
    x, y = _meta_tensor(M, D, dtype=dtype), _meta_tensor(N, D, dtype=dtype)
    scale = _meta_tensor(dtype=torch.float32)
    previous = ctr.get_column_split()
    try:
        for splits in (1, 4):
            ctr.set_column_split(splits)
            lse = ctr.lse_forward(x, y, scale)
            ctr.lse_backward(torch.empty_like(lse), x, y, scale, lse)
    finally:
        ctr.set_column_split(previous)


def _cases() -> list[tuple[str, torch.dtype, bool, object]]:
    """(label, dtype, TF32 switch, capture function) for every width class's worst case."""
    return [
        ("attention narrow", torch.bfloat16, False, lambda: _capture_attention(torch.bfloat16, 64)),
        ("attention wide tf32", torch.float32, True, lambda: _capture_attention(torch.float32, 128)),
        ("attention ieee", torch.float32, False, lambda: _capture_attention(torch.float32, 128)),
        ("contrastive narrow", torch.bfloat16, False, lambda: _capture_contrastive(torch.bfloat16)),
        ("contrastive wide tf32", torch.float32, True, lambda: _capture_contrastive(torch.float32)),
        ("contrastive ieee", torch.float32, False, lambda: _capture_contrastive(torch.float32)),
    ]


def shipped_jobs(arch: int) -> list[Job]:
    """Every candidate config of every launch a training step makes on ``sm_<arch>``, deduplicated."""
    jobs, seen = [], set()
    previous = ts.tf32_enabled(), torch.backends.cudnn.allow_tf32
    try:
        for _, dtype, tf32, capture in _cases():
            ts.set_tf32(tf32)
            with ts.capture_launches(arch) as launches:
                capture()
            for launch in launches:
                for config in launch.configs:
                    meta = tuple(sorted(launch.meta.items(), key=lambda kv: kv[0]))
                    key = (launch.name, ts.describe_config(config), repr(meta), _int_key(launch.args))
                    if key not in seen:
                        seen.add(key)
                        jobs.append(Job(launch.name, launch.kernel, config, dtype, launch.args, meta))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    return jobs


def _int_key(args: tuple) -> tuple:
    """What Triton specialises an argument list on: integer values' divisibility and ones, tensor dtypes."""
    return tuple((a % 16 == 0, a == 1) if isinstance(a, int) else str(getattr(a, "dtype", type(a))) for a in args)


def _source(job: Job, arch: int, int_type: str | None) -> tuple[ASTSource, dict]:
    """The ``ASTSource`` and options ``JITFunction.run`` would build for this launch (Triton's own binder)."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kernel = job.kernel
    kwargs = {**dict(job.meta), **job.config.all_kwargs()}
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*job.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    if int_type is not None:  # what a launch with sizes or strides >= 2**31 gets
        signature = {k: (int_type if v in ("i32", "i64") else v) for k, v in signature.items()}
        attrs = {k: v for k, v in attrs.items() if signature[kernel.params[k[0]].name] != int_type}
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), options.__dict__


def _cubin_resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes) from ``cuobjdump --dump-resource-usage``.

    Spills land in the stack frame (STACK), not in LOCAL, which stays 0 even when ptxas reports spill stores;
    these kernels have no local arrays, so any stack is spilled registers.
    """
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def compile_job(job: Job, arch: int, int_type: str | None = None) -> Resources:
    """Compile ``job`` for ``sm_<arch>`` as its launch specialises it (``int_type="i64"``: as a 64-bit launch)."""
    src, options = _source(job, arch, int_type)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    registers, spills = _cubin_resources(compiled.asm["cubin"])
    return Resources(shared=compiled.metadata.shared, registers=registers, spill_bytes=spills)


def fits(res: Resources, arch: int) -> bool:
    return res.shared <= SHARED_LIMIT[arch] and res.registers <= MAX_REGISTERS and res.spill_bytes == 0


def describe(job: Job) -> str:
    meta = dict(job.meta)
    dims = ",".join(f"{k}={v}" for k, v in job.meta if k in ("HEAD_DIM", "D", "ATOMIC_DQ", "COMPUTE_DQ")
                    or (k == "TAIL_N" and v))  # fmt: skip
    precision = f",{meta['PRECISION']}" if job.dtype == torch.float32 else ""
    return f"{job.name}[{ts.describe_config(job.config)},{_TL_NAME[job.dtype]}{precision},{dims}]"


def table(arch: int, jobs: int = 2) -> list[tuple[str, Resources]]:
    """(description, resources) of every shipped job on ``sm_<arch>``; ptxas runs as a subprocess, so ``jobs``
    compiles overlap."""
    work = shipped_jobs(arch)
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda job: compile_job(job, arch), work))
    return [(describe(job), res) for job, res in zip(work, results)]


@dataclass
class CheckOptions:
    """The options of ``python -m alpro.kernels.compile_check`` (parsed by :func:`alpro.config.parse_command`)."""

    arch: list[int] = field(default_factory=list)
    """compile for sm_ARCH, one of the architectures in SHARED_LIMIT: 80, 90 (repeatable; default: all)"""
    jobs: int = 2
    """parallel compiles"""

    def __post_init__(self) -> None:
        bad = [a for a in self.arch if a not in SHARED_LIMIT]
        if bad:
            raise ValueError(f"arch must be one of {', '.join(map(str, sorted(SHARED_LIMIT)))}, got {bad[0]}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")


def main(argv: list[str] | None = None) -> int:
    from alpro.config import parse_command

    args = parse_command(CheckOptions, argv, prog="python -m alpro.kernels.compile_check",
                         description=__doc__.split("\n\n")[0])
    failed = 0
    print(f"{'kernel / config':92s} {'sm':>3s} {'smem KB':>8s} {'regs':>5s} {'spill':>6s}")
    for arch in args.arch or sorted(SHARED_LIMIT):
        for name, res in table(arch, args.jobs):
            ok = fits(res, arch)
            failed += not ok
            flag = "" if ok else "  <-- does not fit"
            print(f"{name:92s} {arch:3d} {res.shared / 1024:8.1f} {res.registers:5d} {res.spill_bytes:6d}{flag}")
    print(f"{failed} configs do not fit" if failed else "every config fits: no spills, shared memory and registers "
          "within limits")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    from alpro.cli import guarded

    raise SystemExit(guarded("compile_check", main))
