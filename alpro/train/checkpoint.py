"""Atomic, bounded, resumable checkpoints on top of DeepSpeed's engine checkpoints.

Layout of a run directory's ``checkpoints/``::

    step-00000200/                     # one complete checkpoint (never partial under this name)
      <DeepSpeed files>                # mp_rank_00_model_states.pt (model, lr scheduler), ZeRO optimizer shards
      trainer_state.json               # step, samples seen, git sha, time (rank 0)
      rank_00000.json ...              # per-rank RNG states (python, numpy, torch) and loader state
      config.yaml                      # the resolved run config
    latest                             # text file: the newest complete tag
    .tmp-step-00000400/                # a save in progress (or killed mid-save): ignored and cleaned up

A save writes everything under ``.tmp-<tag>``, then rank 0 renames it to ``<tag>`` (atomic on one file system)
and rewrites ``latest`` through a temp file + ``os.replace``. A kill at any moment therefore leaves the previous
checkpoint loadable. The last ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alpro.dist import barrier, get_rank
from alpro.errors import AlproError

TAG_RE = re.compile(r"^step-(\d{8})$")


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as JSON-safe data (no pickles in checkpoints we read back)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        )


# ------------------------------------------------------------------------------------------------ discovery


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def find_latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (``latest`` pointer if valid, else the highest step directory)."""
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if TAG_RE.match(tag) and (ckpt_dir / tag / "trainer_state.json").is_file():
            return ckpt_dir / tag
    complete = [p for p in list_checkpoints(ckpt_dir) if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``auto`` -> newest checkpoint of this run (or None to start fresh); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        return find_latest(run_dir / "checkpoints")
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run directory
        found = find_latest(path / "checkpoints")
        if found is None:
            raise AlproError(f"--resume {resume}: run directory has no complete checkpoint")
        return found
    if not (path / "trainer_state.json").is_file():
        raise AlproError(f"--resume {resume}: not a complete checkpoint directory (no trainer_state.json)")
    return path


# ----------------------------------------------------------------------------------------------------- save


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int = 3):
        self.dir = run_dir / "checkpoints"
        self.keep_last = keep_last

    def save(
        self,
        engine,
        step: int,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        config_yaml: str,
    ) -> Path:
        """Collective: every rank must call it. Returns the final checkpoint path."""
        tag = step_tag(step)
        tmp_tag = f".tmp-{tag}"
        rank = get_rank()
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.dir / tmp_tag, ignore_errors=True)
            shutil.rmtree(self.dir / tag, ignore_errors=True)  # re-saving the same step after a resume
        barrier()
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, save_latest=False)
        tmp = self.dir / tmp_tag
        if os.environ.get("ALPRO_FAULT_KILL_IN_SAVE") == str(step):  # tests: die between write and rename
            os.kill(os.getpid(), signal.SIGKILL)
        _write_json(tmp / f"rank_{rank:05d}.json", {"rank": rank, **rank_state})
        barrier()
        if rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            _write_json(tmp / "trainer_state.json", trainer_state)  # written last: marks completeness
            os.replace(tmp, self.dir / tag)
            _atomic_write(self.dir / "latest", tag + "\n")
            self._prune()
        barrier()
        if os.environ.get("ALPRO_FAULT_KILL_AFTER_SAVE") == str(step):  # tests: a kill -9 right after a checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        return self.dir / tag

    def _prune(self) -> None:
        for stale in self.dir.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        complete = list_checkpoints(self.dir)
        if self.keep_last > 0:
            for old in complete[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    path = ckpt / f"rank_{rank:05d}.json"
    if not path.is_file():
        raise AlproError(f"checkpoint {ckpt} has no state for rank {rank} (saved with fewer processes?)")
    return json.loads(path.read_text())


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "trainer_state.json").read_text())


def _write_json(path: Path, data: Any) -> None:
    _atomic_write(path, json.dumps(data))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
