"""``make gpu-check`` without a GPU: the smoke mode runs the whole script (every kernel under the Triton interpreter,
each shipped config forced in turn at fp16, the speed table, DALI against PyAV) on tiny shapes, in a fresh process
so ``TRITON_INTERPRET`` never leaks into this one, and writes its JSON / CSV / plot."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.triton, pytest.mark.dali]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("gpu_check"), tmp_path_factory.mktemp("gpu_check_work")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it itself
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out),
                           "--work", str(work)], capture_output=True, text=True, env=env, timeout=800)  # fmt: skip
    return proc, out


@pytest.mark.slow  # the smoke run trains (its train rows): ~25 s
def test_smoke_mode_passes_and_writes_its_results(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    rows = report["rows"]
    assert report["environment"]["mode"] == "smoke"  # ~17 s on an idle 2-core machine; not asserted (shared CPUs)
    assert not [r for r in rows if r["status"] == "FAIL"]
    with open(out / "gpu_check.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "gpu_check.png").stat().st_size > 10_000
    lines = [line for line in proc.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert len(lines) == len(rows)  # one printed line per case


@pytest.mark.slow  # the smoke run trains (its train rows): ~25 s
def test_smoke_covers_every_kernel_dtype_and_shipped_config(smoke):
    _, out = smoke
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    numerics = [r for r in rows if r["section"] == "numerics" and r["status"] == "PASS"]
    for dtype in ("bf16", "fp16", "fp32"):
        for op in ("temporal ", "spatial det=0", "spatial det=1", "contrastive"):
            assert any(r["case"].startswith(op) and f" {dtype} " in r["case"] for r in numerics), (op, dtype)
        assert any(r["case"].startswith("contrastive") and f" {dtype} " in r["case"] and "column split 3" in r["case"]
                   for r in numerics), dtype  # fmt: skip
        assert any(r["case"].startswith("spatial") and f" {dtype} " in r["case"] and "tail tiles 16" in r["case"]
                   for r in numerics), dtype  # fmt: skip
    forced = {r["case"].rsplit(" ", 1)[1] for r in numerics if "=BLOCK_M=" in r["case"]}
    from alpro.kernels import attention_triton as att
    from alpro.kernels import contrastive_triton as ctr
    from alpro.kernels.triton_support import describe_config

    # every narrow (fp16) config the sm_90 lists ship, for every kernel, forced in turn
    for name, table in {**att.TABLES, **ctr.TABLES}.items():
        for config in table[90]["narrow"]:
            assert f"{name}={describe_config(config)}" in forced, (name, describe_config(config))


@pytest.mark.slow  # the smoke run trains (its train rows): ~25 s
def test_smoke_speed_dali_and_train_rows(smoke):
    _, out = smoke
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    speed = [r for r in rows if r["section"] == "speed"]
    providers = {r["provider"] for r in speed if r["status"] == "PASS"}
    assert {"naive", "sdpa_raw", "sdpa", "triton", "triton_det", "reference", "chunked", "triton_split",
            "triton_tail"} <= providers
    assert all(r["ms_p50"] > 0 for r in speed if r["status"] == "PASS")
    (dali,) = [r for r in rows if r["section"] == "dali"]
    assert dali["status"] == "PASS" and dali["psnr_luma_db"] >= 40 and dali["clips"] == 4
    (augment,) = [r for r in rows if r["section"] == "augment"]
    assert augment["status"] == "PASS" and augment["max_grey"] == 0.0 and augment["clips"] == 8  # CPU: bit-identical
    (train,) = [r for r in rows if r["section"] == "train"]
    assert train["status"] == "SKIP" and "CUDA" in train["detail"]  # stated, not faked


def test_mfu_uses_bench_models_flop_count():
    """MFU = (3 x trained forward FLOPs + the frozen prompter's forward) x samples/s / the GPU's bf16 peak."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check
    from bench_model import flop_rows

    rows = {r["component"]: r["gmac_per_clip"] for r in flop_rows("debug") if r["stage"] == "pretrain"}
    per_sample = 2e9 * (3 * (rows["training_forward_total"] - rows["prompter_video_encoder"])
                        + rows["prompter_video_encoder"])  # fmt: skip
    assert gpu_check.mfu("debug", 100.0, "NVIDIA H100 80GB HBM3") == pytest.approx(per_sample * 100 / 989e12)
    assert gpu_check.mfu("debug", 100.0, "NVIDIA H200") == gpu_check.mfu("debug", 100.0, "NVIDIA H100 80GB HBM3")
    assert gpu_check.mfu("debug", 100.0, "Some GPU") is None


@pytest.mark.slow
def test_training_section_runs_on_the_cpu(tmp_path):
    """--train-on-cpu: section 4's code end to end (synthetic corpus, shards, a 2-step prompter, 4 bf16 ZeRO-2
    pre-training steps under torchrun, the trainer's metrics), on the debug preset with gloo instead of NCCL."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--sections", "train",
                           "--train-on-cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["rows"]
    assert row["status"] == "PASS" and "bf16" in row["case"] and row["steps"] == 4
    assert row["samples_per_s"] > 0 and 0 <= row["data_wait"] < 1 and row["peak_gb"] > 0
    assert row["mfu"] is None  # no GPU peak to divide by on the CPU
