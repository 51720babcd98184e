"""Issue 16 items 5 and 6, before (the code at commit 2ca20e0, a ``git worktree`` under /tmp) and after (this
checkout): ``map_heads`` over every sample of a 1M-sample set, and retrieval scoring (VTC ranks both ways and
LAVIS's top-k candidates, no model) on random unit features.

    .venv/bin/python benchmarks/scale_eval.py            # map_heads at 1M ids, scoring at 10k clips x 20k texts
    .venv/bin/python benchmarks/scale_eval.py --quick    # 200k ids, 5k clips x 10k texts (~15 min on 2 cores)

Figures go to ``benchmarks/results/scale_eval.json`` (standalone runs).

``run(quick) -> list[dict]`` (keys path, size, before, after, unit, note) is what ``benchmarks/bench_scale.py``
collects. Each figure is one fresh process (``python -c``) importing the tree measured; memory is the peak RSS
(``VmHWM``, reset once the inputs are built) minus the RSS after the imports and the inputs, in MB.

* map_heads: a set of 1,000-sample shards (json + txt + a 16-byte jpg per sample; every shard file a symlink to
  one real tar, so 1M samples cost 1.3 MB of disk) read through the index; ``fn`` returns the caption. Before:
  ``map_heads`` (every id submitted to the executor up front); after: ``iter_heads`` (the bounded window), as
  ``build_answer_vocab`` / ``corpus_texts`` / ``item_table`` now consume it.
* scoring: ``Nv`` clips, 2 captions each, E = 256. Before: the dense matrices of ``evaluate_retrieval`` (VTC
  ``text @ video.T`` and ``retrieval_metrics``, LAVIS's ``video @ text.T`` and each row's ``topk(k_test=128)``);
  after: ``vtc_topk_ranks`` both ways (chunked, running top-k) and ``metrics_from_ranks``. The VTC metrics of both
  must be equal (checked), so the figures compare like with like.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE_COMMIT = "2ca20e0"
BEFORE_TREE = Path(tempfile.gettempdir()) / "wt-h4"
CACHE = Path(tempfile.gettempdir()) / "alpro-scale-eval"
PER_SHARD = 1000

_RSS = r"""
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
def reset_peak():  # VmHWM from here on: the inputs' own transient peak (resolve, random features) left out
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
def peak_mb():  # VmHWM: ru_maxrss keeps the parent's peak across fork + exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

_HEADS = r"""
import json, sys, time
root, spec, after = sys.argv[1], sys.argv[2], sys.argv[3] == "after"
sys.path.insert(0, root)
import alpro.data.sources as mod
from alpro.data.samples import captions_of, read_meta
from alpro.data.shards import resolve
assert mod.__file__.startswith(root), mod.__file__
""" + _RSS + r"""
shardset = resolve(spec, "bench")
fn = lambda m: captions_of(read_meta(m), m)[0]
base = rss_mb()
reset_peak()
t0 = time.perf_counter()
n = 0
for found in (mod.iter_heads(shardset, fn) if after else mod.map_heads(shardset, fn)):
    n += isinstance(found, str)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": peak_mb() - base, "ok": n,
                  "samples": len(shardset)}))
"""

_SCORE = r"""
import json, sys, time
root, nv, after = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "after"
sys.path.insert(0, root)
import torch
import alpro.models.evaluation as ev
assert ev.__file__.startswith(root), ev.__file__
""" + _RSS + r"""
torch.manual_seed(0)
E, K = 256, 128
video = torch.nn.functional.normalize(torch.randn(nv, E), dim=1)
text = torch.nn.functional.normalize(video.repeat_interleave(2, 0) + 0.9 * torch.randn(2 * nv, E), dim=1)
gt = torch.arange(nv).repeat_interleave(2)
base = rss_mb()
reset_peak()
t0 = time.perf_counter()
if after:
    t_rank, t_sim, t_idx = ev.vtc_topk_ranks(text, video, torch.arange(len(text) + 1), gt, K, topk_key_major=True)
    ptr, texts = ev.positives_csr(gt, nv)
    v_rank, v_sim, v_idx = ev.vtc_topk_ranks(video, text, ptr, texts, K, rank_key_major=True)
    metrics = ev.metrics_from_ranks(t_rank, v_rank)
else:
    metrics = ev.retrieval_metrics(text @ video.t(), gt)
    sims = video @ text.t()
    for m in (sims, sims.t()):
        for row in range(m.shape[0]):
            m[row].topk(K)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": peak_mb() - base, "metrics": metrics}))
"""


def _worktree() -> Path:
    if not (BEFORE_TREE / "alpro").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(BEFORE_TREE), BEFORE_COMMIT],
                       check=True, capture_output=True)
    return BEFORE_TREE


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _head_set(n: int) -> Path:
    """``n`` samples in 1,000-sample shards: one real tar, every shard file a symlink to it, one JSON index."""
    import zstandard

    sys.path.insert(0, str(ROOT))
    from alpro.shard_format import FORMAT_TAG, FORMAT_VERSION, INDEX_NAME

    out = CACHE / f"heads-{n}"
    if (out / INDEX_NAME).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    keys, offsets, sizes = [], [], []
    with open(out / "base.tar", "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(PER_SHARD):
            key = f"s{i:06d}"
            start = tar.offset
            meta = {"id": key, "key": key, "media": "image", "captions": [f"caption {i}"], "codec": "jpeg",
                    "num_frames": 1}
            _member(tar, f"{key}.json", json.dumps(meta).encode())
            _member(tar, f"{key}.txt", f"caption {i}".encode())
            _member(tar, f"{key}.jpg", b"\xff\xd8" + bytes(14))
            keys.append(key)
            offsets.append(start)
            sizes.append(tar.offset - start)
    size = (out / "base.tar").stat().st_size
    entries = []
    for s in range(n // PER_SHARD):
        name = f"shard-{s:06d}.tar"
        if not (out / name).exists():
            os.symlink("base.tar", out / name)
        entries.append({"file": name, "num_samples": PER_SHARD, "keys": [f"{s}-{k}" for k in keys],
                        "media": ["image"] * PER_SHARD, "num_frames": [1] * PER_SHARD, "offsets": offsets,
                        "sizes": sizes, "bytes": size})
    index = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "name": "shard", "options": {}, "shards": entries}
    (out / INDEX_NAME).write_bytes(zstandard.ZstdCompressor().compress(json.dumps(index).encode()))
    return out


def _measure(script: str, root: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script, str(root), *args], capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark process failed ({root}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def run(quick: bool) -> list[dict]:
    before_tree = _worktree()
    rows = []
    n = 200_000 if quick else 1_000_000
    spec = str(_head_set(n))
    b, a = (_measure(_HEADS, tree, spec, which) for tree, which in ((before_tree, "before"), (ROOT, "after")))
    assert a["ok"] == b["ok"] == a["samples"] == n, (a, b)
    rows.append({"path": "map_heads over every sample", "size": f"{_size(n)} ids", "before": round(b["seconds"], 1),
                 "after": round(a["seconds"], 1), "unit": "s",
                 "note": "before: every id submitted up front (map_heads); after: iter_heads, window 2048"})
    rows.append({"path": "map_heads over every sample: peak RSS", "size": f"{_size(n)} ids",
                 "before": round(b["peak_mb"]), "after": round(a["peak_mb"]), "unit": "MB",
                 "note": "above the imports and the resolved set"})
    nv = 5000 if quick else 10_000  # before is O(Nt x Nv) in time and memory: ~11 min at 5k on 2 loaded cores
    b, a = (_measure(_SCORE, tree, str(nv), which) for tree, which in ((before_tree, "before"), (ROOT, "after")))
    assert a["metrics"] == b["metrics"], (a["metrics"], b["metrics"])  # the same VTC numbers
    size = f"{_size(nv)} clips x {_size(2 * nv)} texts"
    rows.append({"path": "retrieval scoring (VTC ranks + top-128), one rank", "size": size,
                 "before": round(b["seconds"], 1), "after": round(a["seconds"], 1), "unit": "s",
                 "note": "random unit features, E=256; equal metrics checked"})
    rows.append({"path": "retrieval scoring: peak RSS", "size": size, "before": round(b["peak_mb"]),
                 "after": round(a["peak_mb"]), "unit": "MB",
                 "note": "before: dense Nt x Nv matrices; after: 1024 x 16384 blocks + top-k"})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    rows = run(args.quick)
    for row in rows:
        print(json.dumps(row))
    out = ROOT / "benchmarks" / "results" / "scale_eval.json"
    out.write_text(json.dumps({"quick": args.quick, "before_commit": BEFORE_COMMIT, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
