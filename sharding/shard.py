"""``alpro shard``: a manifest -> transcoded, validated WebDataset tar shards (docs/shard_format.md).

How a build runs (docs/sharding.md has the user-level story):

1. The manifest is streamed, never held (:func:`_plan`, :func:`_items`): a first pass counts the rows that pass
   the filters (``--split``, ``--media``, ``--limit``) and finds the rows whose key may repeat one of this node's;
   a second pass yields the node's own rows as the workers take them. Duplicate ids are decided over the whole
   manifest, so every node agrees on which row keeps an id.
2. ``--num-nodes M`` cuts the rows into M contiguous partitions; node R builds partition R. Shards are named
   ``NAME-000000.tar ...`` for one node, ``NAME-nRRR-000000.tar ...`` per node otherwise.
3. Worker processes (``--workers N``), or Ray tasks (``--distributor ray``: sharding/distributed.py), read,
   hash, transcode and validate rows in any order; one ordered writer
   (this process) takes their results back in manifest order, drops content duplicates, rejects bad rows with a
   reason, and rolls shards by ``--shard-size`` samples and ``--shard-bytes``. Because the writer sees the same
   sequence whatever N is, and encoders are single-threaded (bit-exact), shards are byte-identical for any N.
4. Each shard's stats record the manifest rows it covers: rows from the start of a shard up to the first sample
   of the next one (so the rejects in between belong to it). A rerun resumes after the last complete shard and,
   being deterministic, rebuilds the rest byte for byte.
5. The node's part of the index is written; with one node it is merged at once into ``index.json.zst``,
   ``sizes.json`` and ``rejects.jsonl`` (with several: ``alpro shard --merge-index OUT_DIR``).

OUT_DIR may be an fsspec URL (``s3://bucket/prefix``): the build runs in a local staging directory and uploads
each file once it is complete (:func:`_build_remote`); media may be read from URLs too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import multiprocessing as mp
import shutil
import sys
import tarfile
import tempfile
import time
from array import array
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from alpro.config import ConfigError, from_dict, option, parse_command, to_dict
from alpro.errors import AlproError
from alpro.fileio import atomic_write, is_url, upload, url_fs, url_join
from alpro.shard_format import BUILD_NAME, DALI_IDX_SUFFIX, REJECTS_NAME, STATS_SUFFIX, encode_vinfo, stats_name
from alpro.sharding.index import INDEX_NAME, merge_index, write_build, write_part
from alpro.sharding.manifest import (
    FORMATS,
    Manifest,
    ManifestRow,
    ManifestStream,
    relative_source,
    sanitize_key,
    stream_manifest,
)
from alpro.sharding.media import (
    DEFAULT_MAX_PIXELS,
    REJECT_REASONS,
    EncodedMedia,
    MediaLimits,
    Reject,
    VideoSettings,
    copy_video,
    encode_image,
    transcode_video,
)
from alpro.sharding.writer import ShardWriter, json_bytes, shard_is_complete

__all__ = ["ShardOptions", "ShardSummary", "shard_manifest", "main"]

DEFAULT_GOP = 6  # keyframe interval: see benchmarks/README.md "GOP sweep" and docs/sharding.md


@dataclass
class ShardOptions:
    """Every option of ``alpro shard`` (CLI flags are the same names with dashes; the docstrings are their
    ``--help``, the ``# section`` comments its groups). ``video`` holds the encoder settings, whose fields are
    options of their own (``--gop``, ``shard_manifest(..., gop=4)``)."""

    # inputs
    format: str | None = None
    """manifest format: csv, tsv, jsonl, json or folder (default: from the extension)"""
    media_root: str | Path | None = None
    """directory (or fsspec URL, s3://bucket/media) relative media paths resolve against (default: the manifest's
    directory)"""
    video_ext: str = ".mp4"
    """extension added to clip names without one"""
    qa: list[Path] = field(default_factory=list)
    """QA JSONL attached to clips as extra.qa (repeatable)"""
    split: str | None = None
    """keep only rows whose split equals SPLIT"""
    media: Literal["video", "image", "all"] = "all"
    """keep only this media kind"""
    limit: int | None = None
    """keep only the first LIMIT rows (after filters)"""
    # output
    name: str = "shard"
    """shard file prefix"""
    shard_size: int = 1000
    """samples per shard"""
    shard_bytes: int | None = 1 << 30
    """max bytes per shard (0: no limit)"""
    absolute_paths: bool = False
    """Store absolute source paths (KEY.json, rejects) and the manifest's absolute path (build.json, index).
    Off by default: sources are stored relative to the media root, so a set does not carry the building
    machine's directory layout and the same corpus gives the same bytes wherever it sits."""
    # video and images
    video: VideoSettings = option(default_factory=lambda: VideoSettings(gop=DEFAULT_GOP), flat=True)
    copy: bool = False
    """store CFR mp4 sources as they are (probed + validated)"""
    jpeg_quality: int = 90
    """JPEG quality of stored images"""
    # checks
    keep_duplicates: bool = False
    """keep samples whose source bytes repeat"""
    max_source_bytes: int = 4 << 30
    """reject larger source files"""
    max_source_duration: float = 3 * 3600.0
    """reject sources longer than this (seconds)"""
    min_side: int = 16
    """reject frames with a shorter side"""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """reject larger frames, width x height, read from the header before decoding (7680x4320, 8K UHD; why:
    sharding/media.py)"""
    max_aspect: float = 10.0
    """reject more elongated frames"""
    max_caption_chars: int = 2000
    """drop longer captions (reject the sample if none is left)"""
    max_reject_ratio: float = 0.5
    """exit 1 if more than this fraction of inputs is rejected"""
    # execution (never changes the output bytes)
    workers: int = 1
    """transcode processes"""
    node_rank: int = 0
    """this node's partition (e.g. SLURM_ARRAY_TASK_ID)"""
    num_nodes: int = 1
    """number of partitions"""
    progress: bool = True
    """a progress bar on stderr (--no-progress: none)"""
    distributor: Literal["local", "ray"] = "local"
    """where rows are transcoded: local (--workers processes here) or ray (tasks on a Ray cluster, one slice of
    --shard-size rows each, retried when a worker dies; this process stays the ordered writer, so the bytes equal
    a local build's; sharding/distributed.py)"""
    ray_address: str | None = None
    """Ray cluster to join (auto, HOST:6379, ray://HOST:10001) (default: the running Ray session, or a new local
    one)"""

    def __post_init__(self) -> None:
        if isinstance(self.media_root, str) and not is_url(self.media_root):
            self.media_root = Path(self.media_root)  # a URL stays a string (a Path would fold its "//")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.shard_bytes == 0:  # the command line's spelling of "no limit"
            self.shard_bytes = None
        v = self.video
        positive = {"shard_size": self.shard_size, "gop": v.gop, "short_side": v.short_side, "workers": self.workers,
                    "num_nodes": self.num_nodes, "min_side": self.min_side, "max_pixels": self.max_pixels,
                    "max_caption_chars": self.max_caption_chars, "max_source_bytes": self.max_source_bytes}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {self.shard_bytes}")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(f"node_rank must be in [0, num_nodes={self.num_nodes}), got {self.node_rank}")
        if v.fps is not None and v.fps_scale is not None:
            raise ValueError("give either fps or fps_scale, not both")
        for name in ("fps", "fps_scale", "max_duration"):
            value = getattr(v, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if not 0.0 <= self.max_reject_ratio <= 1.0:
            raise ValueError(f"max_reject_ratio must be in [0, 1], got {self.max_reject_ratio}")
        if not self.name or any(c in self.name for c in "/\\.{}* "):
            raise ValueError(f"name must be a plain file-name prefix, got {self.name!r}")

    def output_options(self) -> dict[str, Any]:
        """The options that decide the output bytes (recorded in build.json and the index), flat: the video
        settings stand among the others, ``copy`` right after ``codec``, as build.json has always listed them
        (a new order would change the bytes of every build.json and index)."""
        skip = {"workers", "node_rank", "progress", "max_reject_ratio", "distributor", "ray_address"}
        out: dict[str, Any] = {}
        for k, v in to_dict(self).items():
            if k == "video":
                out["codec"] = v.pop("codec")
                out["copy"] = self.copy
                out.update(v)
            elif k not in skip:
                out[k] = v
        return out

    def limits(self) -> MediaLimits:
        return MediaLimits(max_source_duration=self.max_source_duration, min_side=self.min_side,
                           max_pixels=self.max_pixels, max_aspect=self.max_aspect)


@dataclass
class ShardSummary:
    """What a build (of one node's partition) produced; ``table()`` renders the closing summary."""

    out_dir: Path | str
    """the output directory, or its URL"""
    inputs: int
    written: int
    rejected: int
    rejects_by_reason: dict[str, int]
    shards: int
    resumed_shards: int
    processed: int
    bytes: int
    frames: int
    duration: float
    seconds: float
    index_path: Path | str | None
    part_path: Path | str | None
    warnings: list[str] = field(default_factory=list)
    captions_dropped: int = 0
    nonfinite_nulled: int = 0

    @property
    def reject_ratio(self) -> float:
        return self.rejected / self.inputs if self.inputs else 0.0

    @property
    def clips_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        lines = [
            f"{self.inputs} inputs -> {self.written} samples in {self.shards} shard(s) ({_human(self.bytes)}), "
            f"{self.rejected} rejected ({100 * self.reject_ratio:.1f} %)",
            f"  {self.frames} frames, {self.duration:.1f} s of video; {self.processed} rows processed in "
            f"{self.seconds:.1f} s ({self.clips_per_second:.2f} clips/s); {self.resumed_shards} shard(s) resumed",
        ]
        if self.rejects_by_reason:
            width = max(len(r) for r in self.rejects_by_reason)
            lines.append(f"  {'reject reason'.ljust(width)}  count")
            lines += [f"  {r.ljust(width)}  {n:5d}" for r, n in sorted(self.rejects_by_reason.items())]
        if self.captions_dropped:
            lines.append(f"  {self.captions_dropped} caption(s) dropped from kept samples (empty, too long or not UTF-8)")
        if self.nonfinite_nulled:
            lines.append(f"  {self.nonfinite_nulled} NaN/Infinity value(s) in extra fields stored as null")
        lines += [f"  warning: {w}" for w in self.warnings]
        target = self.index_path or self.part_path
        if target is not None:
            lines.append(f"  {'index' if self.index_path else 'partial index'}: {target}")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------------------------------ per sample


@dataclass
class _Item:
    """One row as shipped to a worker."""

    index: int
    row: ManifestRow
    key: str
    source: str
    """The source path as stored (KEY.json, rejects): relative to the media root unless --absolute-paths."""
    pre_reject: tuple[str, str] | None = None


@dataclass
class _Result:
    """A worker's answer for one row: members to store, or a reject."""

    index: int
    row: ManifestRow
    key: str
    source: str
    reject: tuple[str, str] | None = None
    sha256: str | None = None
    members: list[tuple[str, bytes]] = field(default_factory=list)
    num_frames: int = 0
    duration: float = 0.0
    captions_dropped: int = 0
    nonfinite_nulled: int = 0


_WORKER_OPTIONS: ShardOptions | None = None


def _init_worker(options: ShardOptions) -> None:
    global _WORKER_OPTIONS
    _WORKER_OPTIONS = options


def _not_utf8(caption: str) -> bool:
    """True if the manifest bytes behind ``caption`` were not UTF-8 (they survive as lone surrogates)."""
    return any("\udc80" <= ch <= "\udcff" for ch in caption)


def _check_captions(row: ManifestRow, max_chars: int) -> tuple[list[str], int]:
    """Whitespace-normalised captions (one line each) and how many were dropped, or a caption reject.

    Each bad caption (empty, longer than ``max_chars``, not UTF-8) is dropped on its own; the sample is
    rejected only when none is left (and it has no QA), with the reason of the first non-UTF-8 caption if any,
    else ``caption_too_long`` or ``empty_caption``.
    """
    has_qa = bool(row.extra.get("qa"))
    if row.captions is None and not has_qa:
        raise Reject("missing_caption", "no caption field")
    normalised = [" ".join(c.split()) for c in row.captions or []]
    bad_bytes = [i for i, c in enumerate(normalised) if _not_utf8(c)]
    non_empty = [c for c in normalised if c and not _not_utf8(c)]
    kept = [c for c in non_empty if len(c) <= max_chars]
    if not kept and not has_qa:
        if bad_bytes:
            i = bad_bytes[0]
            raw = normalised[i].encode("utf-8", "surrogateescape")
            raise Reject("caption_not_utf8", f"caption {i}: {raw[:60]!r}")
        if non_empty:
            raise Reject("caption_too_long", f"{max(len(c) for c in non_empty)} chars > {max_chars}")
        raise Reject("empty_caption", f"{len(normalised)} caption(s), all empty")
    return kept, len(normalised) - len(kept)


def _finite_json(value: Any) -> tuple[Any, int]:
    """``value`` with every NaN/Infinity float replaced by ``None``, and how many were replaced.

    Manifests read with :mod:`json` accept ``NaN`` and ``Infinity`` (``json.dumps`` writes a pandas gap as NaN), but
    they are not JSON: stored as they are, ``KEY.json`` would not parse in strict readers (browsers, Go, jq).
    ``null`` is what JSON has for "no number"; the sample itself (media, captions) is good, so it is kept and
    the replacements are counted (``nonfinite_nulled`` in the stats).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None, 1
    if isinstance(value, dict):
        out, n = {}, 0
        for k, v in value.items():
            out[k], m = _finite_json(v)
            n += m
        return out, n
    if isinstance(value, (list, tuple)):
        items = [_finite_json(v) for v in value]
        return [v for v, _ in items], sum(m for _, m in items)
    return value, 0


def _read_source(path: str, max_bytes: int) -> bytes:
    """The source bytes; a path that cannot be reached (no such file, broken symlink, symlink loop, no
    permission) is ``missing`` with the OS's reason. ``path`` may be an fsspec URL (``s3://bucket/a.mp4``)."""
    if is_url(path):
        return _read_url(path, max_bytes)
    p = Path(path)
    try:
        size = p.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        raise Reject("missing", "no such file") from None
    except OSError as e:  # ELOOP (symlink loop), EACCES, ENAMETOOLONG, ...
        raise Reject("missing", e.strerror or type(e).__name__) from None
    if not p.is_file():
        raise Reject("missing", "not a regular file")
    if size == 0:
        raise Reject("empty_file", "0 bytes")
    if size > max_bytes:
        raise Reject("too_large", f"{size} bytes > {max_bytes}")
    try:
        return p.read_bytes()
    except OSError as e:
        raise Reject("missing", f"cannot read: {e.strerror or type(e).__name__}") from None


def _read_url(url: str, max_bytes: int) -> bytes:
    """:func:`_read_source` for an object (one HEAD for the size, one GET)."""
    fs, path = url_fs(url)
    try:
        size = fs.size(path)
        if size == 0:
            raise Reject("empty_file", "0 bytes")
        if size > max_bytes:
            raise Reject("too_large", f"{size} bytes > {max_bytes}")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise Reject("missing", "no such object") from None
    except (OSError, ValueError) as e:
        raise Reject("missing", f"cannot read: {' '.join(str(e).split())[:200]}") from None


def _metadata(item: _Item, captions: list[str], sha256: str, m: EncodedMedia, extra: Any) -> dict[str, Any]:
    """The ``KEY.json`` record (field order as in docs/shard_format.md)."""
    row = item.row
    video = row.media == "video"
    return {
        "id": row.id,
        "key": item.key,
        "media": row.media,
        "captions": captions,
        "source": item.source,
        "sha256": sha256,
        "codec": m.codec,
        "num_frames": m.num_frames,
        "fps": m.fps,
        "duration": round(m.num_frames / m.fps, 6) if video and m.fps else 0.0,
        "width": m.width,
        "height": m.height,
        "time_base": list(m.time_base) if video and m.time_base else None,
        "start_pts": m.start_pts if video else None,
        "pts_per_frame": m.pts_per_frame if video else None,
        "keyframes": m.keyframes if video else [0],
        "split": row.split,
        "src": m.src,
        "extra": extra,
    }


def _process(item: _Item) -> _Result:
    """Read, hash, transcode/copy/encode and validate one row (runs in a worker process)."""
    opts = _WORKER_OPTIONS
    assert opts is not None, "worker not initialised"
    result = _Result(index=item.index, row=item.row, key=item.key, source=item.source)
    try:
        if item.pre_reject is not None:
            raise Reject(*item.pre_reject)
        captions, result.captions_dropped = _check_captions(item.row, opts.max_caption_chars)
        data = _read_source(item.row.source, opts.max_source_bytes)
        result.sha256 = hashlib.sha256(data).hexdigest()
        if item.row.media == "image":
            media = encode_image(data, opts.video.short_side, opts.jpeg_quality, opts.limits())
        elif opts.copy:
            media = copy_video(data, opts.limits())
        else:
            media = transcode_video(data, opts.video, opts.limits())
        extra, result.nonfinite_nulled = _finite_json(item.row.extra)
        meta = _metadata(item, captions, result.sha256, media, extra)
        vinfo = encode_vinfo(media.num_frames, media.width, media.height, media.fps)
        result.members = [("json", json_bytes(meta)), ("txt", "\n".join(captions).encode()), ("vinfo", vinfo),
                          (media.ext, media.data)]
        result.num_frames, result.duration = media.num_frames, meta["duration"]
    except Reject as r:
        result.reject = (r.reason, r.detail)
    except Exception as e:  # noqa: BLE001 -- one bad sample must never stop a million-row build
        result.reject = ("internal_error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return result


def _noting_lines(items: Iterator[_Item], lines: dict[int, int]) -> Iterator[_Item]:
    for item in items:
        lines[item.index] = item.row.line
        yield item


def _results(items: Iterator[_Item], pool: ProcessPoolExecutor | None, window: int) -> Iterator[_Result]:
    """Results in manifest order; at most ``window`` rows in flight so memory stays bounded."""
    if pool is None:
        yield from map(_process, items)
        return
    pending: deque[Future[_Result]] = deque()
    for item in items:
        pending.append(pool.submit(_process, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ------------------------------------------------------------------------------------------------ ordered writer


_LIGHT = ("num_samples", "bytes", "counts", "duration", "rejects_by_reason")


def _light(stats: dict[str, Any]) -> dict[str, Any]:
    """What the summary needs of a finished shard's stats (the per-sample lists stay in its ``_stats.json``)."""
    return {k: stats[k] for k in _LIGHT if k in stats}


class _Seen:
    """Content dedup of a partition: sha256 -> key of the first sample with those bytes, in ~16 bytes a sample.

    Recent samples sit in a dict; every ``freeze_at`` of them (at a shard's end, when their stats are on disk)
    they become a sorted run of 8-byte hash prefixes with the (shard, position) of each, and runs are merged like
    a binary counter (at most log2(N / freeze_at) of them). A prefix match is confirmed, and its key read, from
    the shard's ``_stats.json`` (a match is a duplicate or a 1-in-2^64 collision: rare either way)."""

    def __init__(self, stats_of: Any, freeze_at: int = 1 << 16):
        self.stats_of, self.freeze_at = stats_of, freeze_at
        self.recent: dict[str, tuple[str, int]] = {}  # sha -> (key, seq << 32 | position)
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._cache: tuple[int, dict[str, Any]] | None = None

    def _stats(self, seq: int) -> dict[str, Any]:
        if self._cache is None or self._cache[0] != seq:
            self._cache = (seq, self.stats_of(seq))
        return self._cache[1]

    def get(self, sha: str) -> str | None:
        if sha in self.recent:
            return self.recent[sha][0]
        prefix = np.uint64(int(sha[:16], 16))
        best: tuple[int, str] | None = None
        for prefixes, where in self.runs:
            lo, hi = np.searchsorted(prefixes, prefix, "left"), np.searchsorted(prefixes, prefix, "right")
            for w in where[lo:hi].tolist():
                stats = self._stats(w >> 32)
                if stats["sha256"][w & 0xFFFFFFFF] == sha and (best is None or w < best[0]):
                    best = (w, stats["keys"][w & 0xFFFFFFFF])
        return None if best is None else best[1]

    def add(self, sha: str, key: str, seq: int, pos: int) -> None:
        self.recent.setdefault(sha, (key, seq << 32 | pos))

    def maybe_freeze(self) -> None:
        """Call when every sample added so far is in a finished shard."""
        if len(self.recent) < self.freeze_at:
            return
        prefixes = np.fromiter((int(sha[:16], 16) for sha in self.recent), dtype=np.uint64, count=len(self.recent))
        where = np.fromiter((w for _, w in self.recent.values()), dtype=np.int64, count=len(self.recent))
        self.recent = {}
        order = np.argsort(prefixes, kind="stable")
        self.runs.append((prefixes[order], where[order]))
        while len(self.runs) >= 2 and len(self.runs[-1]) >= len(self.runs[-2]):
            (p1, w1), (p2, w2) = self.runs[-2], self.runs.pop()
            p, w = np.concatenate([p1, p2]), np.concatenate([w1, w2])
            order = np.argsort(p, kind="stable")
            self.runs[-1] = (p[order], w[order])


class _Partition:
    """The ordered writer of one node's rows: assigns samples and rejects to shards, rolls shards.

    Holds the open shard's per-sample lists, the dedup state (:class:`_Seen`, ~16 bytes a sample) and a few
    numbers per finished shard; finished shards' stats are read back from their ``_stats.json`` when needed."""

    def __init__(self, out_dir: Path, prefix: str, opts: ShardOptions, done: list[dict[str, Any]], start_row: int,
                 remote: str | None = None):
        self.out_dir, self.prefix, self.opts, self.remote = out_dir, prefix, opts, remote
        self.seq, self.start_row = len(done), start_row
        self.seen = _Seen(self.stats_of)
        if not opts.keep_duplicates:
            for seq, stats in enumerate(done):
                for pos, (sha, key) in enumerate(zip(stats["sha256"], stats["keys"])):
                    self.seen.add(sha, key, seq, pos)
                self.seen.maybe_freeze()
        self.writer: ShardWriter | None = None
        self.rejects: list[dict[str, Any]] = []  # rejects waiting for the shard that will own them
        self.info: dict[str, Any] = {}
        self.finished: list[dict[str, Any]] = []  # _light() of each shard finished by this run

    def stats_of(self, seq: int) -> dict[str, Any]:
        """The stats of finished shard ``seq`` (from its local ``_stats.json``; also kept when uploading)."""
        return json.loads((self.out_dir / stats_name(_stem(self.prefix, seq))).read_bytes())

    def feed(self, res: _Result) -> None:
        reject = res.reject
        if reject is None and not self.opts.keep_duplicates and (first := self.seen.get(res.sha256)) is not None:
            reject = ("duplicate", f"same bytes as key {first}")
        if reject is not None:
            self.rejects.append({"id": res.row.id, "source": res.source, "reason": reject[0],
                                 "detail": reject[1], "row": res.row.line})
            return
        assert res.sha256 is not None
        if self.writer is not None and self._full(res.members):
            self._finish(end_row=res.index)
        if self.writer is None:
            self._open()
        assert self.writer is not None
        if not self.opts.keep_duplicates:
            self.seen.add(res.sha256, res.key, self.seq, self.writer.num_samples)
        rec = self.writer.add(res.key, res.members)
        info = self.info
        info["keys"].append(res.key)
        info["media"].append(res.row.media)
        info["num_frames"].append(res.num_frames)
        info["offsets"].append(rec.offset)
        info["sizes"].append(rec.size)
        info["sha256"].append(res.sha256)
        info["duration"] += res.duration
        info["captions_dropped"] += res.captions_dropped
        info["nonfinite_nulled"] += res.nonfinite_nulled

    def _full(self, members: list[tuple[str, bytes]]) -> bool:
        """Roll before a sample that would take the shard past --shard-size or --shard-bytes."""
        assert self.writer is not None
        if self.writer.num_samples >= self.opts.shard_size:
            return True
        if self.opts.shard_bytes is None:
            return False
        sample = sum(512 + (len(d) + 511) // 512 * 512 for _, d in members)  # header + padded data
        end = self.writer.bytes_written + sample + 2 * 512  # + the end-of-archive blocks
        final = -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE  # tar files are padded to whole records
        return final > self.opts.shard_bytes

    def _open(self) -> None:
        # Rejects seen before this shard's first sample belong to it, so its rows start where the last one ended.
        self.writer = ShardWriter(self.out_dir, _stem(self.prefix, self.seq), self.remote)
        self.info = {"keys": [], "media": [], "num_frames": [], "offsets": [], "sizes": [], "sha256": [],
                     "duration": 0.0, "captions_dropped": 0, "nonfinite_nulled": 0,
                     "t0": time.perf_counter()}

    def _finish(self, end_row: int) -> None:
        assert self.writer is not None
        info = self.info
        media = Counter(info["media"])
        reasons = Counter(r["reason"] for r in self.rejects)
        stats = {
            "num_samples": self.writer.num_samples,
            "rows": [self.start_row, end_row],
            **{k: info[k] for k in ("keys", "media", "num_frames", "offsets", "sizes", "sha256")},
            "duration": round(info["duration"], 6),
            "counts": {"inputs": end_row - self.start_row, "written": self.writer.num_samples,
                       "rejected": len(self.rejects), "videos": media["video"], "images": media["image"],
                       "frames": sum(n for n, m in zip(info["num_frames"], info["media"]) if m == "video"),
                       "captions_dropped": info["captions_dropped"],
                       "nonfinite_nulled": info["nonfinite_nulled"]},
            "rejects_by_reason": dict(sorted(reasons.items())),
            "rejects": self.rejects,
            "seconds": round(time.perf_counter() - info["t0"], 3),
        }
        self.finished.append(_light(self.writer.finish(stats)))
        self.writer, self.rejects, self.start_row = None, [], end_row
        self.seq += 1
        self.seen.maybe_freeze()

    def close(self, end_row: int) -> list[dict[str, Any]]:
        """Finish the last shard (it owns trailing rejects); return rejects that no shard owns."""
        if self.writer is not None:
            self._finish(end_row)
        orphans, self.rejects = self.rejects, []
        return orphans

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


# ------------------------------------------------------------------------------------------------ build


def _stem_prefix(opts: ShardOptions) -> str:
    if opts.num_nodes == 1:
        return opts.name
    return f"{opts.name}-n{opts.node_rank:0{max(3, len(str(opts.num_nodes - 1)))}d}"


def _selected(rows: Iterator[ManifestRow], opts: ShardOptions) -> Iterator[ManifestRow]:
    """:func:`~alpro.sharding.manifest.select_rows` as a stream: rows of one split and/or media kind, the first
    ``limit`` of them."""
    n = 0
    for row in rows:
        if (opts.split is None or row.split == opts.split) and (opts.media == "all" or row.media == opts.media):
            if opts.limit is not None and n >= opts.limit:
                return
            n += 1
            yield row


@dataclass
class _Plan:
    """What the first pass over the manifest learns: the number of selected rows, and the rows whose key hash
    equals that of one of this node's rows at least twice among the rows up to the node's end (the duplicate-id
    candidates, confirmed by the keys themselves on the second pass; in practice only repeated ids)."""

    stream: ManifestStream
    rows: int
    repeated: frozenset[int]


_CHUNK = 1 << 20  # rows of key hashes read back at a time


def _plan(stream: ManifestStream, opts: ShardOptions) -> _Plan:
    """The first pass. Every selected row's 8-byte key hash goes to a temporary file, not memory; then only the
    node's own hashes are held (sorted, with a count each), and the file is read back in chunks to count and find
    the rows that share them. Memory: 16 bytes per row the node owns, whatever the manifest's length."""
    with tempfile.TemporaryFile(prefix="alpro-shard-keys-") as f:
        buf, n = array("q"), 0
        for row in _selected(stream.rows(), opts):
            buf.append(hash(sanitize_key(row.id)))
            if len(buf) == _CHUNK:
                buf.tofile(f)
                n, buf = n + len(buf), array("q")
        buf.tofile(f)
        n += len(buf)
        del buf
        f.flush()

        def read(a: int, b: int) -> np.ndarray:
            f.seek(8 * a)
            return np.fromfile(f, dtype=np.int64, count=b - a)

        lo, hi = n * opts.node_rank // opts.num_nodes, n * (opts.node_rank + 1) // opts.num_nodes
        own = np.unique(read(lo, hi))  # sorted
        counts = np.zeros(len(own), dtype=np.int64)
        for a in range(0, hi if len(own) else 0, _CHUNK):
            chunk = read(a, min(hi, a + _CHUNK))
            pos = np.minimum(np.searchsorted(own, chunk), len(own) - 1)
            counts += np.bincount(pos[own[pos] == chunk], minlength=len(own))
        twice = own[counts >= 2]
        del own, counts
        repeated: set[int] = set()
        for a in range(0, hi if len(twice) else 0, _CHUNK):
            chunk = read(a, min(hi, a + _CHUNK))
            pos = np.minimum(np.searchsorted(twice, chunk), len(twice) - 1)
            repeated.update((np.flatnonzero(twice[pos] == chunk) + a).tolist())
    return _Plan(stream=stream, rows=n, repeated=frozenset(repeated))


def _items(plan: _Plan, opts: ShardOptions, start: int, stop: int) -> Iterator[_Item]:
    """The items of selected rows ``[start, stop)``, read from the manifest as they are consumed.

    A row whose key an earlier row already uses is ``duplicate_id``: decided over the whole manifest (so every
    node agrees), by remembering the keys of the rows whose key hash repeats only. Paths are joined, not
    resolved or stat'ed: the worker that reads the source does that."""
    root = None if opts.absolute_paths else plan.stream.root
    first: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(_selected(plan.stream.rows(), opts)):
        if i >= stop:
            return
        repeated = i in plan.repeated
        if i < start and not repeated:
            continue
        key = sanitize_key(row.id)
        pre = None
        if repeated:
            if key in first:
                other_id, other_line = first[key]
                pre = ("duplicate_id", f"key {key!r} already used by id {other_id!r} at row {other_line}")
            else:
                first[key] = (row.id, row.line)
        if i >= start:
            yield _Item(index=i, row=row, key=key, source=relative_source(row.source, root), pre_reject=pre)


class _StatsFiles(Sequence):
    """The stats of shards ``0..n-1`` of a partition, each read from its ``_stats.json`` when it is reached, so
    that merging a partition's index never holds every shard's per-sample lists at once."""

    def __init__(self, directory: Path, prefix: str, n: int):
        self.directory, self.prefix, self.n = directory, prefix, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        path = self.directory / stats_name(_stem(self.prefix, i % self.n))
        return json.loads(path.read_bytes())


def _stem(prefix: str, seq: int) -> str:
    return f"{prefix}-{seq:06d}"


def _resume(out_dir: Path | str, prefix: str, lo: int) -> tuple[list[dict[str, Any]], int]:
    """The complete shards at the start of this partition (contiguous, each starting where the last ended)."""
    done: list[dict[str, Any]] = []
    row = lo
    while (stats := shard_is_complete(out_dir, _stem(prefix, len(done)))) is not None and stats["rows"][0] == row:
        done.append(stats)
        row = stats["rows"][1]
    return done, row


def _remove_stale(out_dir: Path, prefix: str, keep: int) -> None:
    """Delete temporaries and shards numbered past the end of this partition (left by an older run)."""
    for tmp in out_dir.glob(f".{prefix}-*.tmp"):
        tmp.unlink(missing_ok=True)
    seq = keep
    while any((out_dir / f"{_stem(prefix, seq)}{suffix}").exists() for suffix in (".tar", DALI_IDX_SUFFIX, STATS_SUFFIX)):
        for suffix in (STATS_SUFFIX, DALI_IDX_SUFFIX, ".tar"):
            (out_dir / f"{_stem(prefix, seq)}{suffix}").unlink(missing_ok=True)
        seq += 1


def shard_manifest(
    manifest: str | Path | Manifest, out_dir: str | Path, options: ShardOptions | None = None, **overrides: Any
) -> ShardSummary:
    """Build (or resume) the shard set of ``manifest`` in ``out_dir``; see :class:`ShardOptions` for options.

    ``overrides`` are :class:`ShardOptions` fields, e.g. ``shard_manifest("m.jsonl", "out", workers=2,
    shard_size=100, codec="vp9")``. Bad options or inputs raise :class:`~alpro.errors.AlproError`. Returns the
    summary of this node's partition; with one node the dataset index is complete on return.

    A file that cannot be written (a full disk, a read-only or unwritable OUT_DIR) is one ``AlproError`` line
    naming it (``no space left on device: OUT/shard-000003.tar``); the unfinished shard's temporaries are
    removed, completed shards are kept, and a rerun once there is space resumes to the same bytes.
    """
    base = to_dict(options) if options is not None else {}
    try:
        opts = from_dict(ShardOptions, {**base, **overrides})
    except ConfigError as e:
        raise AlproError(str(e)) from None
    try:
        if is_url(out_dir):
            return _build_remote(manifest, str(out_dir).rstrip("/"), opts)
        return _build(manifest, Path(out_dir), opts)
    except OSError as e:
        raise AlproError(_os_error_line(e)) from None


def _os_error_line(e: OSError) -> str:
    """One line for a failed read or write: ``no space left on device: PATH; ...`` for a full disk."""
    where = e.filename if e.filename is not None else "?"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{what}: {where}; completed shards are kept, free some space and rerun to resume"
    return f"{where}: {e.strerror or ' '.join(str(e).split())}"


def _build_remote(manifest: str | Path | Manifest | ManifestStream, url: str, opts: ShardOptions) -> ShardSummary:
    """A build into an fsspec URL: made in a local staging directory, each finished file uploaded in one PUT
    (shards as they complete, tar, idx, stats; the dataset files at the end, the index last), so an object
    under a final name is always complete. Resume and the options check read the remote objects."""
    staging = Path(tempfile.mkdtemp(prefix="alpro-shard-staging-"))
    try:
        return _build(manifest, staging, opts, remote=url)
    except AlproError as e:
        raise AlproError(str(e).replace(str(staging), url)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch(url: str, name: str, local: Path) -> bool:
    """Download ``url/name`` into ``local/name`` if it exists; True if it did."""
    fs, path = url_fs(url_join(url, name))
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return False
    atomic_write(local / name, data)
    return True


def _publish(local: Path, url: str) -> None:
    """Upload every file of the staging directory (dataset files: sizes, rejects, index columns, ...), the
    index last: its presence means the set is complete, on object storage as on disk."""
    files = sorted(p for p in local.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                          for part in p.relative_to(local).parts))
    files = [p for p in files if p.name != BUILD_NAME and not p.name.endswith(STATS_SUFFIX)]  # uploaded already
    files.sort(key=lambda p: p.name == INDEX_NAME)
    for path in files:
        upload(path, url_join(url, *path.relative_to(local).parts))


def merge_index_at(out_dir: str | Path) -> dict[str, Any]:
    """``alpro shard --merge-index OUT_DIR`` for a directory or a URL: the parts of a URL are fetched into a local
    staging directory, merged there (:func:`alpro.sharding.index.merge_index`) and the dataset files uploaded,
    the index last."""
    if not is_url(str(out_dir)):
        return merge_index(out_dir)
    url = str(out_dir).rstrip("/")
    fs, path = url_fs(url)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}/index.part-*-of-*.json.zst"))
    if not names:
        raise AlproError(f"{url}: no partial indexes (index.part-*.json.zst); run `alpro shard` on every node first")
    staging = Path(tempfile.mkdtemp(prefix="alpro-merge-staging-"))
    try:
        for name in names:
            _fetch(url, name, staging)
        try:
            index = merge_index(staging)
        except AlproError as e:
            raise AlproError(str(e).replace(str(staging), url)) from None
        for name in names:
            (staging / name).unlink()
        _publish(staging, url)
        return index
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_remote(url: str, prefix: str, keep: int) -> None:
    """:func:`_remove_stale` on object storage (no temporaries there: nothing partial is ever uploaded)."""
    fs, _ = url_fs(url)
    seq = keep
    while True:
        paths = [url_fs(url_join(url, f"{_stem(prefix, seq)}{suffix}"))[1]
                 for suffix in (STATS_SUFFIX, DALI_IDX_SUFFIX, ".tar")]
        found = [p for p in paths if fs.exists(p)]
        if not found:
            return
        for path in found:
            fs.rm_file(path)
        seq += 1


def _build(manifest: str | Path | Manifest | ManifestStream, out_dir: Path, opts: ShardOptions,
           remote: str | None = None) -> ShardSummary:
    t0 = time.perf_counter()
    if isinstance(manifest, Manifest):
        manifest = ManifestStream.of(manifest)
    elif not isinstance(manifest, ManifestStream):
        manifest = stream_manifest(manifest, opts.format, media_root=opts.media_root, video_ext=opts.video_ext,
                                   qa=opts.qa)
    plan = _plan(manifest, opts)  # the first pass: row count and repeated keys, nothing kept per row
    out_dir.mkdir(parents=True, exist_ok=True)
    build = {
        "format": "alpro-shard-build",
        "version": 1,
        "name": opts.name,
        # The manifest's name only, unless --absolute-paths: its directory is the building machine's business.
        "manifest": {"path": str(manifest.path.resolve()) if opts.absolute_paths else manifest.path.name,
                     "format": manifest.format, "sha256": manifest.sha256, "rows": plan.rows},
        "options": opts.output_options(),
    }
    had_build = remote is not None and _fetch(remote, BUILD_NAME, out_dir)
    write_build(out_dir, build)
    if remote is not None and not had_build:
        upload(out_dir / BUILD_NAME, url_join(remote, BUILD_NAME))

    lo = plan.rows * opts.node_rank // opts.num_nodes
    hi = plan.rows * (opts.node_rank + 1) // opts.num_nodes
    prefix = _stem_prefix(opts)
    done, resume_row = _resume(remote or out_dir, prefix, lo)
    if remote is not None:  # the dedup state reads finished shards' stats locally
        for seq, stats in enumerate(done):
            atomic_write(out_dir / stats_name(_stem(prefix, seq)), json_bytes(stats) + b"\n")
    _remove_stale(out_dir, prefix, keep=len(done))
    if remote is not None:
        _remove_stale_remote(remote, prefix, keep=len(done))
    part = _Partition(out_dir, prefix, opts, done, resume_row, remote)
    done = [_light(s) for s in done]

    n_todo = hi - resume_row
    lines: dict[int, int] = {}  # manifest line of the rows in flight and of the unfinished shard's first row
    todo = _noting_lines(_items(plan, opts, resume_row, hi), lines)
    orphans: list[dict[str, Any]] = []
    pool = None
    if opts.distributor == "ray":
        from alpro.sharding.distributed import ray_results

        results = ray_results(todo, opts)  # Ray tasks transcode slices; this process stays the ordered writer
    elif opts.workers > 1 and n_todo > 1:
        # fork: workers start in milliseconds and inherit the options; the pool exists before the progress bar.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(opts.workers, mp_context=ctx, initializer=_init_worker, initargs=(opts,))
        results = _results(todo, pool, window=4 * opts.workers)
    else:
        _init_worker(opts)
        results = _results(todo, None, window=1)
    bar = tqdm(total=n_todo, unit="clip", desc=f"shard {out_dir.name}", disable=not opts.progress or None,
               dynamic_ncols=True, file=sys.stderr)
    try:
        n_rejects = 0
        for res in results:
            start = part.start_row
            part.feed(res)
            if part.start_row != start:
                lines.pop(start, None)
            if res.index != part.start_row:
                lines.pop(res.index, None)
            n_rejects += res.reject is not None
            bar.update(1)
            bar.set_postfix(rejects=n_rejects, shards=part.seq, refresh=False)
        orphans = part.close(end_row=hi)
    except BrokenProcessPool:
        part.abort()
        raise AlproError(f"a worker process died (an FFmpeg crash or out of memory) near manifest row "
                         f"{lines.get(part.start_row, '?')}; completed shards are kept, rerun to resume") from None
    except BaseException:
        part.abort()
        raise
    finally:
        bar.close()
        results.close()  # a generator: a Ray session it started ends here
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    _remove_stale(out_dir, prefix, keep=part.seq)
    if remote is not None:
        _remove_stale_remote(remote, prefix, keep=part.seq)

    shards = done + part.finished  # _light() of each: the stats themselves are read back from their files
    part_record = {"build": build, "rank": opts.node_rank, "num_nodes": opts.num_nodes, "rows": [lo, hi],
                   "inputs": hi - lo, "shards": _StatsFiles(out_dir, prefix, len(shards)), "rejects": orphans}
    index_path = part_path = None
    if opts.num_nodes == 1:
        merge_index(out_dir, [part_record])
        index_path = out_dir / INDEX_NAME
        if remote is not None:
            _publish(out_dir, remote)
            index_path = url_join(remote, INDEX_NAME)
    else:
        part_path = write_part(out_dir, opts.node_rank, opts.num_nodes,
                               {**part_record, "shards": list(part_record["shards"])})
        if remote is not None:
            part_path = upload(part_path, url_join(remote, part_path.name))
    reasons = Counter(r["reason"] for r in orphans)
    for s in shards:
        reasons.update(s["rejects_by_reason"])
    return ShardSummary(
        out_dir=remote or out_dir,
        inputs=hi - lo,
        written=sum(s["num_samples"] for s in shards),
        rejected=sum(reasons.values()),
        rejects_by_reason=dict(sorted(reasons.items())),
        shards=len(shards),
        resumed_shards=len(done),
        processed=n_todo,
        bytes=sum(s["bytes"] for s in shards),
        frames=sum(s["counts"]["frames"] for s in shards),
        duration=sum(s["duration"] for s in shards),
        seconds=time.perf_counter() - t0,
        index_path=index_path,
        part_path=part_path,
        warnings=list(manifest.warnings),
        captions_dropped=sum(s["counts"]["captions_dropped"] for s in shards),
        nonfinite_nulled=sum(s["counts"].get("nonfinite_nulled", 0) for s in shards),
    )


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class ShardCommand:
    """The command line of ``alpro shard``: what to build (or which multi-node build to merge), and how."""

    manifest: str | None = option(None, positional=True)
    """manifest file (.csv .tsv .jsonl .json) or a folder of media"""
    out_dir: str | None = option(None, positional=True)
    """output directory of the shard set"""
    merge_index: str | None = option(None, metavar="OUT_DIR")
    """join the partial indexes of a multi-node build"""
    options: ShardOptions = option(default_factory=ShardOptions, flat=True)


def main(argv: list[str] | None = None) -> int:
    """``alpro shard``; errors go through the one CLI wrapper (:func:`alpro.cli.guarded`) also when called directly."""
    from alpro.cli import guarded

    return guarded("shard", _main, argv)


def _main(argv: list[str]) -> int:
    args = parse_command(ShardCommand, argv, prog="alpro shard", description="Pack a manifest into transcoded "
                         "WebDataset tar shards (docs/sharding.md). Reject reasons: " + ", ".join(REJECT_REASONS) + ".")
    if args.merge_index:
        if args.manifest or args.out_dir:
            raise AlproError("--merge-index OUT_DIR takes no MANIFEST/OUT_DIR arguments")
        index = merge_index_at(args.merge_index)
        t = index["totals"]
        target = url_join(args.merge_index, INDEX_NAME) if is_url(args.merge_index) else Path(args.merge_index) / INDEX_NAME
        print(f"merged {t['shards']} shards, {t['samples']} samples, {t['rejected']} rejects -> {target}")
        if t["cross_node_duplicates"]:
            print(f"  warning: {t['cross_node_duplicates']} sample(s) duplicate the bytes of a sample on another node")
        return 0
    if not args.manifest or not args.out_dir:
        raise AlproError("give MANIFEST and OUT_DIR (or --merge-index OUT_DIR)")
    summary = shard_manifest(args.manifest, args.out_dir, args.options)
    print(summary.table())
    ratio_limit = args.options.max_reject_ratio
    if summary.reject_ratio > ratio_limit:
        print(f"alpro shard: {summary.rejected}/{summary.inputs} inputs rejected "
              f"({100 * summary.reject_ratio:.1f} % > --max-reject-ratio {ratio_limit}); "
              f"written shards are kept, see {url_join(args.out_dir, REJECTS_NAME) if is_url(args.out_dir) else Path(args.out_dir) / REJECTS_NAME}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
