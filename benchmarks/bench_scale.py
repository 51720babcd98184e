"""What one rank and one loader worker cost against the size of the shard set (issues 12.1, 16.1, 16.2, 16.4,
16.7), before (the code at commit f4ecdb7: JSON index, global epoch order) and after (columnar index, block
order), plus every ``benchmarks/scale_*.py`` section of the other scale work, in one table.

    .venv/bin/python benchmarks/bench_scale.py            # 1M and 10M samples, before and after (~15 min)
    .venv/bin/python benchmarks/bench_scale.py --quick    # 1M samples only (~3 min), sections in quick mode
    .venv/bin/python benchmarks/bench_scale.py --full     # also 100M samples (after only; ~20 min more, 5 GB /tmp)
    .venv/bin/python benchmarks/bench_scale.py --only-index   # skip the scale_*.py sections
    .venv/bin/python benchmarks/bench_scale.py --sizes 100M --only-index   # one size

The set: 1,000 samples per shard (1M = 1k shards, 10M = 10k, 100M = 100k), keys of 10 characters, every
sample a video, in the real format: 1M and 10M are written as per-node partial indexes (10k samples each, as a
1,000-node build would) and joined by the real ``merge_index``, so they have both ``index.json.zst`` and
``index.cols/``; 100M has the columns only (written by numpy in the documented layout: its JSON would be ~6 GB
of text and is what the columns replace). No tars: nothing here reads sample bytes. Cached under
``/tmp/alpro-scale-index/`` (delete it to regenerate).

Each figure is one fresh process (``python -c``) importing the tree measured (this checkout, or ``git archive
f4ecdb7`` under /tmp for "before"):

* ``rank start-up``: ``resolve`` + ``item_table`` (pre-training: one item per sample) + ``TrainPlan`` + the
  first ``task`` of rank 1023 of 1,024 (8 per rank), seconds;
* ``peak`` / ``steady RSS above imports``: ``VmHWM`` at the end (not ``ru_maxrss``, which keeps the peak of the
  parent across fork + exec), and ``VmRSS`` after ``gc.collect()``, minus ``VmRSS`` after the imports (MB); of
  the steady figure, ``RssFile``: pages of the mapped index (file cache);
* ``fork worker``: a forked child (a DataLoader worker) that turns 64 tasks into sample locations (shard url,
  offset, size, key: what ``ItemLoader.prepare`` reads before the bytes); its ``Private_Dirty`` (memory it
  wrote: its heap, pages copied on write) and ``Private_Clean`` (clean pages only it maps: here the file cache of
  the sample rows it read, shared with any process that reads them and evictable) in MB;
* ``forkserver payload``: ``pickle.dumps`` of (shard set, item table): what a DALI forkserver worker receives;
* ``merge-index``: ``merge_index`` of the partial indexes, seconds and peak RSS above imports (10M before: only
  with ``--full``: about 4.6 GB);
* ``pipe: name lookup``: ``resolve`` of one ``pipe:cat`` command per shard with the set's index.

``run(quick) -> list[dict]`` of each ``benchmarks/scale_*.py`` module (keys path, size, before, after, unit,
note) is collected into the same table; the whole table goes to ``benchmarks/results/scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_info  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(tempfile.gettempdir()) / "alpro-scale-index"
BEFORE_COMMIT = "f4ecdb7"
BEFORE_TREE = Path(tempfile.gettempdir()) / f"alpro-scale-index-{BEFORE_COMMIT}"
PER_SHARD = 1000
PER_PART = 10_000
WORLD, BATCH = 1024, 8
SIZES = {"1M": 1_000_000, "10M": 10_000_000, "100M": 100_000_000}

_RSS = r"""
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
def rss_mb():
    return status_mb("VmRSS")
def peak_mb():  # VmHWM: the peak of this process image (ru_maxrss keeps the parent's peak across fork + exec)
    return status_mb("VmHWM")
def private_mb():
    out = {"Private_Clean": 0, "Private_Dirty": 0}
    for line in open("/proc/self/smaps_rollup"):
        name = line.split(":")[0]
        if name in out:
            out[name] = int(line.split()[1]) / 1024
    return out
"""

_RANK = r"""
import gc, json, os, pickle, sys, time
root, spec, world, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if root:
    sys.path.insert(0, root)
import numpy as np
import alpro.data.shards as mod
from alpro.data.plan import TrainPlan
from alpro.data.shards import resolve
from alpro.data.sources import item_table
assert (not root) or mod.__file__.startswith(root), mod.__file__
""" + _RSS + r"""
base, base_file = rss_mb(), status_mb("RssFile")
t0 = time.perf_counter()
shardset = resolve(spec, "bench")
t_resolve = time.perf_counter() - t0
table, _ = item_table(shardset, "video", "pretrain", True, None)
plan = TrainPlan(table, batch, world - 1, world, 0, 0, 8192, 16)
task = plan.task(0, 0, 0)
t_start = time.perf_counter() - t0

def locate_tasks(n):
    for b in range(n):
        for item in plan.task(b, 0, b).items:
            shard, j = shardset.locate(int(table.sample[item]))
            shard.url, int(shard.offsets[j]), int(shard.sizes[j]), bytes(shard.keys[j])

locate_tasks(4)
gc.collect()
steady = rss_mb() - base
steady_file = status_mb("RssFile") - base_file
peak = peak_mb() - base
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    locate_tasks(64)
    os.write(w, json.dumps(private_mb()).encode())
    os._exit(0)
os.close(w)
worker = json.loads(os.read(r, 1 << 16))
os.waitpid(pid, 0)
t1 = time.perf_counter()
payload = len(pickle.dumps((shardset, table), protocol=pickle.HIGHEST_PROTOCOL))
t_pickle = time.perf_counter() - t1
print(json.dumps({"resolve_s": t_resolve, "startup_s": t_start, "steady_mb": steady, "peak_mb": peak,
                  "steady_file_mb": steady_file,
                  "worker_dirty_mb": worker["Private_Dirty"], "worker_clean_mb": worker["Private_Clean"], "payload_mb": payload / 2**20, "pickle_s": t_pickle,
                  "samples": len(shardset), "shards": len(shardset.shards)}))
"""

_MERGE = r"""
import json, sys, time
root, out = sys.argv[1], sys.argv[2]
if root:
    sys.path.insert(0, root)
import alpro.sharding.index as mod
assert (not root) or mod.__file__.startswith(root), mod.__file__
""" + _RSS + r"""
base = rss_mb()
t0 = time.perf_counter()
mod.merge_index(out)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_mb": peak_mb() - base}))
"""

_PIPE = r"""
import json, sys, time
root, command, index = sys.argv[1], sys.argv[2], sys.argv[3]
if root:
    sys.path.insert(0, root)
import alpro.data.shards as mod
assert (not root) or mod.__file__.startswith(root), mod.__file__
t0 = time.perf_counter()
s = mod.resolve(command, "bench", index)
print(json.dumps({"seconds": time.perf_counter() - t0, "keys": int(sum(len(x) for x in s.shards))}))
"""


def _before_tree() -> Path:
    """The package at BEFORE_COMMIT (``git archive``, nothing added to the repository), ``alpro/sharding`` linked
    to its top-level folder as the installed mapping does, so ``sys.path`` alone selects it."""
    if not (BEFORE_TREE / "alpro" / "data" / "shards.py").is_file():
        BEFORE_TREE.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_COMMIT, "alpro", "sharding", "kernels"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(BEFORE_TREE)], input=archive, check=True)
    for name in ("sharding", "kernels"):
        link = BEFORE_TREE / "alpro" / name
        if not link.exists():
            link.symlink_to(BEFORE_TREE / name, target_is_directory=True)
    return BEFORE_TREE


def _child(code: str, *args: str, timeout: float = 3600) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                         cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- synthetic sets


def _shard_stats(s: int) -> dict:
    """Stats of shard ``s`` as the sharder records them (the fields merge_index reads)."""
    first = s * PER_SHARD
    g = np.random.default_rng(s)
    sizes = (40_000 + g.integers(0, 20_000, PER_SHARD)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return {"file": f"shard-{s:06d}.tar", "idx": f"shard-{s:06d}.idx", "num_samples": PER_SHARD,
            "bytes": int(sizes.sum()) + 1024, "keys": [f"{first + j:010d}" for j in range(PER_SHARD)],
            "media": ["video"] * PER_SHARD, "num_frames": (60 + g.integers(0, 240, PER_SHARD)).tolist(),
            "offsets": offsets.tolist(), "sizes": sizes.tolist(), "rows": list(range(first, first + PER_SHARD)),
            "sha256": [os.urandom(32).hex() for _ in range(PER_SHARD)], "duration": 10.0 * PER_SHARD,
            "rejects": []}


def make_json_set(n: int) -> Path:
    """``n`` samples as per-node partial indexes of PER_PART samples, merged by this checkout's merge_index."""
    from alpro.shard_format import INDEX_NAME
    from alpro.sharding.index import write_part

    out = CACHE / f"json-{n}"
    if (out / INDEX_NAME).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    nodes = n // PER_PART
    per_node = PER_PART // PER_SHARD
    build = {"name": "shard", "options": {"keep_duplicates": False, "codec": "h264"}, "manifest": {"rows": n}}
    t0 = time.perf_counter()
    for r in range(nodes):
        shards = [_shard_stats(r * per_node + k) for k in range(per_node)]
        write_part(out, r, nodes, {"build": build, "rank": r, "num_nodes": nodes, "rows": [0, 0], "inputs": PER_PART,
                                   "shards": shards, "rejects": []})
    print(f"  wrote {nodes} partial indexes of {n:,} samples in {time.perf_counter() - t0:.0f} s", flush=True)
    _child(_MERGE, "", str(out))
    return out


def make_columns_set(n: int) -> Path:
    """``n`` samples as a columnar index only (numpy, shard by shard, in the layout of docs/shard_format.md)."""
    from alpro.shard_format import (
        COLUMNS_DIR,
        COLUMNS_META,
        COLUMNS_TAG,
        COLUMNS_VERSION,
        INDEX_NAME,
        SAMPLE_COLUMNS,
        SHARD_COLUMNS,
    )

    out = CACHE / f"cols-{n}"
    cols_dir = out / COLUMNS_DIR
    if (cols_dir / COLUMNS_META).is_file():
        return out
    cols_dir.mkdir(parents=True, exist_ok=True)
    shards = n // PER_SHARD
    t0 = time.perf_counter()

    def column(spec, shape, dtype=None):
        return np.lib.format.open_memmap(cols_dir / spec[0], mode="w+", dtype=dtype or spec[1], shape=shape)

    names = np.array([f"shard-{s:06d}.tar".encode() for s in range(shards)])
    column(SHARD_COLUMNS["file"], (shards,), names.dtype)[:] = names
    column(SHARD_COLUMNS["idx"], (shards,), names.dtype)[:] = np.char.replace(names, b".tar", b".idx")
    column(SHARD_COLUMNS["start"], (shards + 1,))[:] = np.arange(shards + 1, dtype=np.int64) * PER_SHARD
    media = column(SHARD_COLUMNS["media"], (shards, 3))
    media[:] = 0
    media[:, 0] = PER_SHARD
    cols = {name: column(spec, (n,), "S10" if name == "key" else None) for name, spec in SAMPLE_COLUMNS.items()}
    step = 10_000_000
    for a in range(0, n, step):
        b = min(n, a + step)
        g = np.random.default_rng(a)
        ids = np.arange(a, b, dtype=np.int64)
        cols["key"][a:b] = np.char.zfill(ids.astype("S10"), 10)
        sizes = 40_000 + g.integers(0, 20_000, b - a)
        cols["size"][a:b] = sizes
        per = sizes.reshape(-1, PER_SHARD)
        cols["offset"][a:b] = (np.cumsum(per, axis=1) - per).ravel()
        cols["media"][a:b] = 0
        cols["num_frames"][a:b] = 60 + g.integers(0, 240, b - a)
    for c in cols.values():
        c.flush()
    (out / INDEX_NAME).write_bytes(b"")  # stands for the JSON index (the columns record its size: 0)
    (cols_dir / COLUMNS_META).write_text(json.dumps({"format": COLUMNS_TAG, "version": COLUMNS_VERSION,
                                                     "shards": shards, "samples": n, "index_bytes": 0,
                                                     "name": "shard", "options": {"codec": "h264"}}))
    print(f"  wrote the columns of {n:,} samples in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _json_only(out: Path) -> Path:
    """A directory holding only the set's index.json.zst (symlinked): the JSON path, as a foreign build has it."""
    from alpro.shard_format import INDEX_NAME

    plain = out.with_name(out.name + "-json-only")
    plain.mkdir(exist_ok=True)
    link = plain / INDEX_NAME
    if not link.exists():
        link.symlink_to(out / INDEX_NAME)
    return plain


# ---------------------------------------------------------------------------------------------- measuring


def _row(path, size, before, after, unit, note=""):
    return {"path": path, "size": size, "before": before, "after": after, "unit": unit, "note": note}


def index_rows(sizes: list[str], full: bool) -> list[dict]:
    rows = []
    before_tree = str(_before_tree())
    for label in sizes:
        n = SIZES[label]
        print(f"[{label}] preparing the set", flush=True)
        json_set = make_json_set(n) if n <= 10_000_000 else None
        after_set = json_set or make_columns_set(n)
        print(f"[{label}] measuring after", flush=True)
        after = _child(_RANK, "", str(after_set), str(WORLD), str(BATCH))
        before = json_path = None
        if json_set is not None:
            print(f"[{label}] measuring before", flush=True)
            before = _child(_RANK, before_tree, str(_json_only(json_set)), str(WORLD), str(BATCH))
            json_path = _child(_RANK, "", str(_json_only(json_set)), str(WORLD), str(BATCH))
        note = "" if before else "before: not run (no JSON at this size; issue 12's fit: ~7 min, ~30 GB peak)"
        def b(k: str, got: dict | None = before) -> float | None:
            return round(got[k], 3) if got else None

        rows += [
            _row("rank start-up (resolve + item table + plan + first task)", label, b("startup_s"),
                 round(after["startup_s"], 3), "s", note),
            _row("  of which resolve", label, b("resolve_s"), round(after["resolve_s"], 3), "s"),
            _row("peak RSS above imports, per rank", label, b("peak_mb"), round(after["peak_mb"], 1), "MB"),
            _row("steady RSS above imports, per rank", label, b("steady_mb"), round(after["steady_mb"], 1), "MB"),
            _row("  of which mapped file pages (index pages read)", label, b("steady_file_mb"),
                 round(after["steady_file_mb"], 1), "MB", "page cache: shared with the workers, evictable"),
            _row("fork worker after 64 tasks: private memory (Private_Dirty)", label, b("worker_dirty_mb"),
                 round(after["worker_dirty_mb"], 1), "MB"),
            _row("fork worker after 64 tasks: file pages only it maps (Private_Clean)", label,
                 b("worker_clean_mb"), round(after["worker_clean_mb"], 1), "MB",
                 "page cache of the sample rows it read: shared, evictable"),
            _row("forkserver payload (pickled shard set + items)", label, b("payload_mb"),
                 round(after["payload_mb"], 3), "MB"),
        ]
        if json_path is not None:
            rows.append(_row("rank start-up, JSON index only (no index.cols)", label, b("startup_s"),
                             round(json_path["startup_s"], 3), "s", "after = this checkout on a foreign/JSON-only set"))
            rows.append(_row("peak RSS above imports, JSON index only", label, b("peak_mb"),
                             round(json_path["peak_mb"], 1), "MB"))
        if json_set is not None:
            print(f"[{label}] merge-index", flush=True)
            merged_after = _child(_MERGE, "", str(json_set))
            merged_before = None
            if n <= 1_000_000 or full:
                merged_before = _child(_MERGE, before_tree, str(json_set))
                _child(_MERGE, "", str(json_set))  # the columns again (the old merge wrote the same JSON bytes)
            def mb(k: str, got: dict | None = merged_before) -> float | None:
                return round(got[k], 2) if got else None

            skip = "" if merged_before else "before: only with --full (issue 16.4: 4.6 GiB at 10M)"
            rows += [_row("merge-index", label, mb("seconds"), round(merged_after["seconds"], 2), "s", skip),
                     _row("merge-index peak RSS above imports", label, mb("peak_mb"),
                          round(merged_after["peak_mb"], 1), "MB", skip)]
            shards = n // PER_SHARD
            command = f"pipe:cat {json_set}/shard-{{000000..{shards - 1:06d}}}.tar"
            from alpro.shard_format import INDEX_NAME

            index = str(json_set / INDEX_NAME)
            pipe_before = _child(_PIPE, before_tree, command, index)
            pipe_after = _child(_PIPE, "", command, index)
            rows.append(_row("pipe: name lookup (one command per shard)", label, round(pipe_before["seconds"], 3),
                             round(pipe_after["seconds"], 3), "s"))
    return rows


def section_rows(quick: bool) -> list[dict]:
    rows = []
    for path in sorted((ROOT / "benchmarks").glob("scale_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            got = module.run(quick)
        except Exception as e:  # noqa: BLE001 -- one failing section must not hide the others
            rows.append(_row(f"{path.stem}: failed", "", None, None, "", f"{type(e).__name__}: {e}"[:300]))
            continue
        rows += [{**_row("", "", None, None, ""), **r, "section": path.stem} for r in got]
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict]) -> str:
    lines = ["| path | size | before | after | unit | ratio | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r.get("before"), r.get("after")
        ratio = f"{b / a:.3g}x" if isinstance(b, (int, float)) and isinstance(a, (int, float)) and a > 0 else ""
        lines.append(f"| {r['path']} | {r['size']} | {_fmt(b)} | {_fmt(a)} | {r['unit']} | {ratio} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines)


def _merged(rows: list[dict]) -> list[dict]:
    """This run's rows over those already in results/scale.json (a run of one size keeps the other sizes'),
    ordered by section, then size, then the order rows are written in."""
    key = lambda r: (r.get("section", ""), r["path"], r["size"])  # noqa: E731
    try:
        old = json.loads((RESULTS / "scale.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        old = []
    fresh = {key(r) for r in rows}
    out = [r for r in old if key(r) not in fresh] + rows
    sizes = list(SIZES)
    rank = {id(r): i for i, r in enumerate(out)}
    return sorted(out, key=lambda r: (r.get("section", ""), sizes.index(r["size"]) if r["size"] in sizes else 99,
                                      rank[id(r)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M samples only; sections in quick mode")
    ap.add_argument("--full", action="store_true", help="also 100M samples (columns only) and the 10M merge before")
    ap.add_argument("--sizes", default=None, help="comma-separated sizes to run, of " + ", ".join(SIZES))
    ap.add_argument("--only-index", action="store_true", help="skip the benchmarks/scale_*.py sections")
    ap.add_argument("--only-sections", action="store_true", help="only the benchmarks/scale_*.py sections")
    args = ap.parse_args()
    sizes = ["1M"] if args.quick else ["1M", "10M"] + (["100M"] if args.full else [])
    if args.sizes:
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    CACHE.mkdir(parents=True, exist_ok=True)
    rows = [] if args.only_sections else index_rows(sizes, args.full)
    if not args.only_index:
        rows += section_rows(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = _merged(rows)
    text = table(rows)
    print(text)
    info = machine_info(numpy=np.__version__)
    (RESULTS / "scale.json").write_text(json.dumps({"machine": info, "argv": sys.argv[1:], "rows": rows},
                                                   indent=1) + "\n")
    (RESULTS / "scale.md").write_text(f"# bench_scale.py {' '.join(sys.argv[1:])}\n\n{info}\n\n{text}\n")


if __name__ == "__main__":
    main()
