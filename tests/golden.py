"""Golden loss curve of the debug preset: a 4-step prompter, then 6 steps of pre-training with all four losses
(one process, CPU fp32) on the tiny corpus. ``test_train.py`` compares a fresh run against
``tests/data/golden_debug_losses.json``; regenerate it after an intended change with::

    .venv/bin/python tests/golden.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cli_helpers import REPO, make_tiny_corpus, make_tiny_shards

GOLDEN = REPO / "tests" / "data" / "golden_debug_losses.json"
KEYS = ("train/loss", "train/loss_vtc", "train/loss_vtm", "train/loss_mlm", "train/loss_pem")


def _train(stage: str, run_dir: Path, shards: dict[str, Path], *extra: str) -> None:
    cmd = [sys.executable, "-m", "alpro", "train", "--config", str(REPO / "launch/configs/debug" / f"{stage}.yaml"),
           "--train.run_dir", str(run_dir), "--data.train.video", str(shards["train_video"]),
           "--data.train.image", str(shards["train_image"]), "--data.test.video", str(shards["test_video"]), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=dict(os.environ))
    if proc.returncode != 0:
        raise RuntimeError(f"golden run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def golden_run(shards: dict[str, Path], root: Path) -> dict[int, float]:
    """Returns {step: total loss} of the pre-training run (and leaves its metrics.jsonl under ``root``)."""
    _train("prompter", root / "prompter", shards, "--train.steps", "4")
    _train("pretrain", root / "pretrain", shards, "--train.steps", "6", "--train.log_interval", "1",
           "--init.prompter", str(root / "prompter/final/model.safetensors"),
           "--init.entities", str(shards["entities"]))
    out = {}
    for line in (root / "pretrain/metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            out[row["step"]] = row["train/loss"]
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_tiny_shards(make_tiny_corpus(tmp / "corpus"), tmp / "shards")
        curve = golden_run(shards, tmp / "runs")
        rows = [json.loads(x) for x in (tmp / "runs/pretrain/metrics.jsonl").read_text().splitlines()]
        parts = {k: [r[k] for r in rows if r["kind"] == "train"] for k in KEYS}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({"steps": sorted(curve), "loss": [curve[s] for s in sorted(curve)],
                                  "parts": parts}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {curve}")


if __name__ == "__main__":
    main()
