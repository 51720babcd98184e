"""Compile every shipped Triton config for real GPUs without one, and report what it needs.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`` runs the whole toolchain (the wheel
ships ptxas), so shared memory (from the kernel metadata) and registers / spills (``cuobjdump
--dump-resource-usage`` on the cubin) are known on a CPU-only machine. Each autotune config is compiled at the
largest (dtype, head/feature dim) its pruner lets it run with -- the case that needs the most memory.

    python -m alpro.kernels.compile_check            # table for sm_80 and sm_90
    python -m alpro.kernels.compile_check --arch 90
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from alpro.kernels import attention_triton as att
from alpro.kernels import contrastive_triton as ctr

# Largest dynamic shared memory per block (opt-in), from the CUDA programming guide's compute-capability table.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255  # per thread; with <= 8 warps (256 threads) that also fits the 64K-register file
# Buffers that are fp32 whatever the input dtype (statistics, partial sums, the scale).
_FP32_POINTERS = {"LSE", "DELTA", "CLS_GRAD", "DQ_ACC", "SCALE", "DLSE", "DSCALE_ROWS"}
_INT_SCALARS = {"L", "T", "C", "S", "H", "M", "N"}  # upper-case sizes; the other upper-case arguments are pointers
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Job:
    """One kernel x autotune config x the (dtype, dim) it is compiled at."""

    name: str
    kernel: triton.runtime.JITFunction
    config: triton.Config
    dtype: torch.dtype
    meta: tuple[tuple[str, object], ...]  # constexprs other than the config's


@dataclass(frozen=True)
class Resources:
    shared: int
    registers: int
    spill_bytes: int


# Each width class is compiled at its worst case: (dtype, head dim) for attention, (dtype, feature dim) for the
# contrastive log-sum-exp. fp16 tiles are the size of bf16 ones.
_ATTENTION_WORST = {"narrow": (torch.bfloat16, 64), "wide": (torch.float32, 128)}
_LSE_WORST = {"narrow": (torch.bfloat16, ctr.MAX_DIM), "wide": (torch.float32, ctr.MAX_DIM)}


def shipped_jobs() -> list[Job]:
    """Every autotune config of every kernel (all constexpr variants that change the code), at its worst case."""
    kernels = [
        ("temporal_fwd", att._temporal_fwd_kernel, att.TEMPORAL_FWD_CONFIGS, [{}], _ATTENTION_WORST, "HEAD_DIM"),
        ("temporal_bwd", att._temporal_bwd_kernel, att.TEMPORAL_BWD_CONFIGS, [{}], _ATTENTION_WORST, "HEAD_DIM"),
        ("spatial_fwd", att._spatial_fwd_kernel, att.SPATIAL_FWD_CONFIGS, [{}], _ATTENTION_WORST, "HEAD_DIM"),
        ("spatial_bwd_dq", att._spatial_bwd_dq_kernel, att.SPATIAL_BWD_DQ_CONFIGS, [{"COMPUTE_DQ": True}],
         _ATTENTION_WORST, "HEAD_DIM"),
        ("spatial_bwd_dkdv", att._spatial_bwd_dkdv_kernel, att.SPATIAL_BWD_DKDV_CONFIGS,
         [{"ATOMIC_DQ": True}, {"ATOMIC_DQ": False}], _ATTENTION_WORST, "HEAD_DIM"),
        ("lse_fwd", ctr._lse_fwd_kernel, ctr.LSE_FWD_CONFIGS, [{}], _LSE_WORST, "D"),
        ("lse_bwd_dx", ctr._lse_bwd_dx_kernel, ctr.LSE_BWD_DX_CONFIGS, [{}], _LSE_WORST, "D"),
        ("lse_bwd_dy", ctr._lse_bwd_dy_kernel, ctr.LSE_BWD_DY_CONFIGS, [{}], _LSE_WORST, "D"),
    ]  # fmt: skip
    jobs = []
    for name, kernel, table, variants, worst, dim_name in kernels:
        for width, configs in table.items():
            dtype, dim = worst[width]
            for variant in variants:
                meta = {**variant, dim_name: dim, "BLOCK_D": max(16, triton.next_power_of_2(dim))}
                jobs += [Job(name, kernel, config, dtype, tuple(meta.items())) for config in configs]
    return jobs


def _source(job: Job, int_type: str) -> ASTSource:
    """Signature as a launch at ALPRO's shapes specialises it: 16-byte aligned pointers and strides."""
    meta = {**dict(job.meta), **job.config.kwargs}
    mm = torch.float32 if job.dtype == torch.float32 else job.dtype
    meta["MM_DTYPE"] = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[mm]
    meta["ACC_DTYPE"] = tl.float32
    meta["PRECISION"] = "tf32" if job.dtype == torch.float32 else "ieee"
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(job.kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", meta[name]
        elif name.isupper() and name not in _INT_SCALARS:
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{_TL_NAME[job.dtype]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "sm_scale":
            signature[name] = "fp32"
        else:
            signature[name] = int_type
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=job.kernel, signature=signature, constexprs=constexprs, attrs=attrs)


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


def compile_job(job: Job, arch: int, int_type: str = "i32") -> Resources:
    """Compile ``job`` for ``sm_<arch>``; ``int_type="i64"`` is what a launch with strides >= 2**31 gets."""
    compiled = triton.compile(
        _source(job, int_type),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": job.config.num_warps, "num_stages": job.config.num_stages},
    )
    registers, spills = _cubin_resources(compiled.asm["cubin"])
    return Resources(shared=compiled.metadata.shared, registers=registers, spill_bytes=spills)


def describe(job: Job) -> str:
    dims = ",".join(f"{k}={v}" for k, v in job.meta if k in ("HEAD_DIM", "D", "ATOMIC_DQ"))
    cfg = ",".join(f"{k}={v}" for k, v in job.config.kwargs.items())
    return f"{job.name}[{cfg},w{job.config.num_warps},s{job.config.num_stages},{_TL_NAME[job.dtype]},{dims}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT), help="default: all")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compiles")
    args = parser.parse_args(argv)
    archs = args.arch or sorted(SHARED_LIMIT)
    work = [(job, arch) for arch in archs for job in shipped_jobs()]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda ja: compile_job(*ja), work))
    failed = 0
    print(f"{'kernel / config':78s} {'sm':>3s} {'smem KB':>8s} {'regs':>5s} {'spill':>6s}")
    for (job, arch), res in zip(work, results):
        ok = res.shared <= SHARED_LIMIT[arch] and res.registers <= MAX_REGISTERS and res.spill_bytes == 0
        failed += not ok
        flag = "" if ok else "  <-- does not fit"
        print(f"{describe(job):78s} {arch:3d} {res.shared / 1024:8.1f} {res.registers:5d} {res.spill_bytes:6d}{flag}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
