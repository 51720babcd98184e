"""A sharding node's cost against the manifest's length (issue 16.3): before (the code at commit 2ca20e0) and now.

    .venv/bin/python benchmarks/scale_sharding.py            # 1M rows before and after, 10M after (~15 min idle)
    .venv/bin/python benchmarks/scale_sharding.py --quick    # 100k rows (~30 s)

Measured (docs/sharding.md has the table): peak RSS above imports 111 -> 4 MB at 100k rows, 1,110 -> 25 MB at 1M,
34 MB at 10M (before not run: ~11 GB).

The case of issue 16.3: a JSONL manifest of N rows (WebVid-like: id, a path under ``videos/NNN/``, a caption,
a split), built with ``--num-nodes 1000``; the node measured is the last one (rank 999: it owns the last
N/1000 rows, so it reads the whole manifest to reach them). The media files do not exist, so every row the
node owns is a ``missing`` reject: what is measured is the manifest, not the transcoding. Each run is a fresh
process (``python -c``) that imports the sharder from the tree measured, then calls ``shard_manifest``:

* ``peak RSS above imports``: ``ru_maxrss`` at the end minus ``VmRSS`` after the imports (MB);
* ``seconds``: the ``shard_manifest`` call.

"Before" runs the sharder of commit 2ca20e0 from a ``git worktree`` (made here under ``/tmp`` when missing):
the whole file read as bytes, str and StringIO, every row kept, items prepared for every row. Its 10M-row
figure is not run (it would need ~24 GB at the 2.4 GiB-per-1M-rows slope of issue 16.3); the row says so.

``run(quick) -> list[dict]`` (keys path, size, before, after, unit, note) is what ``bench_scale.py`` collects.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE_COMMIT = "2ca20e0"
BEFORE_TREE = Path(tempfile.gettempdir()) / "alpro-scale-sharding-2ca20e0"
NODES = 1000

_CHILD = r"""
import json, os, resource, sys, time
root, manifest, out, rank, nodes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if root:
    sys.path.insert(0, root)  # the worktree: its alpro/ (with sharding/ linked in) before the installed one
from alpro.sharding.shard import shard_manifest
import alpro.sharding.shard as mod
assert (not root) or mod.__file__.startswith(root), mod.__file__
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
base = rss_mb()
t0 = time.perf_counter()
s = shard_manifest(manifest, out, num_nodes=nodes, node_rank=rank, progress=False, max_reject_ratio=1.0)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "peak_above_imports_mb": peak - base, "inputs": s.inputs, "rejected": s.rejected}))
"""


def _before_tree() -> Path:
    """A worktree of the code before (2ca20e0), with ``alpro/sharding`` and ``alpro/kernels`` linked to its
    top-level folders (what the installed package's mapping does), so ``sys.path`` alone selects it."""
    if not (BEFORE_TREE / "sharding" / "shard.py").is_file():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(BEFORE_TREE), BEFORE_COMMIT],
                       check=True, capture_output=True)
    for name in ("sharding", "kernels"):
        link = BEFORE_TREE / "alpro" / name
        if not link.exists():
            link.symlink_to(BEFORE_TREE / name, target_is_directory=True)
    return BEFORE_TREE


def write_manifest(path: Path, rows: int) -> Path:
    """``rows`` WebVid-like JSONL rows (~110 bytes each) whose media do not exist."""
    if path.is_file() and path.stat().st_size > 0:
        return path
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(0, rows, 10_000):
            f.write("".join(f'{{"id": "c{j:09d}", "video": "videos/{j % 1000:03d}/c{j:09d}.mp4", '
                            f'"caption": "a person does thing number {j} on a sunny day", "split": "train"}}\n'
                            for j in range(i, min(rows, i + 10_000))))
    tmp.replace(path)
    return path


def measure(tree: Path | None, manifest: Path, work: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=work, prefix="out-"))
    cmd = [sys.executable, "-c", _CHILD, str(tree or ""), str(manifest), str(out), str(NODES - 1), str(NODES)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0:
        raise RuntimeError(f"{'before' if tree else 'after'} run failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    sizes = [100_000] if quick else [1_000_000, 10_000_000]
    before_max = 100_000 if quick else 1_000_000
    tree = _before_tree()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="scale-sharding-") as tmp:
        work = Path(tmp)
        for n in sizes:
            manifest = write_manifest(work / f"m{n}.jsonl", n)
            after = measure(None, manifest, work)
            before = measure(tree, manifest, work) if n <= before_max else None
            assert before is None or (before["inputs"], before["rejected"]) == (after["inputs"], after["rejected"])
            note = f"node {NODES - 1} of {NODES} ({n // NODES} own rows), JSONL manifest"
            skipped = "" if before else "; before not run (~2.4 GB per 1M rows: would not fit)"
            rows.append({"path": "sharding node: manifest (16.3)", "size": f"{n:,} rows", "unit": "MB peak RSS above imports",
                         "before": None if before is None else round(before["peak_above_imports_mb"]),
                         "after": round(after["peak_above_imports_mb"]), "note": note + skipped})
            rows.append({"path": "sharding node: manifest (16.3)", "size": f"{n:,} rows", "unit": "s",
                         "before": None if before is None else round(before["seconds"], 1),
                         "after": round(after["seconds"], 1), "note": note + skipped})
            manifest.unlink()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100k rows only")
    args = p.parse_args()
    rows = run(args.quick)
    width = max(len(r["size"]) for r in rows)
    print("| path | size | unit | before | after | note |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['size'].rjust(width)} | {r['unit']} | {r['before']} | {r['after']} | {r['note']} |")


if __name__ == "__main__":
    main()
