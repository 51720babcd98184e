"""The dataset-level files of a shard set: ``build.json``, partial and merged ``index.json.zst``, ``sizes.json``,
``rejects.jsonl``.

A build of ``--num-nodes M`` writes one partial index per node (``index.part-RRRRR-of-MMMMM.json.zst``) and
``alpro shard --merge-index OUT_DIR`` joins them; a single-node build merges its own part at the end. Everything
here is a pure function of the per-shard stats, so re-merging is idempotent and the merged files are
byte-identical for any number of workers.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import zstandard

from alpro.errors import AlproError
from alpro.fileio import atomic_write
from alpro.shard_format import BUILD_NAME, FORMAT_TAG, FORMAT_VERSION, INDEX_NAME, REJECTS_NAME, SIZES_NAME, part_name
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


def _totals(shards: list[dict[str, Any]], rejects: list[dict[str, Any]], inputs: int) -> dict[str, Any]:
    media = Counter(m for s in shards for m in s["media"])
    return {
        "shards": len(shards),
        "samples": sum(s["num_samples"] for s in shards),
        "videos": media["video"],
        "images": media["image"],
        "frames": sum(n for s in shards for n, m in zip(s["num_frames"], s["media"]) if m == "video"),
        "bytes": sum(s["bytes"] for s in shards),
        "duration": round(sum(s["duration"] for s in shards), 3),
        "inputs": inputs,
        "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
    }


def merge_index(out_dir: str | Path, parts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Join the partial indexes of ``out_dir`` (or the given in-memory ``parts``) into the dataset files.

    Writes ``index.json.zst``, ``sizes.json`` and ``rejects.jsonl``; returns the index. Fails with one line
    naming the missing node ranks if a part is missing, or if parts come from different builds.
    """
    out_dir = Path(out_dir)
    if parts is None:
        parts = _load_parts(out_dir)
    builds = {json.dumps(p["build"], sort_keys=True) for p in parts}
    if len(builds) != 1:
        raise AlproError(f"{out_dir}: partial indexes come from different builds; rebuild into a clean OUT_DIR")
    build = parts[0]["build"]
    shards: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for part in sorted(parts, key=lambda p: p["rank"]):
        for stats in part["shards"]:
            shards.append(stats)
            rejects.extend(stats["rejects"])
        rejects.extend(part["rejects"])
    rejects.sort(key=lambda r: r["row"])
    # Each node dedups its own rows only, so a repeated source hash here is a duplicate across nodes.
    hashes = [sha for stats in shards for sha in stats["sha256"]]
    cross_duplicates = 0 if build["options"]["keep_duplicates"] else len(hashes) - len(set(hashes))
    inputs = sum(p["inputs"] for p in parts)
    index = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "name": build["name"],
        "options": build["options"],
        "manifest": build["manifest"],
        "shards": [shard_entry(s) for s in shards],
        "totals": {**_totals(shards, rejects, inputs), "cross_node_duplicates": cross_duplicates},
    }
    # sizes.json and rejects.jsonl first, index last: an index on disk means the set is complete.
    sizes = {s["file"]: s["num_samples"] for s in shards}
    atomic_write(out_dir / SIZES_NAME, (json.dumps(sizes, indent=1) + "\n").encode())
    atomic_write(out_dir / REJECTS_NAME, b"".join(json_bytes(r) + b"\n" for r in rejects))
    write_json_zst(out_dir / INDEX_NAME, index)
    return index


def _load_parts(out_dir: Path) -> list[dict[str, Any]]:
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
    return [read_json_zst(out_dir / part_name(r, num_nodes)) for r in range(num_nodes)]
