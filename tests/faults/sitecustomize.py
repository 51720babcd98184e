"""Test-side fault injection for the trainer's subprocesses; nothing of it lives in the training code.

Tests put this folder first on the child's ``PYTHONPATH`` (:func:`cli_helpers.fault_env`), so Python imports
this file at start-up in the trainer, in torchrun's launcher and in every rank. It wraps methods of the training
modules when (and only when) they are imported, driven by environment variables:

- ``ALPRO_FAULT_NAN=STEP:LOSS``: LOSS (and the total) become NaN once, at the first micro-batch of optimizer step
  STEP (1-based), as seen by the trainer's non-finite check (``Trainer._nonfinite``).
- ``ALPRO_FAULT_KILL_IN_SAVE=STEP``: SIGKILL between DeepSpeed's write of checkpoint STEP and the rank state /
  manifest that complete it (the first ``_write_json`` into ``.tmp-step-STEP``), i.e. a kill mid-save.
- ``ALPRO_FAULT_KILL_AFTER_SAVE=STEP``: SIGKILL right after ``CheckpointManager.save`` returned for STEP
  (complete on disk): a deterministic ``kill -9``, unlike racing a fast run from outside.
- ``ALPRO_FAULT_RECORD=DIR``: not a fault, a probe: every micro-batch's sample keys, texts and loss, per rank,
  appended to ``DIR/rank<R>.jsonl`` as ``{"step", "keys", "texts"}`` and ``{"step", "loss"}`` lines (``step``
  1-based, in the order the trainer draws and checks them).

An import hook (not an eager import) keeps processes that never import the trainer (torchrun's launcher, the
sharder) unchanged.
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import signal
import sys

_FIRED: set[str] = set()


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_trainer(module) -> None:
    record = os.environ.get("ALPRO_FAULT_RECORD")
    if record:
        _patch_record(module, record)
    spec = os.environ.get("ALPRO_FAULT_NAN")
    if not spec:
        return
    at, _, name = spec.partition(":")
    original = module.Trainer._nonfinite

    @functools.wraps(original)
    def nonfinite(self, out):
        if spec not in _FIRED and int(at) == self.step + 1 and name in out:
            _FIRED.add(spec)
            nan = out[name] * float("nan")
            out["loss"] = out["loss"] + nan  # in place: the step's own dict, as the engine returned it
            out[name] = nan
        return original(self, out)

    module.Trainer._nonfinite = nonfinite


def _patch_record(module, folder: str) -> None:
    import json

    batches, nonfinite = module.Trainer._batches, module.Trainer._nonfinite

    def append(trainer, row: dict) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{trainer.rank}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")

    @functools.wraps(batches)
    def recording_batches(self):
        for batch in batches(self):
            append(self, {"step": self.step + 1, "keys": list(batch.keys), "texts": list(batch.texts)})
            yield batch

    @functools.wraps(nonfinite)
    def recording_nonfinite(self, out):
        append(self, {"step": self.step + 1, "loss": float(out["loss"].detach())})
        return nonfinite(self, out)

    module.Trainer._batches = recording_batches
    module.Trainer._nonfinite = recording_nonfinite


def _patch_checkpoint(module) -> None:
    in_save = os.environ.get("ALPRO_FAULT_KILL_IN_SAVE")
    after_save = os.environ.get("ALPRO_FAULT_KILL_AFTER_SAVE")
    if in_save:
        write_json, tmp = module._write_json, f".tmp-{module.step_tag(int(in_save))}"

        @functools.wraps(write_json)
        def killing_write_json(path, data):
            if path.parent.name == tmp:
                _kill()
            return write_json(path, data)

        module._write_json = killing_write_json
    if after_save:
        save = module.CheckpointManager.save

        @functools.wraps(save)
        def killing_save(self, engine, step, *args, **kwargs):
            path = save(self, engine, step, *args, **kwargs)
            if str(step) == after_save:
                _kill()
            return path

        module.CheckpointManager.save = killing_save


_PATCHES = {"alpro.train.trainer": _patch_trainer, "alpro.train.checkpoint": _patch_checkpoint}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the normal finders find the module, then patches it after it has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def patched_exec(module, _exec=exec_module):
                    _exec(module)
                    _PATCHES[module.__name__](module)

                spec.loader.exec_module = patched_exec
                return spec
        return None


if any(os.environ.get(k) for k in ("ALPRO_FAULT_NAN", "ALPRO_FAULT_KILL_IN_SAVE", "ALPRO_FAULT_KILL_AFTER_SAVE",
                                   "ALPRO_FAULT_RECORD")):
    sys.meta_path.insert(0, _PatchOnImport())
