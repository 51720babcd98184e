"""Loader throughput per CPU core: the original's decord-per-file way against this loader (PyAV, DALI CPU).

    .venv/bin/python benchmarks/bench_loader.py                                         # ~8 min on 2 cores
    .venv/bin/python benchmarks/bench_loader.py --clips 4 --seconds 2 --repeats 1 --passes 1   # smoke (~1 min)

Inputs (made once, cached in ``--work``): 640x360 H.264 clips at 30 fps with one keyframe per clip and 3
B-frames (a textured scene panning under a moving block), the "realistic inputs" of a web crawl. They are
sharded three ways with ``alpro shard``: ``--copy`` (the source stream as is: 360p, long GOP), the default
transcode (short side 256, keyframe every 6, no B-frames, H.264) and the same transcode in VP9 (for DALI on
the CPU).

Every configuration delivers the same clips with the same frame indices (the loader's plan: 4 ``headtail``
frames, the pre-training default) in one process on one core, so clips/s is clips/s/core:

- ``decord_raw``: the original's way: ``decord.VideoReader(mp4, width=256, height=256)`` per raw file,
  ``get_batch`` of the sampled frames, then the same crop / RandAugment / normalisation as the loader.
- ``pyav_copy``, ``pyav_transcoded``: this loader's PyAV path (``num_workers=0``): the full pre-training batch
  (frames, crop, RandAugment, PEM box and crop input, caption tokens, MLM). Loader rows time their second pass
  (steady state: worker start-up and pipeline build excluded); that pass is the next epoch, so its frame
  indices are other draws of the same sampler.
- ``dali_cpu_vp9``: the same loader with ``decoder: dali`` on the VP9 shards, one DALI thread.
- ``decode_only_copy``, ``decode_only_transcoded``: the limit: bare PyAV decoding exactly the GOPs the sampled
  frames need (seek to the keyframe before a target unless decoding on reaches it), no RGB, no pipeline.
- ``pyav_transcoded_1w``, ``pyav_transcoded_2w``: the loader with 1 and 2 DataLoader workers (clips/s of the
  whole machine, for scaling; torch one thread in the main process and in each worker).

The two throughput ratios of issue 12.5 are printed last: ``2 workers / 1 worker`` (goal >= 1.7 on 2 cores) and
``loader / bare decoding`` = (b) ``pyav_transcoded`` / (d) ``decode_only_transcoded`` (goal >= 0.8), with the
load average before and after the run (the ratios mean little on a machine that is busy with other work).

Configurations are interleaved per repeat and the median is reported. Results: ``results/bench_loader.json``
and ``results/bench_loader.csv`` with the machine, versions and load average.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation, VideoReformatter
from machine import machine_info  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)
from sources import source_clips, write_manifest

from alpro.config import from_dict
from alpro.data import DataConfig, build_tokenizer, build_train_loader
from alpro.data.decode import OPEN_OPTIONS, meta_from_json
from alpro.data.samples import read_meta
from alpro.data.shards import Reader, resolve
from alpro.data.transforms import ClipParams, ClipTransform

RESULTS = Path(__file__).parent / "results"
_RGB = VideoReformatter()


def prepare(work: Path, n: int, seconds: float) -> tuple[list[Path], dict[str, Path]]:
    """Source clips and their three shard sets (built by `alpro shard` in a subprocess, cached)."""
    clips = source_clips(work / f"src_{seconds:g}s", n, seconds, pan=3)
    manifest = write_manifest(work / f"manifest_{n}_{seconds:g}.jsonl", clips, "a panning view {stem}")
    sets = {"copy": ["--copy"], "transcoded": [], "vp9": ["--codec", "vp9"]}
    out = {}
    for name, args in sets.items():
        out[name] = work / f"shards_{name}_{n}_{seconds:g}"
        if not (out[name] / "index.json.zst").exists():
            cmd = [sys.executable, "-m", "alpro.sharding.shard", str(manifest), str(out[name]), "--no-progress",
                   "--workers", str(min(2, os.cpu_count() or 1)), *args]
            subprocess.run(cmd, check=True)
    return clips, out


def data_config(shards: Path, decoder: str = "pyav", workers: int = 0, augment_on: str = "loader") -> DataConfig:
    return from_dict(DataConfig, {"train": {"video": str(shards)}, "num_frames": 4, "frame_size": 224,
                                  "batch_size": 4, "num_workers": workers, "decoder": decoder, "dali_threads": 1,
                                  "shuffle_block": 0, "augment_on": augment_on})


def cpu_seconds() -> tuple[float, float]:
    """(this process, its live child processes -- the DataLoader workers) CPU seconds, user + system. CPU time
    per clip does not depend on how busy the machine is, so it predicts the quiet machine's ratios on a shared
    one (see ``cpu_estimates``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    children = 0.0
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            children += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return time.process_time(), children


def run_loader(cfg: DataConfig, tokenizer, passes: int) -> tuple[float, int, dict]:
    """Steady state: one untimed pass (starts workers / the DALI pipeline), then ``passes`` timed passes over
    the same clips (later epochs: other frame draws of the same sampler).

    With ``augment_on: device`` the loader leaves each batch's RandAugment, normalisation and PEM crop input to
    the training device: the GPU on a GPU machine, this CPU here. The timed passes measure what the CPU side
    does on a GPU machine (batches are left unfinished, as the GPU would finish them); the device step is then
    timed apart on the last pass's batches (``device_step_cpu_s``: what it costs when the device is a CPU)."""
    loader = build_train_loader(cfg, "pretrain", tokenizer, rank=0, world_size=1, seed=0)
    sum(len(batch) for batch in loader)
    loader.metrics()  # reset the window
    finish, unfinished = loader._finish, []
    if cfg.augments_on_device():
        loader._finish = lambda batch: unfinished.append(batch) or batch
    (main0, workers0), t0 = cpu_seconds(), time.perf_counter()
    clips = sum(len(batch) for _ in range(passes) for batch in loader)
    seconds, (main1, workers1) = time.perf_counter() - t0, cpu_seconds()
    metrics = loader.metrics()
    loader.close()
    metrics.update(main_cpu_s=main1 - main0, workers_cpu_s=workers1 - workers0)
    if unfinished:
        last = unfinished[-len(unfinished) // passes:]
        c0 = time.process_time()
        for batch in last:
            finish(batch)
        metrics["device_step_cpu_s"] = (time.process_time() - c0) * len(unfinished) / len(last)
    return seconds, clips, metrics


def run_decord(clips: list[Path], plan: dict[str, list[int]], params: dict[str, ClipParams],
               passes: int) -> tuple[float, int]:
    """The original's data path: decord per file, resized to 256x256 inside decord, then the same transform."""
    import decord

    decord.bridge.set_bridge("torch")
    tf = ClipTransform(data_config(Path(".")), "pretrain", train=True)
    t0 = time.perf_counter()
    for _ in range(passes):
        for path in clips:
            vr = decord.VideoReader(str(path), width=256, height=256, num_threads=1)
            frames = vr.get_batch(plan[path.stem]).permute(0, 3, 1, 2)  # (T, C, H, W) uint8
            tf.apply(frames, params[path.stem])
    return time.perf_counter() - t0, len(clips) * passes


def gop_decode(data: bytes, keyframes: np.ndarray, start_pts: int, step: int, targets: list[int],
               rgb: int = 0) -> int:
    """Bare PyAV: decode exactly the GOPs the targets need, forward only, no RGB (``rgb``: also convert each
    target to an rgb24 ``rgb`` x ``rgb`` array, as the loader does). Returns frames decoded."""
    decoded, pos = 0, -1
    with av.open(io.BytesIO(data), options=OPEN_OPTIONS) as container:  # opened as the loader opens
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        frames = None
        for t in sorted(set(targets)):
            kf = int(keyframes[np.searchsorted(keyframes, t, side="right") - 1])
            if frames is None or kf > pos + 1:
                if kf > 0:
                    container.seek(start_pts + kf * step, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                pos = kf - 1
            while pos < t:
                frame = next(frames)
                decoded += 1
                pos = round((frame.pts - start_pts) / step)
            if rgb:  # one swscale context, one thread, bilinear: as the loader converts
                _RGB.reformat(frame, width=rgb, height=rgb, format="rgb24", interpolation=Interpolation.BILINEAR,
                              threads=1).to_ndarray()
    return decoded


def run_decode_only(shards: Path, plan: dict[str, list[int]], passes: int) -> tuple[float, int, int]:
    shardset, reader = resolve(str(shards), "bench"), Reader()
    clips = []
    for gid in range(len(shardset)):
        key, members = reader.sample(*shardset.locate(gid))
        meta = meta_from_json(read_meta(members))
        clips.append((members["mp4"], meta, plan[key]))
    t0, c0 = time.perf_counter(), time.process_time()
    decoded = sum(gop_decode(data, m.keyframes, m.start_pts, m.pts_per_frame, idx)
                  for _ in range(passes) for data, m, idx in clips)
    return time.perf_counter() - t0, len(clips) * passes, {"decoded": decoded, "main_cpu_s": time.process_time() - c0}


def run_read_decode_rgb(shards: Path, plan: dict[str, list[int]], passes: int, size: int) -> tuple[float, int, dict]:
    """(d) plus what any loader reading from tar shards pays before its own work: read the sample from its
    shard (page cache), parse its metadata, and convert each target frame to RGB at the decode size."""
    shardset, reader = resolve(str(shards), "bench"), Reader()
    where = [shardset.locate(gid) for gid in range(len(shardset))]
    t0, c0, decoded = time.perf_counter(), time.process_time(), 0
    for _ in range(passes):
        for shard, j in where:
            key, members = reader.sample(shard, j)
            m = meta_from_json(read_meta(members))
            decoded += gop_decode(members["mp4"], m.keyframes, m.start_pts, m.pts_per_frame, plan[key], rgb=size)
    return time.perf_counter() - t0, len(where) * passes, {"decoded": decoded, "main_cpu_s": time.process_time() - c0}


def cpu_estimates(cpu: dict[str, tuple[float | None, float | None]]) -> dict[str, float | None]:
    """The two ratios a quiet 2-core machine would show, from CPU ms per clip (main process, workers):
    bare decoding over the in-process loader; and 2 workers over 1 when nothing but CPU time limits them:
    1 worker delivers 1 / max(worker, main) clips per ms, 2 workers min(2 / (main + workers), 1 / main)."""
    out: dict[str, float | None] = {"pyav_transcoded_over_decode_only": None,
                                    "pyav_transcoded_device_over_decode_only": None,
                                    "two_workers_over_one_worker": None}
    for name in ("pyav_transcoded", "pyav_transcoded_device"):
        if cpu.get(name, (None,))[0] and cpu.get("decode_only_transcoded", (None,))[0]:
            out[f"{name}_over_decode_only"] = round(cpu["decode_only_transcoded"][0] / cpu[name][0], 2)
    (m1, w1), (m2, w2) = cpu.get("pyav_transcoded_1w", (None, None)), cpu.get("pyav_transcoded_2w", (None, None))
    if m1 and w1 and m2 and w2:
        out["two_workers_over_one_worker"] = round(min(2 / (m2 + w2), 1 / m2) * max(w1, m1), 2)
    return out


def machine() -> dict:
    import decord
    import nvidia.dali

    return machine_info(torch=torch.__version__, av=av.__version__,
                        libavcodec=".".join(map(str, av.library_versions["libavcodec"])), decord=decord.__version__,
                        dali=nvidia.dali.__version__, numpy=np.__version__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each source clip")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--passes", type=int, default=3, help="timed passes over the clips per configuration and repeat")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_loader"))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--skip-workers", action="store_true", help="skip the 1- and 2-worker runs")
    p.add_argument("--configs", default="", help="comma-separated subset of configurations to run (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    clips, shards = prepare(args.work, args.clips, args.seconds)
    tokenizer = build_tokenizer(train_texts=[f"a panning view {c.stem}" for c in clips])

    # The plan (frame indices and augmentation per clip) of the transcoded loader; every configuration uses it.
    planner = build_train_loader(data_config(shards["transcoded"]), "pretrain", tokenizer, 0, 1, seed=0)
    items = [item for step in planner.plan() for item in step["items"]]
    plan = {i["key"]: i["frames"] for i in items}
    params = {i["key"]: i["clip"] for i in items}
    if len(plan) < len(clips):
        raise SystemExit(f"only {len(plan)} of {len(clips)} clips were sharded")

    n = args.passes
    configs = {
        "decord_raw": lambda: run_decord(clips, plan, params, n) + (None,),
        "pyav_copy": lambda: run_loader(data_config(shards["copy"]), tokenizer, n),
        "pyav_transcoded": lambda: run_loader(data_config(shards["transcoded"]), tokenizer, n),
        "pyav_transcoded_device": lambda: run_loader(data_config(shards["transcoded"], augment_on="device"),
                                                     tokenizer, n),
        "dali_cpu_vp9": lambda: run_loader(data_config(shards["vp9"], decoder="dali"), tokenizer, n),
        "decode_only_copy": lambda: run_decode_only(shards["copy"], plan, n),
        "decode_only_transcoded": lambda: run_decode_only(shards["transcoded"], plan, n),
        "read_decode_rgb_transcoded": lambda: run_read_decode_rgb(shards["transcoded"], plan, n, 256),
    }
    if not args.skip_workers:
        for w in (1, 2):
            configs[f"pyav_transcoded_{w}w"] = (lambda w=w: run_loader(data_config(shards["transcoded"], workers=w),
                                                                       tokenizer, n))
    if args.configs:
        wanted = args.configs.split(",")
        unknown = sorted(set(wanted) - set(configs))
        if unknown:
            raise SystemExit(f"unknown configurations {unknown}; known: {sorted(configs)}")
        configs = {name: fn for name, fn in configs.items() if name in wanted}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.repeats):
        for name, fn in configs.items():
            seconds, count, extra = fn()
            row = {"seconds": seconds, "clips": count, "clips_per_s": count / seconds}
            if isinstance(extra, dict) and "decoded" in extra:
                row["decoded_per_delivered"] = extra["decoded"] / (4 * count)
            elif isinstance(extra, dict):
                row["decoded_per_delivered"] = extra["decoded_per_delivered"]
            if isinstance(extra, dict):
                row["main_cpu_ms_per_clip"] = 1000 * extra["main_cpu_s"] / count
                row["workers_cpu_ms_per_clip"] = 1000 * extra.get("workers_cpu_s", 0.0) / count
                if extra.get("device_step_cpu_s"):
                    row["device_step_cpu_ms_per_clip"] = 1000 * extra["device_step_cpu_s"] / count
            runs[name].append(row)
            cpu = (f", CPU ms/clip: main {row['main_cpu_ms_per_clip']:.1f} workers {row['workers_cpu_ms_per_clip']:.1f}"
                   if "main_cpu_ms_per_clip" in row else "")
            print(f"repeat {r + 1}/{args.repeats} {name:24s} {row['clips_per_s']:7.2f} clips/s "
                  f"({count} clips, {seconds:.2f} s{cpu})", flush=True)

    rows = []
    for name, rs in runs.items():
        rates = [x["clips_per_s"] for x in rs]
        ratio = [x["decoded_per_delivered"] for x in rs if "decoded_per_delivered" in x]
        row = {"config": name, "clips_per_s": round(statistics.median(rates), 3), "runs": [round(x, 3) for x in rates],
               "decoded_per_delivered": round(statistics.median(ratio), 3) if ratio else None}
        for key in ("main_cpu_ms_per_clip", "workers_cpu_ms_per_clip", "device_step_cpu_ms_per_clip"):
            if any(key in x for x in rs):
                row[key] = round(statistics.median(x[key] for x in rs), 2)
        rows.append(row)
    by = {r["config"]: r["clips_per_s"] for r in rows}
    ratio_of = lambda a, b: round(by[a] / by[b], 2) if a in by and b in by else None  # noqa: E731
    goals = {
        "pyav_transcoded_over_decord_raw": ratio_of("pyav_transcoded", "decord_raw"),
        "pyav_transcoded_over_decode_only": ratio_of("pyav_transcoded", "decode_only_transcoded"),
        "pyav_transcoded_device_over_decode_only": ratio_of("pyav_transcoded_device", "decode_only_transcoded"),
        "read_decode_rgb_over_decode_only": ratio_of("read_decode_rgb_transcoded", "decode_only_transcoded"),
        "two_workers_over_one_worker": ratio_of("pyav_transcoded_2w", "pyav_transcoded_1w"),
        "two_workers_over_in_process": ratio_of("pyav_transcoded_2w", "pyav_transcoded"),
        "decoded_per_delivered_transcoded": next((r["decoded_per_delivered"] for r in rows
                                                  if r["config"] == "pyav_transcoded"), None),
    }
    cpu = {r["config"]: (r.get("main_cpu_ms_per_clip"), r.get("workers_cpu_ms_per_clip")) for r in rows}
    goals["cpu_estimates"] = cpu_estimates(cpu)
    result = {"machine": machine(), "clips": args.clips, "seconds_per_clip": args.seconds, "repeats": args.repeats,
              "passes": args.passes,
              "frames_per_clip": 4, "sampling": "headtail", "rows": rows, "goals": goals, "runs": runs}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "bench_loader.json").write_text(json.dumps(result, indent=1))
    with open(args.results / "bench_loader.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "clips_per_s_median", "runs", "decoded_per_delivered", "date", "cpu", "loadavg_1m"])
        for r in rows:
            w.writerow([r["config"], r["clips_per_s"], " ".join(map(str, r["runs"])), r["decoded_per_delivered"],
                        result["machine"]["date"], result["machine"]["cpu"], result["machine"]["loadavg_1m"]])
    print(json.dumps({"rows": rows, "goals": goals}, indent=1))
    load_after = os.getloadavg()
    print(f"\nload average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} CPUs")
    est = goals["cpu_estimates"]
    print("ratio                                           measured  from CPU time per clip")
    print(f"2 workers / 1 worker (goal >= 1.7):             {goals['two_workers_over_one_worker']!s:8s}  "
          f"{est['two_workers_over_one_worker']}")
    print(f"loader (b) / bare decoding (d):                 {goals['pyav_transcoded_over_decode_only']!s:8s}  "
          f"{est['pyav_transcoded_over_decode_only']}")
    print(f"loader, augment_on device (b') / (d) (goal >= 0.8): {goals['pyav_transcoded_device_over_decode_only']!s:4s}"
          f"  {est['pyav_transcoded_device_over_decode_only']}")
    step = next((r.get("device_step_cpu_ms_per_clip") for r in rows if r["config"] == "pyav_transcoded_device"), None)
    if step is not None:
        print(f"  (b')'s device step (GPU work on a GPU machine) on this CPU: {step} ms of CPU per clip")
    if goals["read_decode_rgb_over_decode_only"] is not None:
        print(f"read + decode + RGB, no loader (d') / (d):      {goals['read_decode_rgb_over_decode_only']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
