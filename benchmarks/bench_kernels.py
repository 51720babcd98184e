"""Microbenchmarks of the divided-attention and contrastive kernels against their alternatives.

    .venv/bin/python benchmarks/bench_kernels.py            # GPU: everything; CPU: the CPU-meaningful part
    .venv/bin/python benchmarks/bench_kernels.py --quick    # fewer shapes (smoke run)

With a CUDA GPU (``triton.testing.do_bench``, median and 20/80 % quantiles, L2 flushed before each call):

- divided attention at ALPRO's shapes (B = 16/32/64 clips, T = 4/8/16, 197 tokens, 12 heads x 64; bf16, fp16
  and fp32, ``--dtypes``), temporal and spatial pass, forward and forward+backward, for naive PyTorch (the
  TimeSformer maths), SDPA, xformers (when installed), Triton (autotuned; the winning config of each kernel is
  recorded) and Triton with ``deterministic=True`` (pinned configs, no atomics): ms, TFLOP/s by FlashAttention's
  count (4*B*H*L^2*D per forward, x3.5 for forward+backward), GB/s of minimum traffic (the temporal backward reads
  no output) and its fraction of the HBM peak, peak memory, and the largest error against fp32 SDPA;
- the contrastive loss (local rows x gathered columns, D = 256): reference, chunked and Triton, with the loss's
  distance to an fp32 evaluation and the winning configs.

``benchmarks/gpu_check.py`` (``make gpu-check``) is the pass/fail check of the same kernels for the first GPU hour.

On the CPU (always): the contrastive loss's peak memory at B = 16k, D = 256, chunked vs naive, each in a fresh
process (peak RSS above the process's state before the loss), with the loss and gradients compared; and the
reference vs SDPA attention times. GPU figures need a GPU: without one the script says so and writes only the
CPU rows.

Rows go to ``benchmarks/results/bench_kernels.{csv,json}`` tagged with the device, versions and load average,
plus a plot ``bench_kernels_<device>.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from alpro.kernels import attention as A
from alpro.kernels import contrastive as CL

RESULTS = Path(__file__).parent / "results"
# HBM bandwidth of common training GPUs, GB/s (vendor datasheets), matched against torch's device name.
HBM_PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
                 "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
                 "L40S": 864, "L4": 300, "A10": 600, "V100": 900}  # fmt: skip
QUANTILES = [0.5, 0.2, 0.8]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import xformers

        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = None
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "xformers": xformers_version,
    }


def hbm_peak(name: str) -> float | None:
    return next((v for k, v in HBM_PEAK_GBPS.items() if k in name), None)


# --------------------------------------------------------------------------------------------------- GPU


def attention_inputs(op: str, B: int, T: int, N: int, H: int, Dh: int, dtype) -> torch.Tensor:
    rows = N * T if op == "temporal" else 1 + N * T
    return torch.randn(B, rows, 3 * H * Dh, device="cuda", dtype=dtype, requires_grad=True)


def attention_fn(op: str, provider: str, qkv: torch.Tensor, T: int, H: int, backward: bool):
    """A closure running one pass (and its backward against a fixed upstream gradient), and one that returns the
    outputs and d qkv for the correctness column."""
    fn = A.temporal_attention if op == "temporal" else A.spatial_attention
    backend = {"naive": "reference", "triton_det": "triton"}.get(provider, provider)
    kw = {"deterministic": provider == "triton_det"} if provider.startswith("triton") else {}
    outs = fn(qkv, T, H, backend=backend, **kw)
    outs = (outs,) if op == "temporal" else outs
    g = torch.Generator(device=qkv.device).manual_seed(1)
    grads = [torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype) for o in outs]

    def run():
        out = fn(qkv, T, H, backend=backend, **kw)
        if backward:
            torch.autograd.backward((out,) if op == "temporal" else out, grads)

    def values(x: torch.Tensor) -> list[torch.Tensor]:
        x = x.detach().requires_grad_()
        out = fn(x, T, H, backend=backend, **kw)
        out = (out,) if op == "temporal" else out
        if not backward:
            return [o.detach() for o in out]
        (dx,) = torch.autograd.grad(out, [x], [gr.to(o.dtype) for o, gr in zip(out, grads)])
        return [o.detach() for o in out] + [dx]

    return run, values


def max_error(values, qkv: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Largest |provider - fp32 reference| over the outputs (and d qkv for forward+backward rows)."""
    return max((v.float() - r).abs().max().item() for v, r in zip(values(qkv), reference))


def autotune_winners(op: str) -> str:
    """The config autotuning picked for each kernel of the pass (its last launch)."""
    from alpro.kernels import attention_triton as att
    from alpro.kernels.triton_support import describe_config

    names = ["temporal_fwd", "temporal_bwd"] if op == "temporal" else ["spatial_fwd", "spatial_bwd_dq",
                                                                         "spatial_bwd_dkdv"]  # fmt: skip
    return "; ".join(f"{n}: {describe_config(att.TUNED[n].best_config)}" for n in names
                     if getattr(att.TUNED[n], "best_config", None) is not None)  # fmt: skip


def time_and_peak(run, grads: list[torch.Tensor]) -> tuple[list[float], float]:
    """One warm-up call, the peak memory (MB above what was allocated before) of a second call, then
    ``do_bench``'s p50/p20/p80 milliseconds."""
    import triton.testing

    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(run, quantiles=QUANTILES, grad_to_none=grads), peak_mb


def attention_cost(op: str, B: int, T: int, N: int, H: int, Dh: int, elem: int, backward: bool) -> tuple:
    """(FLOPs by FlashAttention's count, minimum bytes moved). Forward: read qkv, write out. Backward: read qkv and
    dout, write dqkv; the spatial backward also reads out (for Delta = rowsum(dO * O)), the temporal one does not
    (it recomputes the whole softmax in one tile and uses rowsum(P * dP) instead)."""
    groups, L = (B * N, T) if op == "temporal" else (B * T, 1 + N)
    flops = 4.0 * groups * H * L * L * Dh * (3.5 if backward else 1.0)
    rows, C = (B * N * T if op == "temporal" else B * (1 + N * T)), H * Dh
    backward_units = (3 + 1 + 3) + (0 if op == "temporal" else 1)  # qkv + dout + dqkv (+ out)
    traffic = rows * C * elem * (4 + (backward_units if backward else 0))
    return flops, traffic


def bench_attention_gpu(env: dict, quick: bool, dtypes: list[str]) -> list[dict]:

    providers = ["naive", "sdpa", "triton", "triton_det"] + (["xformers"] if env["xformers"] else [])
    peak = hbm_peak(env["device"])
    N, H, Dh = 196, 12, 64
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        for B in (16,) if quick else (16, 32, 64):
            for T in (4, 8) if quick else (4, 8, 16):
                for op in ("temporal", "spatial"):
                    qkv = attention_inputs(op, B, T, N, H, Dh, dtype)
                    for backward in (False, True):
                        flops, traffic = attention_cost(op, B, T, N, H, Dh, qkv.element_size(), backward)
                        _, ref_values = attention_fn(op, "sdpa", qkv.float(), T, H, backward)
                        reference = [r.float() for r in ref_values(qkv.float())]  # fp32 SDPA: the correctness yardstick
                        for provider in providers:
                            row = {"bench": "attention", "op": op, "mode": "fwd+bwd" if backward else "fwd",
                                   "provider": provider, "B": B, "T": T, "tokens": 1 + N, "heads": H, "head_dim": Dh,
                                   "dtype": dname}  # fmt: skip
                            try:
                                run, values = attention_fn(op, provider, qkv, T, H, backward)
                                ms, peak_mb = time_and_peak(run, [qkv])
                                err = max_error(values, qkv, reference)
                            except Exception as e:  # one provider failing (e.g. OOM for naive at B=64) keeps the rest
                                rows.append(row | {"note": f"{type(e).__name__}: {e}"[:200]})
                                torch.cuda.empty_cache()
                                continue
                            gbps = traffic / (ms[0] * 1e-3) / 1e9
                            rows.append(row | {
                                "ms_p50": round(ms[0], 4), "ms_p20": round(ms[1], 4), "ms_p80": round(ms[2], 4),
                                "tflops": round(flops / (ms[0] * 1e-3) / 1e12, 2), "gbps": round(gbps, 1),
                                "hbm_fraction": round(gbps / peak, 3) if peak else None, "peak_mb": round(peak_mb, 1),
                                "max_err_vs_fp32": float(f"{err:.3g}"),
                                "autotune_winner": autotune_winners(op) if provider == "triton" else "",
                            })  # fmt: skip
                            print(rows[-1])
                    del qkv
                    torch.cuda.empty_cache()
    return rows


def bench_contrastive_gpu(quick: bool, dtypes: list[str]) -> list[dict]:

    rows = []
    shapes = ((256, 256), (4096, 4096)) if quick else ((16, 256), (256, 256), (4096, 32768), (16384, 16384))
    for dname, (M, G) in ((d, s) for d in dtypes for s in shapes):
        D = 256
        va = F.normalize(torch.randn(G, D, device="cuda"), dim=-1).to(DTYPES[dname]).requires_grad_()
        ta = F.normalize(torch.randn(G, D, device="cuda"), dim=-1).to(DTYPES[dname]).requires_grad_()
        temp = torch.tensor(0.07, device="cuda", requires_grad=True)
        flops = 2.0 * 2 * M * G * D * 3  # two directions; forward 1 GEMM each, backward 2 (dx, dy)
        with torch.no_grad():
            ref_loss = CL.contrastive_loss(va[:M].float(), ta[:M].float(), va.float(), ta.float(), temp, 0,
                                           backend="chunked").item()  # fmt: skip
        for provider in ("reference", "chunked", "triton"):
            row = {"bench": "contrastive", "op": "infonce", "mode": "fwd+bwd", "provider": provider, "B": M,
                   "G": G, "dim": D, "dtype": dname}  # fmt: skip

            def run(provider=provider, va=va, ta=ta, temp=temp, M=M):
                CL.contrastive_loss(va[:M], ta[:M], va, ta, temp, 0, backend=provider).backward()

            try:
                ms, peak_mb = time_and_peak(run, [va, ta, temp])
                with torch.no_grad():
                    loss = CL.contrastive_loss(va[:M], ta[:M], va, ta, temp, 0, backend=provider).item()
            except Exception as e:
                rows.append(row | {"note": f"{type(e).__name__}: {e}"[:200]})
                torch.cuda.empty_cache()
                continue
            from alpro.kernels import contrastive_triton as ctr
            from alpro.kernels.triton_support import describe_config

            winners = "; ".join(f"{n}: {describe_config(t.best_config)}" for n, t in ctr.TUNED.items()
                                if provider == "triton" and getattr(t, "best_config", None) is not None)  # fmt: skip
            rows.append(row | {"ms_p50": round(ms[0], 4), "ms_p20": round(ms[1], 4), "ms_p80": round(ms[2], 4),
                               "tflops": round(flops / (ms[0] * 1e-3) / 1e12, 2), "peak_mb": round(peak_mb, 1),
                               "loss_err_vs_fp32": float(f"{abs(loss - ref_loss):.3g}"),
                               "autotune_winner": winners})  # fmt: skip
            print(rows[-1])
    return rows


# --------------------------------------------------------------------------------------------------- CPU

_MEMORY_CHILD = r"""
import json, resource, sys, torch, torch.nn.functional as F
from alpro.kernels import contrastive as CL
B, D, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
va = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
ta = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
temp = torch.tensor(0.07, requires_grad=True)
CL.contrastive_loss(va[:64], ta[:64], temp=temp, backend=backend).backward()  # warm-up: library buffers
va.grad = ta.grad = temp.grad = None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = CL.contrastive_loss(va, ta, temp=temp, backend=backend)
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.save({"loss": loss.detach(), "dv": va.grad, "dt": ta.grad, "dtemp": temp.grad}, sys.argv[4])
print(json.dumps({"peak_mb": (peak - before) / 1024}))
"""


def bench_contrastive_memory_cpu(B: int, D: int, work: Path) -> list[dict]:
    """Peak RSS of one forward+backward at (B, D), chunked vs naive, each in a fresh process."""
    rows, results = [], {}
    for backend in ("reference", "chunked"):
        out = work / f"contrastive_{backend}.pt"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(B), str(D), backend, str(out)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        seconds = time.perf_counter() - t0
        results[backend] = torch.load(out)
        rows.append({"bench": "contrastive_memory", "op": "infonce", "mode": "fwd+bwd", "provider": backend,
                     "B": B, "G": B, "dim": D, "dtype": "fp32", "peak_mb": round(json.loads(proc.stdout)["peak_mb"], 1),
                     "seconds": round(seconds, 1)})  # fmt: skip
        print(rows[-1])
    ref, got = results["reference"], results["chunked"]
    diffs = {k: (got[k] - ref[k]).abs().max().item() for k in ref}
    ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
    for row in rows:
        row["chunked_over_naive"] = round(ratio, 4)
        row["max_diff_vs_naive"] = json.dumps({k: f"{v:.2e}" for k, v in diffs.items()})
    print(f"chunked / naive peak memory: {ratio:.3f} (goal <= 0.1); max differences: {diffs}")
    return rows


def bench_attention_cpu(quick: bool) -> list[dict]:
    """Reference vs SDPA on the CPU, forward+backward, fp32 (median of repeats after a warm-up)."""
    rows, N, H, Dh = [], 196, 12, 64
    for B, T in ((1, 4),) if quick else ((1, 4), (2, 4), (1, 8)):
        for op in ("temporal", "spatial"):
            rows_count = N * T if op == "temporal" else 1 + N * T
            qkv = torch.randn(B, rows_count, 3 * H * Dh, requires_grad=True)
            for provider in ("reference", "sdpa"):
                fn = A.temporal_attention if op == "temporal" else A.spatial_attention

                def run(fn=fn, provider=provider, qkv=qkv, T=T, op=op):
                    out = fn(qkv, T, H, backend=provider)
                    sum(o.sum() for o in ((out,) if op == "temporal" else out)).backward()

                run()
                times = []
                for _ in range(3 if quick else 5):
                    t0 = time.perf_counter()
                    run()
                    times.append((time.perf_counter() - t0) * 1e3)
                rows.append({"bench": "attention_cpu", "op": op, "mode": "fwd+bwd", "provider": provider, "B": B,
                             "T": T, "tokens": 1 + N, "heads": H, "head_dim": Dh, "dtype": "fp32",
                             "ms_p50": round(statistics.median(times), 2), "ms_p20": round(min(times), 2),
                             "ms_p80": round(max(times), 2)})  # fmt: skip
                print(rows[-1])
    return rows


# -------------------------------------------------------------------------------------------- output


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("ms_p50") and r["bench"] in ("attention", "attention_cpu")]
    memory = [r for r in rows if r["bench"] in ("contrastive_memory", "contrastive") and r.get("peak_mb")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    labels = sorted({f"{r['op']} {r['mode']} B{r['B']} T{r['T']}" for r in timed})
    providers = sorted({r["provider"] for r in timed})
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        by_label = {
            f"{r['op']} {r['mode']} B{r['B']} T{r['T']}": r["ms_p50"] for r in timed if r["provider"] == provider
        }
        axes[0].bar([j + i * width for j in range(len(labels))], [by_label.get(label, 0) for label in labels],
                    width, label=provider)  # fmt: skip
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
    axes[0].set_ylabel("ms (median)")
    axes[0].set_yscale("log")
    axes[0].set_title(f"divided attention, 197 tokens, 12 x 64 ({device})")
    axes[0].legend()
    names = [f"{r['provider']}\nB={r['B']} G={r['G']}" for r in memory]
    axes[1].bar(range(len(memory)), [r["peak_mb"] for r in memory], color="tab:orange")
    axes[1].set_xticks(range(len(memory)), names, fontsize=7)
    axes[1].set_ylabel("peak memory of fwd+bwd, MB")
    axes[1].set_yscale("log")
    axes[1].set_title("contrastive loss, D = 256")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], env: dict) -> None:
    """Append to the CSV (one row per measurement, tagged with the environment) and rewrite the JSON."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    tagged = [env | row for row in rows]
    columns = list(env) + sorted({k for row in rows for k in row}, key=lambda k: (k not in rows[0], k))
    csv_path = RESULTS / "bench_kernels.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(tagged)
    (RESULTS / "bench_kernels.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    plot(rows, RESULTS / f"bench_kernels_{tag}.png", env["device"])
    print(f"wrote {csv_path}, {RESULTS / 'bench_kernels.json'}, {RESULTS / f'bench_kernels_{tag}.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes; B = 4096 for the CPU memory run")
    parser.add_argument("--memory-batch", type=int, default=16384, help="B for the CPU contrastive memory run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_kernels"))
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="GPU: comma-separated input dtypes to time")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(env)
    rows = []
    if torch.cuda.is_available():
        dtypes = args.dtypes.split(",")
        rows += bench_attention_gpu(env, args.quick, dtypes)
        rows += bench_contrastive_gpu(args.quick, dtypes)
    else:
        print("No CUDA GPU: the Triton/xformers/SDPA GPU timings, TFLOP/s and HBM figures need a GPU; running the "
              "CPU part only (contrastive memory, reference vs SDPA attention).")  # fmt: skip
    rows += bench_contrastive_memory_cpu(4096 if args.quick else args.memory_batch, 256, args.work)
    rows += bench_attention_cpu(args.quick)
    env["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write(rows, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
