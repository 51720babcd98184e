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
import mmap
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
    try:  # the usual case, at C speed: every hash a 64-digit hex string
        if set(map(len, hashes)) <= {64}:
            words = np.frombuffer(bytes.fromhex("".join(hashes)), dtype="<u8").reshape(-1, 4)
            return words[:, :2] ^ words[:, 2:]
    except (TypeError, ValueError):
        pass
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
    """How many digests equal an earlier one (``len(list) - len(set)``): a sort of the first 64-bit words finds
    the few values that repeat; only digests with such a first word are compared whole. Memory: the digests
    (16 bytes each) plus one sorted copy of their first words (8 bytes each), chunk by chunk."""
    if not digests:
        return 0
    hi = np.sort(np.concatenate([d[:, 0] for d in digests]))
    repeated = np.unique(hi[1:][hi[1:] == hi[:-1]])
    del hi
    if not len(repeated):
        return 0
    seen: set[tuple[int, int]] = set()
    total = 0
    for d in digests:
        for a, b in d[np.isin(d[:, 0], repeated)].tolist():
            total += (a, b) in seen
            seen.add((a, b))
    return total


def _dumps(obj: Any, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _utf8_ok(obj: Any) -> bool:
    """Whether ``json_bytes`` writes ``obj`` as UTF-8 (False: a lone surrogate makes it escape everything)."""
    try:
        json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class _Spill:
    """A temporary directory next to the index where a merge writes as it reads the parts: the index JSON (in
    the order of the file, to be compressed in one piece at the end) and the per-sample columns as raw arrays
    (keys as lengths + bytes, fixed width only once the longest is known). Nothing grows in memory but the
    per-shard table (names, counts)."""

    _RAW = {"offset": "<i8", "size": "<i8", "media": "u1", "num_frames": "<i4", "key_len": "<i4"}

    def __init__(self, out_dir: Path):
        self.dir = Path(tempfile.mkdtemp(dir=out_dir, prefix=".index.merge.", suffix=".tmp"))
        self.json = open(self.dir / "index.json", "wb")
        self.raw = {name: open(self.dir / f"{name}.raw", "wb") for name in [*self._RAW, "key"]}
        self.files: list[bytes] = []
        self.idxs: list[bytes] = []
        self.counts: list[int] = []
        self.media: list[np.ndarray] = []
        self.samples = 0
        self.key_width = 1

    def add(self, entry: dict[str, Any]) -> None:
        n = int(entry["num_samples"])
        media = np.array([MEDIA_CODES.get(m, 2) if isinstance(m, str) else 2
                          for m in (entry.get("media") or ["?"] * n)], dtype=np.uint8)
        keys = [str(k).encode("utf-8", "surrogateescape") for k in entry["keys"]]
        try:
            values = {"offset": np.asarray(entry["offsets"], dtype=np.int64),
                      "size": np.asarray(entry["sizes"], dtype=np.int64), "media": media,
                      "num_frames": np.asarray(entry.get("num_frames") or [-1] * n, dtype=np.int32),
                      "key_len": np.array([len(k) for k in keys], dtype=np.int32)}
        except (TypeError, ValueError, OverflowError) as e:
            raise AlproError(f"shard {entry['file']!r}: malformed per-sample lists ({e}); its stats are damaged: "
                             "delete it and run alpro shard again") from None
        if any(len(v) != n for v in values.values()) or (n and (values["offset"].min() < 0
                                                                 or values["size"].min() < 0)):
            raise AlproError(f"shard {entry['file']!r}: per-sample lists do not match num_samples={n} (or negative "
                             "offsets / sizes); its stats are damaged: delete it and run alpro shard again")
        for name, v in values.items():
            self.raw[name].write(v.astype(self._RAW[name], copy=False).tobytes())
        self.raw["key"].write(b"".join(keys))
        self.key_width = max(self.key_width, int(values["key_len"].max()) if n else 1)
        self.files.append(str(entry["file"]).encode("utf-8", "surrogateescape"))
        self.idxs.append(str(entry.get("idx") or "").encode("utf-8", "surrogateescape"))
        self.counts.append(n)
        self.media.append(np.bincount(media, minlength=3)[:3])
        self.samples += n

    def close(self) -> None:
        for f in [self.json, *self.raw.values()]:
            f.close()

    def columns(self, out_dir: Path, meta: dict[str, Any]) -> Path:
        """``index.cols/`` (docs/shard_format.md) in a temporary directory next to it, complete; returned for
        :func:`_place_columns`."""
        self.close()
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{COLUMNS_DIR}.", suffix=".tmp"))
        shards = len(self.counts)

        def save(spec: tuple[str, str], values: np.ndarray) -> None:
            np.save(tmp / spec[0], values, allow_pickle=False)

        width = lambda names: f"S{max([1, *map(len, names)])}"  # noqa: E731
        save(SHARD_COLUMNS["file"], np.array(self.files, dtype=width(self.files)))
        save(SHARD_COLUMNS["idx"], np.array(self.idxs, dtype=width(self.idxs)))
        save(SHARD_COLUMNS["start"], np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype("<i8"))
        save(SHARD_COLUMNS["media"], np.array(self.media, dtype="<i8").reshape(shards, 3))
        step = 1 << 22  # rows per copy (at most 32 MB of int64)
        for name in ("offset", "size", "media", "num_frames"):
            fname, dtype = SAMPLE_COLUMNS[name]
            raw = np.memmap(self.dir / f"{name}.raw", dtype=dtype, mode="r") if self.samples else np.zeros(0, dtype)
            out = np.lib.format.open_memmap(tmp / fname, mode="w+", dtype=dtype, shape=(self.samples,))
            for a in range(0, self.samples, step):
                out[a:a + step] = raw[a:a + step]
            out.flush()
            del out, raw
        lengths = (np.memmap(self.dir / "key_len.raw", dtype="<i4", mode="r") if self.samples
                   else np.zeros(0, "<i4"))
        blob = np.memmap(self.dir / "key.raw", dtype=np.uint8, mode="r") if os.path.getsize(self.dir / "key.raw") \
            else np.zeros(0, np.uint8)
        keys = np.lib.format.open_memmap(tmp / SAMPLE_COLUMNS["key"][0], mode="w+", dtype=f"S{self.key_width}",
                                         shape=(self.samples,))
        pos = 0
        step = max(1, (8 << 20) // (8 * self.key_width))  # keys per chunk: index arrays of at most ~8 MB
        for a in range(0, self.samples, step):
            lens = np.asarray(lengths[a:a + step], dtype=np.int64)
            total = int(lens.sum())
            rows = np.repeat(np.arange(len(lens)), lens)
            cols = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
            block = np.zeros((len(lens), self.key_width), np.uint8)
            block[rows, cols] = blob[pos:pos + total]
            keys[a:a + len(lens)] = block.view(f"S{self.key_width}").ravel()
            pos += total
        keys.flush()
        del keys, lengths, blob
        for f in tmp.iterdir():
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
        atomic_write(tmp / COLUMNS_META, json_bytes(meta, indent=1) + b"\n")
        return tmp

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _place_columns(out_dir: Path, tmp: Path) -> None:
    """Move a complete ``index.cols`` into place, replacing an older one."""
    final = out_dir / COLUMNS_DIR
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{COLUMNS_DIR}.", suffix=".old"))
        os.replace(final, old / COLUMNS_DIR)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def merge_index(out_dir: str | Path, parts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Join the partial indexes of ``out_dir`` (or the given in-memory ``parts``) into the dataset files.

    Writes ``sizes.json``, ``rejects.jsonl``, the columnar index ``index.cols/`` and, last, ``index.json.zst``;
    returns the index without its ``shards`` (header and totals). Fails with one line naming the missing node
    ranks if a part is missing, or if parts come from different builds.

    Streams: the parts are read one at a time, once; each shard's entry goes straight to a temporary JSON file
    and its per-sample lists to temporary column files on disk. Held in memory at once: one part, the rejects,
    the per-shard table and 16 bytes of each sample's source hash (the cross-node duplicate count). The JSON
    file is then compressed in one piece from a memory map (so the bytes are exactly those of
    ``zstd(json_bytes(index))``: a zstd *stream* of more than one window compresses differently); its pages
    are file cache, read once, not process memory.
    """
    out_dir = Path(out_dir)
    if parts is None:
        ranks, num_nodes = _part_ranks(out_dir)
        load = lambda: (read_json_zst(out_dir / part_name(r, num_nodes)) for r in ranks)  # noqa: E731
    else:
        ordered = sorted(parts, key=lambda p: p["rank"])
        load = lambda: iter(ordered)  # noqa: E731
    sentinel = "\u0000alpro-shards\u0000"

    def head_of(build: dict[str, Any], totals: dict[str, Any] | None) -> dict[str, Any]:
        return {"format": FORMAT_TAG, "version": FORMAT_VERSION, "name": build["name"], "options": build["options"],
                "manifest": build["manifest"], "shards": sentinel, "totals": totals or {}}

    def split(head: dict[str, Any], ascii_only: bool) -> tuple[bytes, bytes]:
        text, marker = _dumps(head, ascii_only), _dumps(sentinel, ascii_only)
        at = text.index(marker)
        return text[:at] + b"[", b"]" + text[at + len(marker):]

    spill = _Spill(out_dir)
    try:
        build = None
        totals, rejects, sizes, digests = _Totals(), [], {}, []
        inputs = 0
        utf8 = True
        for part in load():
            if build is None:
                build = part["build"]
                try:
                    spill.json.write(split(head_of(build, None), False)[0])
                except UnicodeEncodeError:
                    utf8 = False
            elif json.dumps(part["build"], sort_keys=True) != json.dumps(build, sort_keys=True):
                raise AlproError(f"{out_dir}: partial indexes come from different builds; rebuild into a clean OUT_DIR")
            for stats in part["shards"]:
                totals.add(stats)
                rejects.extend(stats["rejects"])
                sizes[stats["file"]] = stats["num_samples"]
                if not build["options"]["keep_duplicates"]:
                    digests.append(_digests(stats["sha256"]))
                entry = shard_entry(stats)
                if utf8:
                    try:
                        spill.json.write((b"," if totals.shards > 1 else b"") + _dumps(entry, False))
                    except UnicodeEncodeError:
                        utf8 = False
                spill.add(entry)
            rejects.extend(part["rejects"])
            inputs += part["inputs"]
            del part
        if build is None:
            raise AlproError(f"{out_dir}: no partial indexes to merge")
        rejects.sort(key=lambda r: r["row"])
        # Each node dedups its own rows only, so a repeated source hash here is a duplicate across nodes.
        cross_duplicates = 0 if build["options"]["keep_duplicates"] else _count_repeats(digests)
        del digests
        head = head_of(build, {**totals.as_dict(rejects, inputs), "cross_node_duplicates": cross_duplicates})
        if utf8 and _utf8_ok(head):
            spill.json.write(split(head, False)[1])
        else:  # rare (non-UTF-8 paths): json_bytes escapes the whole index, so write it again, escaped
            spill.json.seek(0)
            spill.json.truncate()
            prefix, suffix = split(head, True)
            spill.json.write(prefix)
            first = True
            for part in load():
                for stats in part["shards"]:
                    spill.json.write((b"" if first else b",") + _dumps(shard_entry(stats), True))
                    first = False
            spill.json.write(suffix)
        spill.close()

        # sizes.json and rejects.jsonl first, then the columns, index last: an index on disk means the set is
        # complete.
        atomic_write(out_dir / SIZES_NAME, (json.dumps(sizes, indent=1) + "\n").encode())
        atomic_write(out_dir / REJECTS_NAME, b"".join(json_bytes(r) + b"\n" for r in rejects))
        with atomic_path(out_dir / INDEX_NAME) as tmp:
            with open(spill.dir / "index.json", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                compressed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(m)
            tmp.write_bytes(compressed)
            index_bytes = len(compressed)
            del compressed
            columns = spill.columns(out_dir, {"format": COLUMNS_TAG, "version": COLUMNS_VERSION,
                                              "shards": totals.shards, "samples": totals.samples,
                                              "index_bytes": index_bytes, "name": build["name"],
                                              "options": build["options"]})
            try:
                _place_columns(out_dir, columns)
            except BaseException:
                shutil.rmtree(columns, ignore_errors=True)
                raise
    finally:
        spill.remove()
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
