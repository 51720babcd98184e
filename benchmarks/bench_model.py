"""Model size, forward FLOPs per clip and CPU step time.

    .venv/bin/python benchmarks/bench_model.py                 # everything, rows in benchmarks/results/
    .venv/bin/python benchmarks/bench_model.py --skip-timing   # FLOPs and parameters only (~20 s)

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no data), per
component and per clip, and reported as GMAC (= FLOPs / 2). The TimeSformer rows are cross-checked against
KERNELS.md §1.3's analytic estimate (97.9 / 195.8 / 392.1 GMAC at T = 4 / 8 / 16). Timing is forward+backward
of one training step of the ``debug`` and ``tiny`` presets on the CPU (median of ``--iters`` after warm-up), for
each ``--threads`` count.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from alpro.data.batch import Batch
from alpro.models import ModelConfig, build_model

RESULTS = Path(__file__).parent / "results"
KERNELS_ESTIMATE_GMAC = {4: 97.9, 8: 195.8, 16: 392.1}  # KERNELS.md §1.3, TimeSformer-B/16 at 224 px
STAGES = {  # (task, frames, text length, fusion passes per clip, text-encoder passes per clip)
    "pretrain": ("pretrain", 4, 30, 4, 2),  # VTM: 1 positive + 2 negatives; MLM: 1 masked text pass + 1 fusion
    "retrieval": ("retrieval", 8, 40, 3, 1),
    "qa": ("qa", 16, 40, 1, 1),
}


def gmac(fn, *args) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() / 2e9


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def flop_rows(preset: str) -> list[dict]:
    """Per-clip forward GMAC of each component and of each stage's training forward, at the paper's sizes."""
    cfg = ModelConfig.preset(preset)
    rows = []
    with torch.device("meta"), torch.no_grad():
        for stage, (task, T, L, fusions, text_passes) in STAGES.items():
            model = build_model(cfg, task, num_answers=1500).eval()
            P, D = cfg.vision.num_patches, cfg.text.hidden_size
            video = torch.empty(1, 3, T, cfg.vision.image_size, cfg.vision.image_size)
            ids = torch.zeros(1, L, dtype=torch.long)
            mask = torch.ones(1, L, dtype=torch.long)
            parts = {
                "video_encoder": gmac(model.encode_video, video),
                "text_encoder": gmac(model.encode_text, ids, mask),
                "fusion_pass": gmac(model.fuse, torch.empty(1, L, D), mask, torch.empty(1, 1 + P, D)),
            }
            total = parts["video_encoder"] + text_passes * parts["text_encoder"] + fusions * parts["fusion_pass"]
            if task == "pretrain":
                masked = torch.empty(round(0.15 * L), D)  # the MLM head runs on the ~15% masked tokens only
                parts["mlm_head"] = gmac(model.text_encoder.mlm_logits, masked)
                parts["prompter_video_encoder"] = parts["video_encoder"]  # same architecture, no backward
                total += parts["mlm_head"] + parts["prompter_video_encoder"]
            parts["training_forward_total"] = total
            params = count_params(model, trainable_only=True)
            for component, value in parts.items():
                row = {"bench": "flops", "preset": preset, "stage": stage, "frames": T, "text_len": L,
                       "component": component, "gmac_per_clip": round(value, 3), "trainable_params": params}
                if component == "video_encoder" and preset == "alpro-base":
                    row["kernels_md_estimate_gmac"] = KERNELS_ESTIMATE_GMAC[T]
                    row["rel_diff"] = round(value / KERNELS_ESTIMATE_GMAC[T] - 1, 4)
                rows.append(row)
    return rows


def step_time_rows(preset: str, batch_size: int, frames: int, iters: int) -> list[dict]:
    """Forward+backward of one pre-training step (all four losses) on the CPU."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset)
    model = build_model(cfg, "pretrain", vocab_size=1000)
    model.build_prompts(_Tokenizer(), [f"entity{i}" for i in range(cfg.num_entities)])
    model.train()
    B, L, S = batch_size, 16, cfg.vision.image_size
    ids = torch.randint(5, 1000, (B, L))
    labels = torch.full((B, L), -100)
    labels[:, 3:5] = ids[:, 3:5]
    pem = torch.zeros(B, cfg.vision.num_patches)
    pem[:, : max(1, cfg.vision.num_patches // 3)] = 1
    video = torch.randn(B, 3, frames, S, S)
    batch = Batch(type="video", keys=[str(i) for i in range(B)], video=video, input_ids=ids,
                  attention_mask=torch.ones_like(ids), mlm_input_ids=ids, mlm_labels=labels, crop_video=video,
                  pem_mask=pem)
    times = []
    for i in range(iters + 2):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return [{"bench": "cpu_step", "preset": preset, "task": "pretrain", "batch": B, "frames": frames,
             "image_size": S, "text_len": L, "threads": torch.get_num_threads(), "iters": iters,
             "fwd_bwd_s_median": round(median, 4), "clips_per_s": round(B / median, 2),
             "trainable_params": count_params(model, trainable_only=True)}]


class _Tokenizer:
    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        n = len(texts)
        return {"input_ids": torch.randint(5, 1000, (n, max_length)),
                "attention_mask": torch.ones(n, max_length, dtype=torch.long)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for bench_model.{json,csv}")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to time")
    args = ap.parse_args(argv)

    rows = []
    for preset in ("alpro-base", "tiny", "debug"):
        rows += flop_rows(preset)
    if not args.skip_timing:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            rows += step_time_rows("debug", batch_size=8, frames=4, iters=args.iters)
            rows += step_time_rows("tiny", batch_size=8, frames=4, iters=args.iters)
    stamp = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "torch": torch.__version__,
             "cpu": platform.processor() or platform.machine(), "loadavg_1m": round(os.getloadavg()[0], 2)}
    rows = [{**row, **stamp} for row in rows]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_model.json").write_text(json.dumps(rows, indent=1) + "\n")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(args.out / "bench_model.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        if row["bench"] == "flops" and row["preset"] == "alpro-base":
            check = f"  (KERNELS.md {row['kernels_md_estimate_gmac']})" if "kernels_md_estimate_gmac" in row else ""
            print(f"alpro-base {row['stage']:9s} T={row['frames']:2d} {row['component']:24s} "
                  f"{row['gmac_per_clip']:9.2f} GMAC{check}")
        elif row["bench"] == "cpu_step":
            print(f"{row['preset']:5s} pretrain step B={row['batch']} T={row['frames']} {row['image_size']}px: "
                  f"{row['fwd_bwd_s_median'] * 1000:.0f} ms fwd+bwd, {row['clips_per_s']} clips/s "
                  f"({row['threads']} threads)")
    print(f"wrote {len(rows)} rows to {args.out}/bench_model.{{json,csv}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
