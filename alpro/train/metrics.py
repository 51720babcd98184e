"""Run-directory logging: ``train.log``, ``metrics.jsonl``, TensorBoard, and the one-line progress report.

Only rank 0 writes (other ranks get a no-op logger unless ``log_all_ranks``). Scalars are namespaced
(``train/loss_vtc``, ``throughput/clips_per_s``, ``val/t2v_r1`` ...) and always go to the append-only
``metrics.jsonl``; TensorBoard is optional and imported lazily. Each checkpoint records how long
``metrics.jsonl`` was when it was saved; a resumed run cuts the file back to that length first
(:func:`truncate_metrics`), so the resumed log is the uninterrupted log's continuation, with no step twice.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from alpro.fileio import atomic_write

LOG = logging.getLogger("alpro")


def setup_logging(run_dir: Path | None, rank: int, log_all_ranks: bool = False) -> None:
    """Console + ``train.log`` handlers. Non-zero ranks log only warnings unless ``log_all_ranks``."""
    root = logging.getLogger("alpro")
    root.handlers.clear()
    root.propagate = False
    level = logging.INFO if (rank == 0 or log_all_ranks) else logging.WARNING
    root.setLevel(level)
    prefix = f"[rank{rank}] " if log_all_ranks else ""
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if run_dir is not None and rank == 0:
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        root.addHandler(file)
    # DeepSpeed is chatty at INFO on every rank.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class MetricLogger:
    """Writes scalar dicts to ``metrics.jsonl`` (always) and TensorBoard (if enabled) on rank 0."""

    def __init__(self, run_dir: Path | None, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled and run_dir is not None
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but keep training alive without it
                LOG.warning("tensorboard is not installed: pip install tensorboard (metrics.jsonl still written)")
            else:
                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, step: int, scalars: dict[str, float], **extra: Any) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **extra}
        row.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), step)

    def tell(self) -> int:
        """Bytes written to ``metrics.jsonl`` so far (0 when this rank does not write it)."""
        if self._jsonl is None:
            return 0
        self._jsonl.flush()
        return self._jsonl.tell()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: Path, trainer_state: dict[str, Any]) -> None:
    """Cut ``metrics.jsonl`` back to what it held when the checkpoint being resumed was saved: rows logged after
    it (steps the resumed run will log again) go. Checkpoints saved before ``metrics_bytes`` was recorded: rows
    past the checkpoint's step go (an evaluation logged right after the final save is kept)."""
    if not path.is_file():
        return
    size = trainer_state.get("metrics_bytes")
    if isinstance(size, int):
        if path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)
        return
    step = int(trainer_state.get("step", 0))
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write(path, "".join(kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl``; should a step appear twice (a log from before :func:`truncate_metrics`),
    the last write wins."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    order: list[tuple[int, str]] = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            key = (row.get("step", 0), row.get("kind", "train"))
            if key not in rows:
                order.append(key)
            rows[key] = row
    return [rows[k] for k in sorted(order, key=lambda k: (k[0], k[1]))]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, scalars: dict[str, float], eta_s: float) -> str:
    """``step 120/1000 | loss 3.21 vtc 1.02 vtm 0.61 mlm 1.20 pem 0.38 | lr 9.6e-05 | gnorm 2.31 | ...``"""
    losses = " ".join(
        f"{k.split('/')[-1].removeprefix('loss_')} {v:.4f}"
        for k, v in scalars.items()
        if k.startswith("train/loss")
    )
    parts = [f"step {step}/{total}", losses]
    if "train/lr" in scalars:
        parts.append(f"lr {scalars['train/lr']:.2e}")
    if "train/grad_norm" in scalars:
        parts.append(f"gnorm {scalars['train/grad_norm']:.3f}")
    if "throughput/clips_per_s" in scalars:
        parts.append(
            f"{scalars['throughput/clips_per_s']:.1f} clips/s ({scalars['throughput/clips_per_s_per_rank']:.1f}/rank)"
        )
    if "throughput/data_wait" in scalars:
        parts.append(f"data {100 * scalars['throughput/data_wait']:.0f}%")
    if "memory/peak_gb" in scalars:
        parts.append(f"mem {scalars['memory/peak_gb']:.2f}GB")
    parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)
