"""Training throughput: clips/s and data-wait share of a preset at 1 and 2 processes (torchrun, ZeRO-2).

    .venv/bin/python benchmarks/bench_train.py                       # debug preset, 3 repeats (~4 min on 2 cores)
    .venv/bin/python benchmarks/bench_train.py --preset tiny --repeats 1

Goals (CPU): data-wait share <= 5 %, 2-process speed-up >= 1.5x. It runs the real trainer (pre-training with
VTC + VTM + MLM + PEM and a frozen prompter) on a small shapes-world corpus it builds first, reads the
per-interval throughput the trainer logs to ``metrics.jsonl`` (the first interval is warm-up and dropped),
and reports medians over ``--repeats`` interleaved runs. With CUDA it also reports MFU: achieved training FLOP/s
(3x the forward FLOPs per clip, counted with ``FlopCounterMode`` on the meta device) over the GPU's peak.
Rows (machine, versions, load average) go to ``benchmarks/results/bench_train_<preset>.{json,csv}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine_info  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PRESET_DATA = {  # frame size each preset expects, its pre-training resize, and the short side shards are stored at
    "debug": {"frame_size": 32, "resize": 36, "short_side": 40},
    "tiny": {"frame_size": 64, "resize": 72, "short_side": 72},
}


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "alpro", *args], check=True, cwd=REPO, capture_output=True)


def build_data(work: Path, clips: int, short_side: int) -> dict[str, Path]:
    corpus, shards = work / "corpus", work / f"shards_{short_side}"
    if not (corpus / "manifest.jsonl").is_file():
        sh("synth", str(corpus), "--num-clips", str(clips), "--quiet", "--overwrite")
    out = {}
    for name, split, media in (("train_video", "train", "video"), ("train_image", "train", "image")):
        out[name] = shards / name
        if not (out[name] / "index.json.zst").is_file():
            sh("shard", str(corpus / "manifest.jsonl"), str(out[name]), "--split", split, "--media", media,
               "--fps", "8", "--short-side", str(short_side), "--no-progress")
    out["entities"] = corpus / "entities.txt"
    return out


def train(stage: str, run: Path, data: dict[str, Path], preset: str, nproc: int, steps: int, batch: int,
          workers: int, extra: list[str]) -> list[dict]:
    args = ["--config", str(REPO / "launch/configs/debug" / f"{stage}.yaml"), "--train.run_dir", str(run),
            "--model.preset", preset, "--data.frame_size", str(PRESET_DATA[preset]["frame_size"]),
            "--data.resize", str(PRESET_DATA[preset]["resize"]), "--data.batch_size", str(batch),
            "--data.num_workers", str(workers), "--data.train.video", str(data["train_video"]),
            "--data.train.image", str(data["train_image"]), "--data.test.video", "null",
            "--train.steps", str(steps), "--train.log_interval", str(max(1, steps // 5)), *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "alpro", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "alpro.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets per rank; the same for the 1-process run
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def summarise(rows: list[dict]) -> dict[str, float]:
    windows = [r for r in rows if r.get("kind") == "train"][1:]  # drop the warm-up interval
    return {"clips_per_s": statistics.mean(r["throughput/clips_per_s"] for r in windows),
            "data_wait": statistics.mean(r["throughput/data_wait"] for r in windows)}


def gpu_mfu(preset: str, clips_per_s: float) -> float | None:
    """Model FLOP utilisation of the pre-training step on a known GPU (bf16 dense peak); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_model import flop_rows  # forward GMAC per clip, counted on the meta device

    rows = flop_rows(preset)
    gmac = next(r["gmac_per_clip"] for r in rows if r["stage"] == "pretrain" and r["component"] ==
                "training_forward_total")
    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in peaks.items() if k in name), None)
    # training FLOPs ~= 3x forward (backward is ~2x forward); the frozen prompter has no backward: ignored.
    return None if peak is None else 3 * 2 * gmac * 1e9 * clips_per_s / peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESET_DATA), default="debug")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clips", type=int, default=240, help="clips in the benchmark corpus")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_train"))
    args = p.parse_args(argv)

    data = build_data(args.work, args.clips, PRESET_DATA[args.preset]["short_side"])
    prompter = args.work / f"prompter_{args.preset}"
    if not (prompter / "final" / "model.safetensors").is_file():
        train("prompter", prompter, data, args.preset, 1, 2, args.batch_size, 0, ["--train.resume", "auto"])
    extra = ["--init.prompter", str(prompter / "final/model.safetensors"), "--init.entities", str(data["entities"]),
             "--train.tensorboard", "false"]
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for rep in range(args.repeats):
        for nproc in (1, 2):  # interleaved, so drifting load hits both alike
            run = args.work / f"run_{args.preset}_{nproc}_{rep}_{int(time.time())}"
            runs[nproc].append(summarise(train("pretrain", run, data, args.preset, nproc, args.steps,
                                               args.batch_size, args.workers, extra)))
            print(f"repeat {rep} nproc {nproc}: {runs[nproc][-1]}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    speedup = med[2]["clips_per_s"] / med[1]["clips_per_s"]
    import deepspeed
    import torch

    row = {
        "bench": "train", "preset": args.preset, "steps": args.steps, "batch_per_rank": args.batch_size,
        "workers_per_rank": args.workers, "repeats": args.repeats,
        "clips_per_s_1proc": med[1]["clips_per_s"], "clips_per_s_2proc": med[2]["clips_per_s"],
        "speedup_2v1": speedup, "data_wait_1proc": med[1]["data_wait"], "data_wait_2proc": med[2]["data_wait"],
        "mfu_2proc": gpu_mfu(args.preset, med[2]["clips_per_s"]),
        "runs": runs, **machine_info(torch=torch.__version__, deepspeed=deepspeed.__version__,
                                     device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"bench_train_{args.preset}.json").write_text(json.dumps(row, indent=1))
    flat = {k: v for k, v in row.items() if k != "runs"}
    with open(RESULTS / f"bench_train_{args.preset}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat))
        writer.writeheader()
        writer.writerow(flat)
    print(f"\n{args.preset}: 1 process {med[1]['clips_per_s']:.1f} clips/s (data wait {100 * med[1]['data_wait']:.1f} %),"
          f" 2 processes {med[2]['clips_per_s']:.1f} clips/s (data wait {100 * med[2]['data_wait']:.1f} %), "
          f"speed-up {speedup:.2f}x (goals: data wait <= 5 %, speed-up >= 1.5x)")
    if row["mfu_2proc"] is None:
        print("MFU needs a GPU (CUDA): not measured on this machine.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
