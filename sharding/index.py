"""The dataset-level files of a shard set: ``build.json``, partial and merged ``index.json.zst``, ``sizes.json``,
``rejects.jsonl``.

A build of ``--num-nodes M`` writes one partial index per node (``index.part-RRRRR-of-MMMMM.json.zst``) and
``alpro shard --merge-index OUT_DIR`` joins them; a single-node build merges its own part at the end. Everything
here is a pure function of the per-shard stats, so re-merging is idempotent and the merged files are
byte-identical for any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from alpro.errors import AlproError
from alpro.fileio import atomic_path, atomic_write
from alpro.shard_format import (
    BUILD_NAME,
    COLUMNS_DIR,
    COLUMNS_META,
    COLUMNS_TAG,
    COLUMNS_VERSION,
    FORMAT_TAG,
    FORMAT_VERSION,
    INDEX_NAME,
    MEDIA_CODES,
    REJECTS_NAME,
    SAMPLE_COLUMNS,
    SHARD_COLUMNS,
    SIZES_NAME,
    part_name,
)
from alpro.sharding.writer import json_bytes

__all__ = [
    "INDEX_NAME",
    "BUILD_NAME",
    "read_json_zst",
    "write_json_zst",
    "part_name",
    "write_build",
    "read_index",
    "shard_entry",
    "write_part",
    "merge_index",
]

_PART_RE = re.compile(r"^index\.part-(\d{5})-of-(\d{5})\.json\.zst$")
_ZSTD_LEVEL = 10  # single-threaded zstd at a fixed level: deterministic output bytes


def write_json_zst(path: Path, obj: Any) -> None:
    atomic_write(path, zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(json_bytes(obj)))


def read_json_zst(path: Path) -> Any:
    """The JSON of a ``.json.zst`` file, its decompressed size bounded as the loader bounds an index
    (:func:`alpro.data.shards.decompress_index`: a bomb is refused from its frame header, not allocated)."""
    from alpro.data.shards import decompress_index

    try:
        return json.loads(decompress_index(Path(path).read_bytes(), str(path)))
    except (OSError, ValueError) as e:
        raise AlproError(f"{path}: cannot read zstd JSON ({e})") from None


def write_build(out_dir: Path, build: dict[str, Any]) -> None:
    """Record what this OUT_DIR is built from; refuse to mix in shards made from other inputs or options."""
    path = out_dir / BUILD_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old is not None and old != build:
            diff = [k for k in sorted(set(old) | set(build)) if old.get(k) != build.get(k)]
            details = []
            for k in diff:
                if isinstance(old.get(k), dict) and isinstance(build.get(k), dict):
                    details += [f"{k}.{s}: {old[k].get(s)!r} -> {build[k].get(s)!r}"
                                for s in sorted(set(old[k]) | set(build[k])) if old[k].get(s) != build[k].get(s)]
                else:
                    details.append(f"{k}: {old.get(k)!r} -> {build.get(k)!r}")
            raise AlproError(f"{out_dir} holds shards built from other inputs or options ({'; '.join(details)}); "
                             "use a new OUT_DIR or delete the old one")
        if old == build:
            return
    atomic_write(path, json_bytes(build, indent=1) + b"\n")


def shard_entry(stats: dict[str, Any]) -> dict[str, Any]:
    """The dataset-index view of one shard's stats (see docs/shard_format.md)."""
    return {k: stats[k] for k in ("file", "idx", "num_samples", "bytes", "keys", "media", "num_frames", "offsets",
                                  "sizes", "rows")}


def write_part(out_dir: Path, rank: int, num_nodes: int, part: dict[str, Any]) -> Path:
    """A node's share of the index: its shards' stats (in order) and the rejects not owned by any shard."""
    path = out_dir / part_name(rank, num_nodes)
    write_json_zst(path, part)
    return path


def read_index(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise AlproError(f"no {INDEX_NAME} in {out_dir} (is the build finished? multi-node: run --merge-index)")
    return read_json_zst(path)


class _Totals:
    """The index's ``totals``, summed shard by shard in index order (the same sums, in the same order, as over
    a list of every shard, so the figures are byte-identical)."""

    def __init__(self) -> None:
        self.shards = self.samples = self.frames = self.bytes = 0
        self.duration = 0
        self.media: Counter = Counter()

    def add(self, s: dict[str, Any]) -> None:
        self.shards += 1
        self.samples += s["num_samples"]
        self.media.update(s["media"])
        self.frames += sum(n for n, m in zip(s["num_frames"], s["media"]) if m == "video")
        self.bytes += s["bytes"]
        self.duration += s["duration"]

    def as_dict(self, rejects: list[dict[str, Any]], inputs: int) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "samples": self.samples,
            "videos": self.media["video"],
            "images": self.media["image"],
            "frames": self.frames,
            "bytes": self.bytes,
            "duration": round(self.duration, 3),
            "inputs": inputs,
            "rejected": len(rejects),
            "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        }


def _digests(hashes: list[Any]) -> np.ndarray:
    """(n, 2) uint64 standing for the samples' source hashes: each sha256 folded to 128 bits (its two halves
    XORed; any other string is hashed to 256 bits first). 16 bytes a sample instead of a Python string in a set."""
    raw = []
    for sha in hashes:
        try:
            digest = bytes.fromhex(sha) if isinstance(sha, str) and len(sha) == 64 else None
        except ValueError:
            digest = None
        raw.append(digest or hashlib.blake2b(json.dumps(sha).encode(), digest_size=32).digest())
    words = np.frombuffer(b"".join(raw), dtype="<u8").reshape(-1, 4)
    return words[:, :2] ^ words[:, 2:]


def _count_repeats(digests: list[np.ndarray]) -> int:
    """How many digests equal an earlier one (``len(list) - len(set)``), from a sort of two uint64 columns."""
    if not digests:
        return 0
    words = np.concatenate(digests)
    order = np.lexsort((words[:, 1], words[:, 0]))
    hi, lo = words[order, 0], words[order, 1]
    return int(((hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])).sum())


def _dumps(obj: Any, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _utf8_ok(obj: Any) -> bool:
    """Whether ``json_bytes`` writes ``obj`` as UTF-8 (False: a lone surrogate makes it escape everything)."""
    try:
        json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class _ColumnsWriter:
    """Writes ``index.cols/`` (docs/shard_format.md) shard by shard into a temporary directory next to it;
    :meth:`finish` moves it into place (replacing an older one)."""

    def __init__(self, out_dir: Path, shards: int, samples: int, widths: dict[str, int]):
        self.out_dir, self.shards, self.samples = out_dir, shards, samples
        self.tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{COLUMNS_DIR}.", suffix=".tmp"))

        def column(spec: tuple[str, str], shape: tuple[int, ...], width: int = 1) -> np.ndarray:
            dtype = f"S{max(width, 1)}" if spec[1] == "S" else spec[1]
            return np.lib.format.open_memmap(self.tmp / spec[0], mode="w+", dtype=dtype, shape=shape)

        self.shard_cols = {"file": column(SHARD_COLUMNS["file"], (shards,), widths["file"]),
                           "idx": column(SHARD_COLUMNS["idx"], (shards,), widths["idx"]),
                           "start": column(SHARD_COLUMNS["start"], (shards + 1,)),
                           "media": column(SHARD_COLUMNS["media"], (shards, 3))}
        self.cols = {name: column(spec, (samples,), widths["key"] if name == "key" else 1)
                     for name, spec in SAMPLE_COLUMNS.items()}
        self.i = self.pos = 0
        self.shard_cols["start"][0] = 0

    def add(self, entry: dict[str, Any]) -> None:
        n, a = int(entry["num_samples"]), self.pos
        media = [MEDIA_CODES.get(m, 2) if isinstance(m, str) else 2 for m in (entry.get("media") or ["?"] * n)]
        values = {"key": [str(k).encode("utf-8", "surrogateescape") for k in entry["keys"]],
                  "offset": entry["offsets"], "size": entry["sizes"], "media": media,
                  "num_frames": entry.get("num_frames") or [-1] * n}
        if any(len(v) != n for v in values.values()) or min(entry["offsets"] or [0]) < 0 or min(entry["sizes"] or [0]) < 0:
            raise AlproError(f"shard {entry['file']!r}: per-sample lists do not match num_samples={n} (or negative "
                             "offsets / sizes); its stats are damaged: delete it and run alpro shard again")
        for name, v in values.items():
            self.cols[name][a:a + n] = v
        self.shard_cols["file"][self.i] = str(entry["file"]).encode("utf-8", "surrogateescape")
        self.shard_cols["idx"][self.i] = str(entry.get("idx") or "").encode("utf-8", "surrogateescape")
        self.shard_cols["media"][self.i] = np.bincount(np.asarray(media, dtype=np.int64), minlength=3)[:3]
        self.i, self.pos = self.i + 1, a + n
        self.shard_cols["start"][self.i] = self.pos

    def finish(self, meta: dict[str, Any]) -> None:
        assert (self.i, self.pos) == (self.shards, self.samples), (self.i, self.pos)
        for col in [*self.shard_cols.values(), *self.cols.values()]:
            col.flush()
        self.shard_cols = self.cols = {}
        for f in self.tmp.iterdir():
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
        atomic_write(self.tmp / COLUMNS_META, json_bytes(meta, indent=1) + b"\n")
        final = self.out_dir / COLUMNS_DIR
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=self.out_dir, prefix=f".{COLUMNS_DIR}.", suffix=".old"))
            os.replace(final, old / COLUMNS_DIR)
        os.replace(self.tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        self.shard_cols = self.cols = {}
        shutil.rmtree(self.tmp, ignore_errors=True)


def merge_index(out_dir: str | Path, parts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Join the partial indexes of ``out_dir`` (or the given in-memory ``parts``) into the dataset files.

    Writes ``sizes.json``, ``rejects.jsonl``, the columnar index ``index.cols/`` and, last, ``index.json.zst``;
    returns the index without its ``shards`` (header and totals). Fails with one line naming the missing node
    ranks if a part is missing, or if parts come from different builds.

    Streams: the parts are read one at a time, twice (totals and sizes first, then the shard entries, which go
    straight into a zstd stream and into the columns); held at once are one part, the rejects, the per-shard
    sizes and 16 bytes of each sample's source hash (the cross-node duplicate count). The bytes written are those
    of ``json_bytes(index)`` compressed in one piece (a zstd stream with the size pledged up front).
    """
    out_dir = Path(out_dir)
    if parts is None:
        ranks, num_nodes = _part_ranks(out_dir)
        load = lambda: (read_json_zst(out_dir / part_name(r, num_nodes)) for r in ranks)  # noqa: E731
    else:
        ordered = sorted(parts, key=lambda p: p["rank"])
        load = lambda: iter(ordered)  # noqa: E731
    build = None
    totals, rejects, sizes, digests = _Totals(), [], {}, []
    inputs = entry_bytes = 0
    utf8 = True
    widths = {"file": 1, "idx": 1, "key": 1}
    for part in load():
        if build is None:
            build = part["build"]
        elif json.dumps(part["build"], sort_keys=True) != json.dumps(build, sort_keys=True):
            raise AlproError(f"{out_dir}: partial indexes come from different builds; rebuild into a clean OUT_DIR")
        for stats in part["shards"]:
            totals.add(stats)
            rejects.extend(stats["rejects"])
            sizes[stats["file"]] = stats["num_samples"]
            if not build["options"]["keep_duplicates"]:
                digests.append(_digests(stats["sha256"]))
            entry = shard_entry(stats)
            utf8 = utf8 and _utf8_ok(entry)
            entry_bytes += len(_dumps(entry, False)) if utf8 else 0
            widths["file"] = max(widths["file"], len(str(entry["file"]).encode("utf-8", "surrogateescape")))
            widths["idx"] = max(widths["idx"], len(str(entry.get("idx") or "").encode("utf-8", "surrogateescape")))
            widths["key"] = max([widths["key"], *(len(str(k).encode("utf-8", "surrogateescape"))
                                                   for k in entry["keys"])])
        rejects.extend(part["rejects"])
        inputs += part["inputs"]
        del part
    if build is None:
        raise AlproError(f"{out_dir}: no partial indexes to merge")
    rejects.sort(key=lambda r: r["row"])
    # Each node dedups its own rows only, so a repeated source hash here is a duplicate across nodes.
    cross_duplicates = 0 if build["options"]["keep_duplicates"] else _count_repeats(digests)
    del digests
    sentinel = "\u0000alpro-shards\u0000"
    head = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "name": build["name"], "options": build["options"],
            "manifest": build["manifest"], "shards": sentinel,
            "totals": {**totals.as_dict(rejects, inputs), "cross_node_duplicates": cross_duplicates}}
    ascii_only = not (utf8 and _utf8_ok(head))
    text = _dumps(head, ascii_only)
    marker = _dumps(sentinel, ascii_only)
    prefix, suffix = text[: text.index(marker)], text[text.index(marker) + len(marker):]
    if ascii_only:  # rare (non-UTF-8 paths): the lengths are those of the escaped entries, so measure again
        entry_bytes = sum(len(_dumps(shard_entry(s), True)) for p in load() for s in p["shards"])
    total = len(prefix) + 2 + entry_bytes + max(totals.shards - 1, 0) + len(suffix)

    # sizes.json and rejects.jsonl first, then the columns, index last: an index on disk means the set is complete.
    atomic_write(out_dir / SIZES_NAME, (json.dumps(sizes, indent=1) + "\n").encode())
    atomic_write(out_dir / REJECTS_NAME, b"".join(json_bytes(r) + b"\n" for r in rejects))
    columns = _ColumnsWriter(out_dir, totals.shards, totals.samples, widths)
    try:
        with atomic_path(out_dir / INDEX_NAME) as tmp:
            with open(tmp, "wb") as f:
                z = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).stream_writer(f, size=total, closefd=False)
                z.write(prefix + b"[")
                first = True
                for part in load():
                    for stats in part["shards"]:
                        entry = shard_entry(stats)
                        z.write((b"" if first else b",") + _dumps(entry, ascii_only))
                        first = False
                        columns.add(entry)
                    del part
                z.write(b"]" + suffix)
                z.close()
            columns.finish({"format": COLUMNS_TAG, "version": COLUMNS_VERSION, "shards": totals.shards,
                            "samples": totals.samples, "index_bytes": os.path.getsize(tmp),
                            "name": build["name"], "options": build["options"]})
    except BaseException:
        columns.abort()
        raise
    return {k: v for k, v in head.items() if k != "shards"}


def _part_ranks(out_dir: Path) -> tuple[list[int], int]:
    if not out_dir.is_dir():
        raise AlproError(f"not a directory: {out_dir}")
    found: dict[int, int] = {}
    for p in out_dir.iterdir():
        m = _PART_RE.match(p.name)
        if m:
            found[int(m.group(1))] = int(m.group(2))
    if not found:
        raise AlproError(f"{out_dir}: no partial indexes (index.part-*.json.zst); run `alpro shard` on every node first")
    totals = set(found.values())
    if len(totals) != 1:
        raise AlproError(f"{out_dir}: partial indexes disagree on --num-nodes ({sorted(totals)})")
    num_nodes = totals.pop()
    missing = sorted(set(range(num_nodes)) - set(found))
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise AlproError(f"{out_dir}: {len(missing)} of {num_nodes} node(s) not finished (missing --node-rank {shown})")
    return list(range(num_nodes)), num_nodes
