"""``alpro inspect``: what is in a shard set (counts, durations, resolutions, fps, codecs, sizes, rejects).

Accepts a shard directory, a glob (``out/shard-*.tar``), a brace pattern (``out/shard-{000000..000009}.tar``) or
one tar. Reads only tar headers and the small ``KEY.json`` members (media bytes are seeked over), plus the
``_stats.json`` / ``rejects.jsonl`` files next to the shards when they exist. Shards made by other tools (no
``KEY.json``, or one without our fields) are counted too. ``--extract KEY`` writes one sample's members out.
"""

from __future__ import annotations

import glob
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import braceexpand

from alpro.errors import AlproError
from alpro.sharding._cli import OneLineParser

__all__ = ["resolve_shards", "inspect_shards", "extract_sample", "format_report", "main"]

_DURATION_BINS = ((1, "<1 s"), (2, "1-2 s"), (5, "2-5 s"), (10, "5-10 s"), (30, "10-30 s"), (60, "30-60 s"),
                  (float("inf"), ">=60 s"))


def resolve_shards(target: str | Path) -> list[Path]:
    """A directory, glob, brace pattern or file -> the sorted list of tar files it names."""
    text = str(target)
    path = Path(text)
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
    elif "{" in text:
        tars = [Path(p) for p in braceexpand.braceexpand(text)]
        missing = [p for p in tars if not p.is_file()]
        if missing:
            raise AlproError(f"{len(missing)} shard(s) of {text} do not exist (first: {missing[0]})")
    elif any(c in text for c in "*?["):
        tars = sorted(Path(p) for p in glob.glob(text))
    elif path.is_file():
        tars = [path]
    else:
        raise AlproError(f"no such shard, directory or pattern: {text}")
    if not tars:
        raise AlproError(f"no .tar shards found in {text}")
    return tars


def _split_key(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): webdataset's rule, the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def _scan(tar_path: Path) -> tuple[list[dict[str, Any]], int]:
    """Per-sample ``{key, exts, bytes, meta}`` of one shard, and the shard's size."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                s = samples.setdefault(key, {"key": key, "exts": [], "bytes": 0, "meta": None})
                s["exts"].append(ext)
                s["bytes"] += member.size
                if ext == "json":
                    f = tar.extractfile(member)
                    try:
                        s["meta"] = json.loads(f.read()) if f else None
                    except ValueError:
                        s["meta"] = None
    except (tarfile.TarError, OSError) as e:
        raise AlproError(f"{tar_path}: not a readable tar ({e})") from None
    return list(samples.values()), tar_path.stat().st_size


def _rejects_near(tars: list[Path]) -> Counter[str]:
    """Reject counts from the ``_stats.json`` of these shards (or ``rejects.jsonl`` when no stats exist)."""
    reasons: Counter[str] = Counter()
    found_stats = False
    for tar in tars:
        stats_path = tar.with_name(tar.name[: -len(".tar")] + "_stats.json")
        if stats_path.is_file():
            found_stats = True
            try:
                reasons.update(json.loads(stats_path.read_text(encoding="utf-8")).get("rejects_by_reason", {}))
            except ValueError:
                continue
    if not found_stats:
        for rejects in {t.parent / "rejects.jsonl" for t in tars}:
            if rejects.is_file():
                for line in rejects.read_text(encoding="utf-8", errors="replace").splitlines():
                    if line.strip():
                        reasons[json.loads(line).get("reason", "unknown")] += 1
    return reasons


def _duration_bin(d: float) -> str:
    return next(label for hi, label in _DURATION_BINS if d < hi)


def inspect_shards(target: str | Path) -> dict[str, Any]:
    """Summary of the shards named by ``target`` as plain data (what ``--json`` prints)."""
    tars = resolve_shards(target)
    media: Counter[str] = Counter()
    codecs: Counter[str] = Counter()
    resolutions: Counter[str] = Counter()
    fps_hist: Counter[str] = Counter()
    durations: Counter[str] = Counter()
    exts: Counter[str] = Counter()
    frames, total_duration, n_samples, no_meta, captions = 0, 0.0, 0, 0, 0
    shard_sizes, sample_sizes = [], []
    for tar in tars:
        samples, size = _scan(tar)
        shard_sizes.append(size)
        for s in samples:
            n_samples += 1
            sample_sizes.append(s["bytes"])
            exts.update(s["exts"])
            meta = s["meta"]
            if not isinstance(meta, dict) or "num_frames" not in meta:
                no_meta += 1
                continue
            kind = meta.get("media", "video")
            media[kind] += 1
            codecs[str(meta.get("codec"))] += 1
            resolutions[f"{meta.get('width')}x{meta.get('height')}"] += 1
            captions += len(meta.get("captions") or [])
            if kind == "video":
                frames += int(meta["num_frames"])
                total_duration += float(meta.get("duration") or 0.0)
                fps_hist[f"{float(meta.get('fps') or 0):.3g}"] += 1
                durations[_duration_bin(float(meta.get("duration") or 0.0))] += 1
    rejects = _rejects_near(tars)
    order = [label for _, label in _DURATION_BINS]
    return {
        "shards": len(tars),
        "samples": n_samples,
        "media": dict(media),
        "samples_without_metadata": no_meta,
        "frames": frames,
        "duration_s": round(total_duration, 3),
        "captions": captions,
        "members": dict(sorted(exts.items())),
        "codecs": dict(codecs.most_common()),
        "resolutions": dict(resolutions.most_common(10)),
        "fps": dict(fps_hist.most_common(10)),
        "durations": {label: durations[label] for label in order if durations[label]},
        "bytes": {"total": sum(shard_sizes), "shard_min": min(shard_sizes), "shard_max": max(shard_sizes),
                  "shard_mean": round(sum(shard_sizes) / len(shard_sizes)),
                  "sample_mean": round(sum(sample_sizes) / len(sample_sizes)) if sample_sizes else 0},
        "rejects": dict(sorted(rejects.items())),
        "files": [str(t) for t in tars],
    }


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`inspect_shards`."""
    mb = 1024 * 1024
    b = report["bytes"]
    lines = [
        f"{report['shards']} shard(s), {report['samples']} sample(s) "
        f"({', '.join(f'{n} {k}s' for k, n in report['media'].items()) or 'no alpro metadata'})",
        f"  frames {report['frames']}, video duration {report['duration_s']:.1f} s, captions {report['captions']}",
        f"  bytes {b['total'] / mb:.1f} MB total; per shard {b['shard_min'] / mb:.2f}-{b['shard_max'] / mb:.2f} MB "
        f"(mean {b['shard_mean'] / mb:.2f}); per sample mean {b['sample_mean'] / 1024:.1f} KB",
    ]
    if report["samples_without_metadata"]:
        lines.append(f"  {report['samples_without_metadata']} sample(s) without alpro KEY.json (foreign shards)")
    total = max(1, report["samples"])
    for title in ("durations", "resolutions", "fps", "codecs", "members", "rejects"):
        hist = report[title]
        if not hist:
            continue
        lines.append(f"  {title}:")
        width = max(len(str(k)) for k in hist)
        scale = max(hist.values())
        for k, n in hist.items():
            bar = "#" * max(1, round(30 * n / scale)) if title != "rejects" else ""
            pct = f"{100 * n / total:5.1f} %" if title not in ("members", "rejects") else ""
            lines.append(f"    {str(k).ljust(width)}  {n:7d}  {pct}  {bar}".rstrip())
    return "\n".join(lines)


def extract_sample(target: str | Path, key: str, to: str | Path = ".") -> list[Path]:
    """Write every member of sample ``key`` (``KEY.json``, ``KEY.mp4``, ...) into ``to``; return the paths."""
    out = Path(to)
    for tar_path in resolve_shards(target):
        with tarfile.open(tar_path, mode="r:") as tar:
            written = []
            for member in tar:
                if member.isfile() and _split_key(member.name)[0] == key:
                    f = tar.extractfile(member)
                    out.mkdir(parents=True, exist_ok=True)
                    dest = out / Path(member.name).name
                    dest.write_bytes(f.read() if f else b"")
                    written.append(dest)
                elif written:
                    return written  # members of a sample are contiguous
            if written:
                return written
    raise AlproError(f"no sample with key {key!r} in {target}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="alpro inspect", description="Summarise a shard set or extract a sample.")
    parser.add_argument("shards", help="shard directory, glob ('out/*.tar'), brace pattern or one .tar")
    parser.add_argument("--extract", metavar="KEY", help="write the members of sample KEY to --to")
    parser.add_argument("--to", default=".", help="directory for --extract (default: current)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        if args.extract:
            for path in extract_sample(args.shards, args.extract, args.to):
                print(path)
            return 0
        report = inspect_shards(args.shards)
    except AlproError as e:
        print(f"alpro inspect: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
