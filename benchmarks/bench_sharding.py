"""Sharder throughput against a bare PyAV transcode, worker scaling, and the keyframe-interval (GOP) sweep.

    .venv/bin/python benchmarks/bench_sharding.py                     # everything (~5 min on 2 cores)
    .venv/bin/python benchmarks/bench_sharding.py --skip-gop-sweep    # throughput only
    .venv/bin/python benchmarks/bench_sharding.py --clips 8 --repeats 1 --seconds 1   # smoke run (~30 s)

Inputs: ``--clips`` synthetic 640x360 H.264 sources made here (a seeded texture panning under a moving block,
so motion search and rate control do real work), 30 fps, one keyframe per clip and 3 B-frames: the "as
downloaded" case the sharder exists for.

Throughput (medians of ``--repeats`` runs, same inputs, same output settings: 256 px short side, H.264 CRF 23,
preset veryfast, keyframe every 6 (the default), no B-frames, one encoder thread):

* ``bare``: a minimal PyAV loop (decode -> scale -> encode into memory), one process: the cost floor.
* ``shard_w1`` / ``shard_w2``: ``alpro shard`` with 1 and 2 worker processes, writing shards to disk, including
  hashing, the validating decode of every stored clip, tar + index writing.
Goals: ``shard_w1 / bare >= 0.8`` and ``shard_w2 / shard_w1 >= 1.7`` (needs 2 idle cores).

GOP sweep: the same sources stored with keyframe interval K; per K the stored bytes and, for sparse samples of
4 / 8 / 16 frames (ALPRO's random sorted frame indices), the frames a decoder must decode when it seeks to the
keyframe before each target and decodes forward (counted exactly from the keyframe positions), plus the
measured PyAV time per sample.

Rows go to ``benchmarks/results/bench_sharding.{json,csv}`` with machine, versions and load average.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import shutil
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import webdataset
from av.video.reformatter import Interpolation
from machine import machine_info  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)
from sources import source_clips, write_manifest

from alpro.sharding.media import MediaLimits, VideoSettings, output_size, transcode_video
from alpro.sharding.shard import DEFAULT_GOP, shard_manifest

RESULTS = Path(__file__).parent / "results"
GOPS = (1, 4, 6, 8, 16, 32, 250)
SPARSE = (4, 8, 16)


# ------------------------------------------------------------------------------------------------ inputs


def prepare(work: Path, n: int, seconds: float) -> tuple[list[Path], Path]:
    clips = source_clips(work / "src", n, seconds, tag=f"_{seconds:g}s")
    manifest = write_manifest(work / f"manifest_{n}_{seconds:g}.jsonl", clips, "clip {stem}")
    return clips, manifest


# ------------------------------------------------------------------------------------------------ throughput


def bare_transcode(path: Path, gop: int = DEFAULT_GOP, short_side: int = 256) -> bytes:
    """What a minimal PyAV script would do with the same output settings (no checks, no tar, no validation)."""
    out = io.BytesIO()
    with av.open(str(path)) as src, av.open(out, "w", format="mp4") as dst:
        ist = src.streams.video[0]
        ist.codec_context.thread_count = 1
        width, height = output_size(ist.codec_context.width, ist.codec_context.height, short_side)
        ost = dst.add_stream("libx264", rate=ist.average_rate)
        ost.width, ost.height, ost.pix_fmt = width, height, "yuv420p"
        ost.codec_context.time_base = 1 / Fraction(ist.average_rate)
        ost.options = {"preset": "veryfast", "crf": "23",
                       "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:mbtree=0:threads=1"}
        for i, frame in enumerate(src.decode(ist)):
            frame = frame.reformat(width, height, "yuv420p", interpolation=Interpolation.AREA)
            frame.pts, frame.time_base = i, ost.codec_context.time_base
            dst.mux(ost.encode(frame))
        dst.mux(ost.encode(None))
    return out.getvalue()


def time_bare(clips: list[Path]) -> float:
    t0 = time.perf_counter()
    for clip in clips:
        bare_transcode(clip)
    return len(clips) / (time.perf_counter() - t0)


def time_sharder(manifest: Path, n: int, workers: int, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = shard_manifest(manifest, out, workers=workers, shard_size=16, progress=False)
    seconds = time.perf_counter() - t0
    assert summary.written == n, summary.table()
    return n / seconds


# ------------------------------------------------------------------------------------------------ GOP sweep


def frames_decoded(keyframes: list[int], targets: list[int]) -> int:
    """Frames a forward-only decoder decodes for sorted ``targets``: it seeks to the keyframe before a target
    unless it can reach the target by decoding on from where it is (no keyframe in between)."""
    pos, total = -1, 0  # pos: index of the last decoded frame
    for t in targets:
        key = max(k for k in keyframes if k <= t)
        start = pos + 1 if key <= pos < t else key
        if pos >= t:  # already past it (duplicate index)
            continue
        total += t - start + 1
        pos = t
    return total


def sparse_targets(num_frames: int, n: int, rng: random.Random) -> list[int]:
    return sorted(rng.sample(range(num_frames), min(n, num_frames)))


def decode_sparse(data: bytes, keyframes: list[int], pts_step: int, start_pts: int, targets: list[int]) -> int:
    """Seek + forward decode with PyAV, the way the CPU loader reads sparse frames; returns frames decoded."""
    decoded, pos = 0, -1
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        frames = None
        for t in targets:
            key = max(k for k in keyframes if k <= t)
            if not (key <= pos < t):
                c.seek(start_pts + key * pts_step, stream=stream, backward=True)
                frames = c.decode(stream)
            for frame in frames:
                decoded += 1
                pos = (frame.pts - start_pts) // pts_step
                if pos >= t:
                    frame.to_ndarray(format="rgb24")
                    break
    return decoded


def gop_sweep(clips: list[Path], draws: int) -> list[dict]:
    rows = []
    limits = MediaLimits()
    for gop in GOPS:
        stored = [transcode_video(clip.read_bytes(), VideoSettings(gop=gop), limits) for clip in clips]
        size = sum(len(m.data) for m in stored)
        row = {"gop": gop, "bytes_per_clip": round(size / len(stored)),
               "frames_per_clip": round(statistics.mean(m.num_frames for m in stored), 1)}
        for n in SPARSE:
            rng = random.Random(n)
            counted, timed, decoded = [], [], []
            for m in stored:
                for _ in range(draws):
                    targets = sparse_targets(m.num_frames, n, rng)
                    counted.append(frames_decoded(m.keyframes, targets))
                    t0 = time.perf_counter()
                    decoded.append(decode_sparse(m.data, m.keyframes, m.pts_per_frame, m.start_pts, targets))
                    timed.append(time.perf_counter() - t0)
            row[f"decoded_{n}"] = round(statistics.mean(counted), 1)
            row[f"pyav_decoded_{n}"] = round(statistics.mean(decoded), 1)
            row[f"ms_{n}"] = round(1000 * statistics.median(timed), 2)
        rows.append(row)
        print(f"  gop {gop:3d}: {row['bytes_per_clip'] / 1024:7.1f} KB/clip  "
              + "  ".join(f"{n} frames: {row[f'decoded_{n}']:5.1f} decoded, {row[f'ms_{n}']:6.2f} ms" for n in SPARSE),
              flush=True)
    base = next(r for r in rows if r["gop"] == 250)["bytes_per_clip"]
    for r in rows:
        r["size_vs_gop250"] = round(r["bytes_per_clip"] / base, 3)
    return rows


# ------------------------------------------------------------------------------------------------ main


def machine() -> dict:
    return machine_info(av=av.__version__, libavcodec=".".join(map(str, av.library_versions["libavcodec"])),
                        webdataset=webdataset.__version__, numpy=np.__version__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each source clip")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--gop-clips", type=int, default=12, help="clips used by the GOP sweep")
    p.add_argument("--draws", type=int, default=5, help="random sparse samples per clip in the GOP sweep")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_sharding"), help="scratch directory")
    p.add_argument("--skip-gop-sweep", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg_1m']}", flush=True)
    clips, manifest = prepare(args.work, args.clips, args.seconds)
    print(f"inputs: {len(clips)} clips of {args.seconds:g} s, 640x360 H.264, GOP 250, 3 B-frames", flush=True)
    runs: dict[str, list[float]] = {"bare": [], "shard_w1": [], "shard_w2": []}
    for r in range(args.repeats):  # interleaved, so slow phases of a shared machine hit every configuration
        runs["bare"].append(time_bare(clips))
        runs["shard_w1"].append(time_sharder(manifest, len(clips), 1, args.work / "out_w1"))
        runs["shard_w2"].append(time_sharder(manifest, len(clips), 2, args.work / "out_w2"))
        print(f"  run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} clips/s" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    throughput = {
        **{f"{k}_clips_per_s": round(v, 3) for k, v in med.items()},
        "shard_w1_vs_bare": round(med["shard_w1"] / med["bare"], 3),
        "shard_w2_vs_w1": round(med["shard_w2"] / med["shard_w1"], 3),
        "runs": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "clips": len(clips), "seconds_per_clip": args.seconds, "repeats": args.repeats,
    }
    print(f"sharder (1 worker) / bare PyAV: {throughput['shard_w1_vs_bare']:.2f}x (goal >= 0.8); "
          f"2 workers / 1: {throughput['shard_w2_vs_w1']:.2f}x (goal >= 1.7)", flush=True)
    sweep = []
    if not args.skip_gop_sweep:
        print(f"GOP sweep on {args.gop_clips} clips, {args.draws} sparse draws per clip:", flush=True)
        sweep = gop_sweep(clips[: args.gop_clips], args.draws)

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "throughput": throughput, "gop_sweep": sweep, "default_gop": DEFAULT_GOP,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    (args.out / "bench_sharding.json").write_text(json.dumps(result, indent=1) + "\n")
    with open(args.out / "bench_sharding.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["bench", "config", "value", "unit", "clips", "date", "cpu", "cores", "loadavg_1m", "av"])
        common = [len(clips), info["date"], info["cpu"], info["cores"], info["loadavg_1m"], info["av"]]
        for k in ("bare", "shard_w1", "shard_w2"):
            writer.writerow(["throughput", k, throughput[f"{k}_clips_per_s"], "clips/s", *common])
        writer.writerow(["throughput", "shard_w1_vs_bare", throughput["shard_w1_vs_bare"], "ratio", *common])
        writer.writerow(["throughput", "shard_w2_vs_w1", throughput["shard_w2_vs_w1"], "ratio", *common])
        for row in sweep:
            writer.writerow(["gop", f"gop{row['gop']}_bytes", row["bytes_per_clip"], "bytes/clip", *common])
            for n in SPARSE:
                writer.writerow(["gop", f"gop{row['gop']}_decoded_{n}", row[f"decoded_{n}"], "frames/sample",
                                 *common])
                writer.writerow(["gop", f"gop{row['gop']}_ms_{n}", row[f"ms_{n}"], "ms/sample", *common])
    print(f"wrote {args.out / 'bench_sharding.json'} and .csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
