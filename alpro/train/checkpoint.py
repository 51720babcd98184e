"""Atomic, bounded, resumable checkpoints on top of DeepSpeed's engine checkpoints.

Layout of a run directory's ``checkpoints/``::

    step-00000200/                     # one complete checkpoint (never partial under this name)
      <DeepSpeed files>                # mp_rank_00_model_states.pt (model, lr scheduler), ZeRO optimizer shards
      trainer_state.json               # step, samples seen, git sha, time (rank 0)
      rank_00000.json ...              # per-rank RNG states (python, numpy, torch) and loader state
      config.yaml                      # the resolved run config
      manifest.json                    # size and sha256 of every file above (written last)
    latest                             # text file: the newest complete tag (for people and tools; resume
                                       # takes the highest intact step-* directory)
    .tmp-step-00000400/                # a save in progress (or killed mid-save): ignored and cleaned up
    universal/step-00000200/           # DeepSpeed's universal checkpoint of step-00000200 (made on an elastic
                                       # resume: another world size or ZeRO stage), source.json + manifest.json

A save writes everything under ``.tmp-<tag>``, then rank 0 writes ``manifest.json`` (atomically, last), renames
the directory to ``<tag>`` (atomic on one file system) and rewrites ``latest`` through a temp file +
``os.replace``. A kill at any moment therefore leaves the previous checkpoint loadable; a checkpoint damaged
later (a cut copy, a bad disk) fails its manifest and ``resume auto`` falls back to the newest intact one.

Trust: a checkpoint may come from someone else, and unpickling runs code. Every ``*.pt`` file is therefore read
by torch's weights-only unpickler with an explicit allowlist of the few DeepSpeed classes it stores
(:data:`DEEPSPEED_GLOBALS`), ours and DeepSpeed's loads alike (:func:`restricted_unpickling`), and checked
before DeepSpeed opens it (:func:`check_pickles`). A file that wants any other class is refused, naming both.

Elastic resume: ZeRO-1/2/3 partition the optimizer state by world size, so a checkpoint resumes on another world
size (or ZeRO stage) through DeepSpeed's universal checkpoint: :func:`convert_to_universal` runs
``deepspeed.checkpoint.ds_to_universal`` on rank 0, in-process and under :func:`restricted_unpickling` (its
``torch.load(weights_only=False)`` calls included), into ``universal/.tmp-<tag>``, then renames it; the engine loads
it with ``checkpoint.load_universal`` (:func:`load_engine_checkpoint`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import importlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alpro.dist import barrier, get_rank
from alpro.errors import AlproError
from alpro.fileio import atomic_write

TAG_RE = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
UNIVERSAL = "universal"  # checkpoints/universal/<tag>: the universal conversion of checkpoints/<tag>
UNIVERSAL_SOURCE = "source.json"  # in a conversion: the tag and manifest sha256 of the checkpoint it was made from

# The non-tensor classes DeepSpeed 0.19 pickles into its checkpoints (ZeRO 0-3, fp32 / bf16 / fp16; found with
# torch.serialization.get_unsafe_globals_in_checkpoint on each). All are plain data: an enum, a dataclass and two
# loss-scaler records; rebuilding them runs no user-controlled code.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


class DamagedCheckpoint(AlproError):
    """A checkpoint whose files are missing, cut or altered (its manifest disagrees, or it cannot be parsed)."""


class UnsafeCheckpoint(AlproError):
    """A checkpoint file whose pickle wants a class outside the allowlist: refused, never loaded."""


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


# -------------------------------------------------------------------------------------------- trust: pickles


def allowed_globals() -> list[Any]:
    """The allowlisted DeepSpeed classes themselves (imported: ``safe_globals`` takes objects, not names)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would detect, without its warning
    out = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class cannot be in its files
            continue
    return out


@contextlib.contextmanager
def restricted_unpickling() -> Iterator[None]:
    """Every ``torch.load`` inside -- ours, DeepSpeed's engine, ``zero_to_fp32`` -- uses torch's weights-only
    unpickler with :data:`DEEPSPEED_GLOBALS` allowed. ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` is torch's own switch that
    overrides the explicit ``weights_only=False`` DeepSpeed passes (read by torch at every call)."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _refused_global(message: str) -> str | None:
    m = re.search(r"GLOBAL (\S+) was not an allowed global|Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+) "
                  r"whose module|module (\S+) is blocked", message)
    return next((g for g in m.groups() if g), None) if m else None


def unsafe_error(path: Path, what: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"{path}: refused: its pickle wants {what}, which is not an allowed checkpoint class "
                            "(checkpoints from others may not run code; see 'Trust model' in docs/training.md)")


def check_pickle(path: Path) -> None:
    """Refuse ``path`` unless torch's weights-only unpickler reads it with only the allowlisted classes.

    First a static scan of the pickle's GLOBALs (names the class, executes nothing), then a full restricted load
    (memory-mapped: the tensors are not read) to catch anything the scan cannot see and any damage."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as e:  # not a zip written by torch.save, cut archive, no data.pkl ...
            raise DamagedCheckpoint(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None
    if unsafe:
        raise unsafe_error(path, ", ".join(sorted(unsafe)))
    with restricted_unpickling():
        try:
            torch.load(str(path), map_location="cpu", mmap=True)
        except pickle.UnpicklingError as e:
            raise unsafe_error(path, _refused_global(str(e)) or _first_line(e)) from None
        except Exception as e:
            raise DamagedCheckpoint(f"{path}: not a readable torch checkpoint ({_first_line(e)})") from None


def check_pickles(ckpt: Path) -> None:
    for path in sorted(ckpt.rglob("*.pt")):
        check_pickle(path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip().rstrip(":")


# ------------------------------------------------------------------------------------- integrity: manifests


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _payload(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def write_manifest(ckpt: Path) -> None:
    """Record every file's size and sha256 in ``manifest.json``, written last and atomically: a checkpoint with
    a manifest is complete, and any later change to its files is detected."""
    files = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _payload(ckpt)}
    _write_json(ckpt / MANIFEST, {"version": 1, "files": files})


def verify_checkpoint(ckpt: Path) -> None:
    """Raise :class:`DamagedCheckpoint` (files missing, cut or altered) or :class:`UnsafeCheckpoint`.

    With a manifest: every listed file must exist with its size and sha256. Without one (saved before manifests
    existed, or written by hand): the JSON files must parse and the ``*.pt`` files must load. Both then pass the
    pickle check, since a manifest proves integrity, not trust."""
    if not ckpt.is_dir():
        raise DamagedCheckpoint(f"{ckpt}: no such checkpoint directory")
    manifest = ckpt / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
            entries = [(ckpt / name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedCheckpoint(f"{manifest}: unreadable manifest ({_first_line(e)})") from None
        outside = [name for name in files if Path(name).is_absolute() or ".." in Path(name).parts]
        if outside:  # a manifest names files of its own directory only
            raise DamagedCheckpoint(f"{manifest}: lists {outside[0]!r}, outside the checkpoint directory")
        for path, size, _ in entries:
            if not path.is_file():
                raise DamagedCheckpoint(f"{path}: missing (listed in {MANIFEST})")
            if path.stat().st_size != size:
                raise DamagedCheckpoint(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {size} (cut or altered)")
        for path, _, digest in entries:
            if _sha256(path) != digest:
                raise DamagedCheckpoint(f"{path}: sha256 differs from {MANIFEST} (altered or corrupt)")
    for path in [ckpt / "trainer_state.json", *sorted(ckpt.glob("rank_*.json"))]:
        if not path.is_file():  # (resume requires trainer_state.json: is_complete; export does not)
            continue
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedCheckpoint(f"{path}: not valid JSON ({_first_line(e)})") from None
    check_pickles(ckpt)


# ------------------------------------------------------------------------------------------------ discovery


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories (complete or not), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def is_complete(ckpt: Path) -> bool:
    """Renamed from its temporary name: has a manifest (or, saved before manifests, a trainer state)."""
    return (ckpt / MANIFEST).is_file() or (ckpt / "trainer_state.json").is_file()


def newest_intact(ckpt_dir: Path, warnings: list[str]) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; each damaged newer one is skipped with a
    warning (appended to ``warnings``). None if there is no checkpoint; an error if none is intact."""
    candidates = [p for p in list_checkpoints(ckpt_dir) if is_complete(p)][::-1]
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
        except DamagedCheckpoint as e:
            warnings.append(f"checkpoint {ckpt} is damaged, skipped: {e}")
            continue
        return ckpt
    if candidates:
        raise DamagedCheckpoint(f"{ckpt_dir}: no intact checkpoint ({len(candidates)} damaged: {warnings[-1]})")
    return None


def resolve_resume(resume: str | None, run_dir: Path, warnings: list[str] | None = None) -> Path | None:
    """``auto`` -> newest intact checkpoint of this run (None to start fresh); a run directory -> its newest
    intact checkpoint; a checkpoint path -> that checkpoint, verified (damaged: a one-line error)."""
    warnings = [] if warnings is None else warnings
    if resume is None:
        return None
    if resume == "auto":
        return newest_intact(run_dir / "checkpoints", warnings)
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run directory
        found = newest_intact(path / "checkpoints", warnings)
        if found is None:
            raise AlproError(f"--resume {resume}: run directory has no complete checkpoint")
        return found
    if not path.is_dir():
        raise AlproError(f"--resume {resume}: no such checkpoint directory")
    if not is_complete(path):
        raise AlproError(f"--resume {resume}: not a complete checkpoint directory (no {MANIFEST})")
    try:
        verify_checkpoint(path)
    except DamagedCheckpoint as e:
        raise DamagedCheckpoint(f"--resume {resume}: damaged checkpoint: {e}") from None
    return path


# ----------------------------------------------------------------------------------------------------- save


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int = 3):
        self.dir = run_dir / "checkpoints"
        self.keep_last = keep_last

    def clean_stale(self) -> list[Path]:
        """Remove ``.tmp-step-*`` left by a save that was killed or ran out of space (rank 0, at start)."""
        stale = sorted([*self.dir.glob(".tmp-step-*"), *self.dir.glob(f"{UNIVERSAL}/.tmp-step-*")]) \
            if self.dir.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def save(
        self,
        engine,
        step: int,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        config_yaml: str,
    ) -> Path:
        """Collective: every rank must call it. Returns the final checkpoint path. A full or read-only disk is
        one :class:`AlproError` line naming the directory; the partial save is removed, the previous checkpoint
        stays as it was."""
        tag = step_tag(step)
        tmp_tag = f".tmp-{tag}"
        tmp = self.dir / tmp_tag
        rank = get_rank()
        try:
            if rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(self.dir / tag, ignore_errors=True)  # re-saving the same step after a resume
            barrier()
            engine.save_checkpoint(str(self.dir), tag=tmp_tag, save_latest=False)
            _write_json(tmp / f"rank_{rank:05d}.json", {"rank": rank, **rank_state})
            barrier()
            if rank == 0:
                (tmp / "config.yaml").write_text(config_yaml)
                _write_json(tmp / "trainer_state.json", trainer_state)
                write_manifest(tmp)  # written last: marks completeness and records every file's size and hash
                os.replace(tmp, self.dir / tag)
                atomic_write(self.dir / "latest", tag + "\n")
                self._prune()
        except (OSError, RuntimeError) as e:
            raise self._save_error(e, tmp, _state_bytes(engine)) from None
        barrier()
        return self.dir / tag

    def _save_error(self, e: BaseException, tmp: Path, state_bytes: int) -> AlproError:
        """torch's writer reports a full disk as ``RuntimeError: ... iostream error`` (no errno). So: an ENOSPC /
        EDQUOT / EROFS errno, or else less free space than the largest record of the save (the flat fp32
        optimizer partition, at most every parameter's fp32 bytes), means the disk is the cause."""
        free = shutil.disk_usage(self.dir).free if self.dir.is_dir() else 0
        code = getattr(e, "errno", None)
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space; the previous checkpoint is untouched
        if code == errno.EROFS:
            return AlproError(f"read-only file system: cannot save checkpoint in {self.dir}")
        if code in (errno.ENOSPC, errno.EDQUOT) or free < state_bytes + 2**20:
            return AlproError(f"no space left on device: saving checkpoint {tmp} failed with {free / 2**20:.1f} MiB "
                              f"free ({_first_line(e)}); partial save removed, previous checkpoint kept")
        return AlproError(f"saving checkpoint {tmp} failed: {_first_line(e)}")

    def _prune(self) -> None:
        for stale in self.dir.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        complete = list_checkpoints(self.dir)
        if self.keep_last > 0:
            for old in complete[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        kept = {p.name for p in list_checkpoints(self.dir)}
        for converted in list_checkpoints(self.dir / UNIVERSAL):  # a conversion goes with its checkpoint
            if converted.name not in kept:
                shutil.rmtree(converted, ignore_errors=True)


def _state_bytes(engine) -> int:
    """fp32 bytes of every parameter (ZeRO-3 partitions them: ``ds_numel`` is the full size)."""
    try:
        return sum(int(getattr(p, "ds_numel", p.numel())) * 4 for p in engine.module.parameters())
    except Exception:  # an engine without a module (never in the trainer)
        return 0


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    path = ckpt / f"rank_{rank:05d}.json"
    if not path.is_file():
        raise AlproError(f"checkpoint {ckpt} has no state for rank {rank} (saved with fewer processes?)")
    return json.loads(path.read_text())


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "trainer_state.json").read_text())


def load_engine_checkpoint(engine, ckpt: Path, universal: Path | None = None) -> None:
    """DeepSpeed's ``load_checkpoint`` under :func:`restricted_unpickling`, after :func:`check_pickles`; a refused
    class is one line naming the file.

    With ``universal`` (the conversion of ``ckpt``, :func:`convert_to_universal`; the engine built with
    ``checkpoint.load_universal``) the engine loads that instead: the trained parameters' fp32 master copies and
    Adam moments re-partitioned for this world size, the lr schedule and step counters. DeepSpeed's universal load
    restores only what the optimizer holds, so the rest of the module's state (frozen parameters such as the
    pre-training prompter, and buffers) is then loaded from ``ckpt``'s model-states file."""
    source = universal or ckpt
    check_pickles(source)
    with restricted_unpickling():
        try:
            load_path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
        except pickle.UnpicklingError as e:
            raise unsafe_error(source, _refused_global(str(e)) or _first_line(e)) from None
        if load_path is not None and universal is not None:
            _load_untrained_state(engine, ckpt)
            _repair_zero3_universal_load(engine, universal)
    if load_path is None:
        raise AlproError(f"DeepSpeed could not load checkpoint {source}")


def _load_untrained_state(engine, ckpt: Path) -> None:
    """Frozen parameters and buffers from the model-states file of ``ckpt`` (full tensors at ZeRO 0-2; at ZeRO-3
    the buffers, which it does not partition)."""
    files = sorted(ckpt.glob("*model_states.pt"))
    if not files:
        raise DamagedCheckpoint(f"{ckpt}: no model states file")
    module = torch.load(str(files[0]), map_location="cpu").get("module") or {}
    trained = {name for name, p in engine.module.named_parameters() if p.requires_grad}
    partitioned = {name for name, p in engine.module.named_parameters() if hasattr(p, "ds_id")}  # ZeRO-3
    rest = {k: v for k, v in module.items() if k not in trained and k not in partitioned}
    if rest:
        engine.module.load_state_dict(rest, strict=False)


def _repair_zero3_universal_load(engine, universal: Path) -> None:
    """Two faults of DeepSpeed 0.19.8's ZeRO-3 universal load (``stage3.py``,
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), repaired here; ZeRO-1/2 have neither:

    - it gives every param group the hyperparameters of group 0, so ALPRO's no-decay group (biases, norms,
      temperature) would continue with weight decay: each group gets its own back;
    - it stores one ``step`` tensor object in the state of every sub-group, and AdamW increments it in place once
      per sub-group, so Adam's bias correction would run ahead by the number of sub-groups per step: each state
      gets its own copy."""
    inner = getattr(engine.optimizer, "optimizer", None)
    if getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) is None or inner is None:
        return  # not ZeRO-3
    saved = torch.load(str(universal / "zero" / "optimizer_state.pt"), map_location="cpu")["param_groups"]
    if len(saved) != len(inner.param_groups):
        raise AlproError(f"{universal}: {len(saved)} optimizer param groups, the model has {len(inner.param_groups)}")
    for group, hyper in zip(inner.param_groups, saved):
        group.update({k: v for k, v in hyper.items() if k != "params"})
    seen: set[int] = set()
    for state in inner.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


# ------------------------------------------------------------------------------------------- elastic resume


def saved_topology(ckpt: Path) -> tuple[int, int]:
    """(world size, ZeRO stage) a checkpoint was saved with: its trainer state, else its config.yaml."""
    state = load_trainer_state(ckpt)
    world, stage = state.get("world_size"), state.get("zero_stage")
    if stage is None:  # saved before the trainer recorded it
        import yaml

        try:
            cfg = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
            stage = int((cfg.get("train") or {}).get("zero_stage", 2))
        except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
            stage = 2  # the default stage
    if world is None:
        world = len(list(ckpt.glob("rank_*.json"))) or 1
    return int(world), int(stage)


def elastic_plan(ckpt: Path, world: int, zero_stage: int, mode: str) -> str | None:
    """How ``ckpt`` resumes on ``world`` processes at ``zero_stage`` under ``train.elastic`` ``mode``: None (as
    saved: same world size and stage, or ZeRO-0, whose optimizer state is not partitioned) or a reason to convert
    to a universal checkpoint. A change DeepSpeed cannot make is one :class:`AlproError` line."""
    saved_world, saved_stage = saved_topology(ckpt)
    changed = [f"{what} {a} -> {b}" for what, a, b in (("world size", saved_world, world),
                                                       ("ZeRO stage", saved_stage, zero_stage)) if a != b]
    if (0 in (saved_stage, zero_stage)) and saved_stage != zero_stage:
        raise AlproError(f"checkpoint {ckpt} was saved at ZeRO-{saved_stage}: resume it with --train.zero_stage "
                         f"{saved_stage} (a universal checkpoint converts between ZeRO stages 1-3 only)")
    if saved_stage == 0:  # one optimizer state, in the model-states file: loads on any world size
        return None
    if mode == "universal":
        return "train.elastic is universal" + (f" ({', '.join(changed)})" if changed else "")
    if not changed:
        return None
    if mode == "never":
        raise AlproError(f"checkpoint {ckpt} was saved with {saved_world} processes at ZeRO-{saved_stage}, this run "
                         f"has {world} at ZeRO-{zero_stage} and train.elastic is never (set auto to resume through "
                         "a universal checkpoint)")
    return ", ".join(changed)


def universal_path(ckpt: Path) -> Path:
    return ckpt.parent / UNIVERSAL / ckpt.name


def _source_record(ckpt: Path) -> dict[str, Any]:
    manifest = ckpt / MANIFEST
    return {"tag": ckpt.name, "manifest_sha256": _sha256(manifest) if manifest.is_file() else None}


def convert_to_universal(ckpt: Path) -> tuple[Path, bool]:
    """Rank 0 only (the caller holds the other ranks at a barrier): the universal checkpoint of ``ckpt`` (already
    verified), made by ``deepspeed.checkpoint.ds_to_universal`` unless an intact conversion of this very
    checkpoint exists (same manifest sha256). Returns (path, whether it was converted now).

    The conversion runs in this process (one extract / merge worker: no process pool, so every ``torch.load`` it
    makes stays under :func:`restricted_unpickling`), writes ``universal/.tmp-<tag>``, adds ``source.json`` and a
    manifest, and renames it: a kill midway leaves no half conversion under the final name."""
    out = universal_path(ckpt)
    source = _source_record(ckpt)
    if out.is_dir():
        try:
            verify_checkpoint(out)
            if json.loads((out / UNIVERSAL_SOURCE).read_text()) == source:
                return out, False
        except (AlproError, OSError, ValueError):
            pass
        shutil.rmtree(out, ignore_errors=True)  # stale (another checkpoint under the same tag) or damaged
    tmp = out.parent / f".tmp-{ckpt.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        with restricted_unpickling():
            from alpro.train.runtime import ds_to_universal

            ds_to_universal(ckpt, tmp)
    except pickle.UnpicklingError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise unsafe_error(ckpt, _refused_global(str(e)) or _first_line(e)) from None
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AlproError(f"converting {ckpt} to a universal checkpoint failed: {_first_line(e)}") from None
    finally:
        (tmp.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer to the temp name
    _write_json(tmp / UNIVERSAL_SOURCE, source)
    write_manifest(tmp)
    os.replace(tmp, out)
    return out, True


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data))
