"""GPU-side checks without a GPU: every shipped Triton config compiled for A100 (sm_80) and H100 (sm_90) as a launch
at ALPRO's shapes builds it (Triton's own argument specialisation), the config each launch would run with (per
architecture, pinned when deterministic), launch grids at huge batch, and the CPU fallback with the interpreter off.

These run in a worker process with ``TRITON_INTERPRET`` unset (compiling needs real ``JITFunction`` kernels, and
the fallback must be checked in a process where no interpreter mode was ever set).
"""

from __future__ import annotations

import pytest
from kernel_worker import KernelWorker

pytestmark = pytest.mark.triton

# Largest dynamic shared memory per block (opt-in), CUDA programming guide: A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255


@pytest.fixture(scope="module")
def compiler():
    worker = KernelWorker(interpret=False)
    yield worker
    worker.close()


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_every_shipped_config_fits(compiler, arch):
    """Shared memory within the GPU's limit, <= 255 registers per thread and no spilled registers, for every
    config of every launch (bf16; fp32 with TF32 on and off), compiled as the launch specialises it."""
    table = compiler.run("compile_shipped", arch=arch)
    assert len(table) >= 70  # every kernel x config x constexpr variant x width class (sm_80: 78, sm_90: 83)
    assert any("spatial_bwd_dq" in row[0] and "COMPUTE_DQ=False" in row[0] for row in table)  # the atomic mode
    assert any(",ieee," in row[0] for row in table) and any(",tf32," in row[0] for row in table)
    too_big = [row for row in table if row[1] > SHARED_LIMIT[arch] or row[2] > MAX_REGISTERS or row[3] > 0]
    assert not too_big, "configs that do not fit (name, shared bytes, registers, spill bytes):\n" + "\n".join(
        map(str, too_big)
    )


def test_kernels_compile_with_64bit_sizes(compiler):
    """Strides and sizes past 2**31 arrive as i64 arguments; every kernel must still compile."""
    built = compiler.run("compile_large_offsets")
    assert set(built) == {"temporal_fwd", "temporal_bwd", "spatial_fwd", "spatial_bwd_dq", "spatial_bwd_dkdv",
                          "lse_fwd", "lse_bwd_dx", "lse_bwd_dy"}  # fmt: skip


def test_compile_check_specialises_integers_like_a_launch(compiler):
    """A launch at ALPRO's shapes passes C = 768 and L = 784 (divisible by 16: Triton marks them) and T = 4,
    S = 197 (not divisible): compile_check must build exactly that, not only aligned pointers and strides."""
    spec = compiler.run("launch_specialisation")
    temporal, spatial = spec["temporal_fwd"], spec["spatial_fwd"]
    assert temporal["values"]["C"] == 768 and temporal["values"]["L"] == 784 and temporal["values"]["T"] == 4
    assert {"C", "L", "QKV", "OUT", "stride_qkv_l"} <= set(temporal["divisible"])
    assert "T" not in temporal["divisible"]
    assert spatial["values"]["S"] == 197 and "S" not in spatial["divisible"] and "C" in spatial["divisible"]


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_deterministic_pins_one_config_per_launch(compiler, arch):
    """deterministic=True runs the first config of each list (autotuning would pick by timing, and another tile
    sums in another order); otherwise each launch autotunes over its architecture's list; a forced config wins."""
    pinned = compiler.run("captured_configs", arch=arch, deterministic=True)
    tuned = compiler.run("captured_configs", arch=arch, deterministic=False)
    first = pinned.pop("first_candidates")
    tuned.pop("first_candidates")
    launches = [k for k in pinned if not k.startswith("4:")]  # launch 4 is the forced one
    assert launches and all(len(pinned[k]) == 1 for k in launches)
    for key in launches:
        assert pinned[key] == [first[key.split(":")[1]]], key
    assert any(len(v) > 1 for v in tuned.values())
    forced = [v for k, v in tuned.items() if k.endswith("spatial_fwd")][-1]
    assert forced == ["BLOCK_M=32,BLOCK_N=32,w4,s2"]
    dkdv = next(v for k, v in tuned.items() if k.endswith("spatial_bwd_dkdv"))
    has_64x64 = any(c.startswith("BLOCK_M=64,BLOCK_N=64") for c in dkdv)
    assert has_64x64 == (arch == 90)  # the all-wgmma 64 x 64 dK/dV compiles without spills only on sm_90


def test_fp32_launches_follow_the_tf32_switch(compiler):
    """TF32 on: fp32 dots get input_precision "tf32" and the wide lists; off: IEEE, the small "ieee" tiles (every
    wide tile spills there), and temporal T = 32 is refused (IEEE backward tiles hold at most 16 rows)."""
    res = compiler.run("tf32_launches", arch=90)
    assert res["tf32"]["precision"] == "tf32" and res["tf32"]["configs"] == res["tf32"]["table"]
    assert res["ieee"]["precision"] == "ieee" and res["ieee"]["configs"] == res["ieee"]["table"]
    assert res["tf32"]["configs"] != res["ieee"]["configs"]
    assert res["tf32"]["T32"] is None
    assert "T <= 16" in res["ieee"]["T32"] and "TF32 switch off" in res["ieee"]["T32"]


def test_grids_stay_within_cuda_limits(compiler):
    """1M clips x 16 frames x 197 tokens x 12 heads: groups x tiles on axis 0 (< 2**31), heads on axis 1."""
    grids = compiler.run("grids", B=1 << 20, T=16, N=196, H=12)
    for name, (x, y) in grids.items():
        assert x < 2**31 and y <= 65535, f"{name} grid {(x, y)}"
        assert x > 65535  # the regime where (batch x heads) on axis 1 would fail to launch


def test_cpu_fallback_without_interpreter():
    """No GPU, no interpreter: auto picks SDPA / the reference (never Triton); explicit choices say why not."""
    worker = KernelWorker(interpret=False)  # a fresh process: nothing imported the kernel modules before
    try:
        res = worker.run("fallback_dispatch")
    finally:
        worker.close()
    assert res["attention_auto"] == "sdpa"
    assert res["contrastive_auto_small"] == "reference" and res["contrastive_auto_large"] == "chunked"
    assert res["auto_vs_reference"] < 1e-5 and res["loss_auto_vs_reference"] == 0.0
    assert res["triton_modules_imported"] == []
    errors = res["errors"]
    assert "TRITON_INTERPRET=1" in errors["attention_triton"] and "CUDA" in errors["attention_triton"]
    assert "xformers" in errors["attention_xformers"] and "CUDA" in errors["attention_xformers"]
    assert "TRITON_INTERPRET=1" in errors["contrastive_triton"]
