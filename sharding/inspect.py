"""``alpro inspect``: what is in a shard set (counts, durations, resolutions, fps, codecs, sizes, rejects).

Accepts a shard directory, a glob (``out/shard-*.tar``), a brace pattern (``out/shard-{000000..000009}.tar``) or
one tar. Shards listed in an ``index.json.zst`` next to them are read through the index: each shard's DALI
``.idx`` gives every member's name, offset and size, and each ``KEY.json`` is one positioned read; no tar header
is walked (a tar whose size is not the one the index records is walked instead, so a cut is still reported).
Other shards: only tar headers and the small ``KEY.json`` members are read (media bytes are seeked over). Both
give the same report. Plus the ``_stats.json`` / ``rejects.jsonl`` files next to the shards when they exist. Shards made by other tools (no
``KEY.json``, or one without our fields) are counted too. ``--extract KEY`` writes one sample's members out.

Shards from anyone are summarised, never a crash: a ``KEY.json`` that fails the loader's checks
(:mod:`alpro.data.meta`) is counted under ``bad_samples`` (first 20 listed by key with the reason), and a tar
cut short reports, under ``truncated``, where the file ends, the complete samples before the cut (which are
counted as usual) and the sample the cut falls in.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand

from alpro.config import option, parse_command
from alpro.data.config import LimitsConfig
from alpro.data.meta import meta_problem
from alpro.data.shards import SampleError, _iter_members, open_local_tar
from alpro.errors import AlproError
from alpro.shard_format import INDEX_NAME, REJECTS_NAME, stats_name

__all__ = ["resolve_shards", "inspect_shards", "extract_sample", "format_report", "main"]

_LISTED = 20  # bad samples listed by key in the report (all are counted)
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


def _add_member(samples: dict[str, dict[str, Any]], key: str, ext: str, data: int, length: int, get,
                limits: LimitsConfig) -> None:
    """Count one member of sample ``key`` (its extension and bytes); a ``KEY.json`` is read and checked."""
    s = samples.setdefault(key, {"key": key, "exts": [], "bytes": 0, "meta": None, "problem": None})
    s["exts"].append(ext)
    s["bytes"] += length
    if ext == "json" and s["problem"] is None:
        s["meta"], s["problem"] = _read_json(get(data, data + length) if length <= limits.other_bytes else None,
                                             length, limits)


def _scan(tar_path: Path, limits: LimitsConfig | None = None) -> tuple[list[dict[str, Any]], int, dict | None]:
    """Per-sample ``{key, exts, bytes, meta, problem}`` of one shard's complete samples, the shard's size, and
    where the tar is cut (None when it is whole).

    Only headers and ``KEY.json`` members are read (with positioned reads: a cut or hostile tar costs no
    more than its headers). A ``KEY.json`` over the json cap is not read; one that is not valid JSON or fails
    :func:`alpro.data.meta.meta_problem` makes ``problem`` say why (``bad_metadata``). A tar cut inside a
    member keeps the samples before it; the sample it cuts is reported, not counted."""
    limits = limits or LimitsConfig()
    samples: dict[str, dict[str, Any]] = {}
    cut: dict | None = None
    with open_local_tar(tar_path) as (get, size):
        try:
            for name, data, length in _iter_members(get, size, whole_tar=True):
                key, ext = _split_key(name)
                if data + length > size:
                    cut = {"key": key, "detail": f"the tar ends at byte {size}, inside member {name} (needs "
                                                 f"{data + length})"}
                    break
                _add_member(samples, key, ext, data, length, get, limits)
        except SampleError as e:  # a cut header, no end-of-archive block, or garbage where a header should be
            if e.reason != "truncated" and not samples:
                raise AlproError(f"{tar_path}: not a readable tar ({e})") from None
            detail = str(e).split(": ", 1)[-1]
            cut = {"key": None, "detail": detail if e.reason == "truncated" else f"unreadable from here ({detail})"}
    if cut is not None:
        if cut["key"] is not None:
            samples.pop(cut["key"], None)  # its members before the cut are not a sample
        cut.update(file=str(tar_path), ends_at=size, complete_samples=len(samples))
    return list(samples.values()), size, cut


def _index_entries(tars: list[Path]) -> dict[Path, dict[str, Any]]:
    """The ``index.json.zst`` entry of each tar that an index next to it lists (its shards are complete when
    written: the index is written last), by tar path; empty for foreign shards. An index that cannot be read
    is ignored here (the walk reports what the tars hold)."""
    from alpro.sharding.index import read_json_zst

    entries: dict[Path, dict[str, Any]] = {}
    for directory in dict.fromkeys(t.parent for t in tars):
        path = directory / INDEX_NAME
        if not path.is_file():
            continue
        try:
            index = read_json_zst(path)
            listed = {e["file"]: e for e in index["shards"] if isinstance(e, dict) and isinstance(e.get("file"), str)}
        except (AlproError, KeyError, TypeError):
            continue
        for t in tars:
            if t.parent == directory and t.name in listed:
                entries[t] = listed[t.name]
    return entries


def _scan_indexed(tar_path: Path, entry: dict[str, Any], limits: LimitsConfig | None = None
                  ) -> tuple[list[dict[str, Any]], int, dict | None] | None:
    """:func:`_scan` from the index instead of a walk: the members of each sample from the shard's DALI index
    (``.idx``: extension, offset, size and name of every member), and each ``KEY.json`` by one positioned read at
    its offset; no tar header is read. ``None`` when the tar is not the one the index describes (another size,
    no ``.idx``, a different sample count): then the caller walks it."""
    limits = limits or LimitsConfig()
    if not entry.get("idx"):  # an index without DALI index names (a foreign or hand-made one): walk
        return None
    idx_path = tar_path.with_name(str(entry["idx"]))
    try:
        size = tar_path.stat().st_size
        if size != entry.get("bytes"):
            return None
        lines = idx_path.read_text(encoding="utf-8").splitlines()
        header = lines[0].split()
        if len(header) != 2 or int(header[1]) != len(lines) - 1 or len(lines) - 1 != entry.get("num_samples"):
            return None
        members = []
        for line in lines[1:]:
            fields = line.split(" ")
            if len(fields) % 4:
                return None
            members.append([(fields[i + 3], int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    samples: dict[str, dict[str, Any]] = {}
    with open_local_tar(tar_path) as (get, _):
        for sample in members:
            for name, data, length in sample:
                if data + length > size:
                    return None
                key, ext = _split_key(name)
                _add_member(samples, key, ext, data, length, get, limits)
    return list(samples.values()), size, None


def _read_json(raw: bytes | None, length: int, limits: LimitsConfig) -> tuple[Any, str | None]:
    """(parsed KEY.json or None, what is wrong with it or None)."""
    if raw is None:
        return None, f"too_large: KEY.json is {length} bytes, over the {limits.other_bytes}-byte cap"
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return None, f"bad_metadata: json: {e}"
    problem = meta_problem(meta)
    return (meta, None) if problem is None else (None, f"bad_metadata: {problem}")


def _rejects_near(tars: list[Path]) -> Counter[str]:
    """Reject counts from the ``_stats.json`` of these shards (or ``rejects.jsonl`` when no stats exist).

    These files may come from anyone: a stats file or a line that is not what the sharder writes is counted
    as ``unreadable_stats`` / ``unreadable_line`` instead of stopping the report."""
    reasons: Counter[str] = Counter()
    found_stats = False
    for tar in tars:
        stats_path = tar.with_name(stats_name(tar.name[: -len(".tar")]))
        if stats_path.is_file():
            found_stats = True
            try:
                found = json.loads(stats_path.read_text(encoding="utf-8")).get("rejects_by_reason", {})
                reasons.update({str(k): int(v) for k, v in found.items() if isinstance(v, int) and v >= 0})
            except (ValueError, AttributeError, OSError):
                reasons["unreadable_stats"] += 1
    if not found_stats:
        for rejects in {t.parent / REJECTS_NAME for t in tars}:
            if rejects.is_file():
                for line in rejects.read_text(encoding="utf-8", errors="replace").splitlines():
                    if line.strip():
                        try:
                            reasons[str(json.loads(line).get("reason", "unknown"))] += 1
                        except (ValueError, AttributeError):
                            reasons["unreadable_line"] += 1
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
    shard_sizes, sample_sizes, bad, cuts = [], [], [], []
    indexed = _index_entries(tars)
    for tar in tars:
        found = _scan_indexed(tar, indexed[tar]) if tar in indexed else None
        samples, size, cut = found if found is not None else _scan(tar)
        shard_sizes.append(size)
        if cut is not None:
            cuts.append(cut)
        for s in samples:
            n_samples += 1
            sample_sizes.append(s["bytes"])
            exts.update(s["exts"])
            if s["problem"] is not None:
                reason, detail = s["problem"].split(": ", 1)
                bad.append({"file": str(tar), "key": s["key"], "reason": reason, "detail": detail})
                continue
            meta = s["meta"]
            if not isinstance(meta, dict) or "num_frames" not in meta:
                no_meta += 1
                continue
            kind = meta.get("media", "video")
            media[kind] += 1
            codecs[str(meta.get("codec"))] += 1
            resolutions[f"{meta.get('width')}x{meta.get('height')}"] += 1
            found = meta.get("captions") or []
            captions += 1 if isinstance(found, str) else len(found)
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
        "bad_samples": dict(sorted(Counter(b["reason"] for b in bad).items())),
        "bad_sample_list": bad[:_LISTED],
        "truncated": cuts,
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
    for reason, n in report["bad_samples"].items():
        first = next(b for b in report["bad_sample_list"] if b["reason"] == reason)
        lines.append(f"  {n} sample(s) {reason} (the loader skips them), e.g. {first['key']}: {first['detail']}")
    for cut in report["truncated"]:
        lines.append(f"  truncated: {cut['file']} ends at byte {cut['ends_at']}: {cut['complete_samples']} "
                     f"complete sample(s) before the cut" + (f", sample {cut['key']} is cut" if cut["key"] else "")
                     + f" ({cut['detail']})")
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
    """Write every member of sample ``key`` (``KEY.json``, ``KEY.mp4``, ...) into ``to``; return the paths.

    Members are copied in 1 MiB pieces by positioned reads (any size, no tar-library buffering); a member
    that a cut tar does not hold whole is an error naming where the tar ends, after the whole ones are written.
    Only the member's base name is used, so nothing is written outside ``to``."""
    out = Path(to)
    for tar_path in resolve_shards(target):
        written: list[Path] = []
        with open(tar_path, "rb") as f:
            fd = f.fileno()
            size = os.fstat(fd).st_size
            get = lambda a, b, fd=fd, n=size: os.pread(fd, max(0, min(b, n) - a), a)  # noqa: E731
            try:
                for name, data, length in _iter_members(get, size):
                    if _split_key(name)[0] != key:
                        if written:
                            return written  # members of a sample are contiguous
                        continue
                    if data + length > size:
                        raise AlproError(f"{tar_path}: member {name} of sample {key!r} is cut off: the tar ends "
                                         f"at byte {size} (written: {', '.join(p.name for p in written) or 'none'})")
                    out.mkdir(parents=True, exist_ok=True)
                    dest = out / Path(name).name
                    with open(dest, "wb") as sink:
                        for a in range(data, data + length, 1 << 20):
                            sink.write(get(a, min(a + (1 << 20), data + length)))
                    written.append(dest)
            except SampleError as e:
                if not written and e.reason != "truncated":  # a cut tail only ends the search in this shard
                    raise AlproError(f"{tar_path}: not a readable tar ({e})") from None
        if written:
            return written
    raise AlproError(f"no sample with key {key!r} in {target}")


@dataclass
class InspectOptions:
    """The options of ``alpro inspect`` (parsed by :func:`alpro.config.parse_command`; help from these docstrings)."""

    shards: str
    """shard directory, glob ('out/*.tar'), brace pattern or one .tar"""
    extract: str | None = option(None, metavar="KEY")
    """write the members of sample KEY to --to"""
    to: str = "."
    """directory for --extract (default: the current one)"""
    json: bool = False
    """print the summary as JSON"""


def main(argv: list[str] | None = None) -> int:
    """``alpro inspect``; errors go through the one CLI wrapper (:func:`alpro.cli.guarded`), also called directly."""
    from alpro.cli import guarded

    return guarded("inspect", _main, argv)


def _main(argv: list[str]) -> int:
    args = parse_command(InspectOptions, argv, prog="alpro inspect",
                         description="Summarise a shard set or extract a sample.")
    if args.extract:
        for path in extract_sample(args.shards, args.extract, args.to):
            print(path)
        return 0
    report = inspect_shards(args.shards)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
