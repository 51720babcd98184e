"""Helpers shared by tests that drive the real CLI (imported as a plain module: tests/ is on sys.path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "faults"


def fault_env(**faults: int | str) -> dict[str, str]:
    """Environment for a trainer subprocess with test-side fault hooks (``tests/faults/sitecustomize.py``, first on
    its PYTHONPATH): ``fault_env(NAN="3:loss_vtc")``, ``KILL_IN_SAVE=4``, ``KILL_AFTER_SAVE=6``."""
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **{f"ALPRO_FAULT_{name}": str(value) for name, value in faults.items()}}


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: int = 600, cwd: Path | None = None):
    """Run the real `alpro` CLI (``python -m alpro ...``) in a subprocess; returns CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "alpro", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd or REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"alpro {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def make_tiny_corpus(out: Path) -> Path:
    """A 48-clip / 24-image shapes-world corpus (seconds to make)."""
    run_cli("synth", str(out), "--num-clips", "48", "--num-images", "24", "--seed", "3", "--quiet")
    return out


def make_tiny_shards(corpus: Path, root: Path) -> dict[str, Path]:
    """train_video / train_image / test_video shard sets of ``corpus`` at 8 fps, short side 40, + entities."""
    out = {}
    for name, split, media in (("train_video", "train", "video"), ("train_image", "train", "image"),
                               ("test_video", "test", "video")):
        out[name] = root / name
        run_cli("shard", str(corpus / "manifest.jsonl"), str(out[name]), "--split", split, "--media", media,
                "--fps", "8", "--short-side", "40", "--no-progress")
    shutil.copyfile(corpus / "entities.txt", root / "entities.txt")
    out["entities"] = root / "entities.txt"
    return out
