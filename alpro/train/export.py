"""Consolidate a (ZeRO-sharded) training checkpoint into one safetensors file: ``alpro export``.

    alpro export runs/pretrain/checkpoints/step-00001000 --out alpro_pretrain.safetensors
    alpro export runs/pretrain            # newest checkpoint -> runs/pretrain/export/step-00001000.safetensors

The file is written by the model's own writer (:func:`alpro.models.checkpoint.write_safetensors`): tied weights
stored once, and the model config and task from the checkpoint's ``config.yaml`` in its metadata, as in
``final/model.safetensors``. Without ``--out`` it goes to ``RUN/export/``, never over ``final/model.safetensors``
(the trainer's file, which a later stage may be reading): replacing that takes ``--out`` naming it.

ZeRO stages 1-3 keep the fp32 master weights partitioned across ranks; DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint`` re-assembles them (frozen parameters and buffers included). ZeRO-0
keeps the full module in ``mp_rank_00_model_states.pt`` (DeepSpeed's helper fails on stage 0: PLATFORM.md).
Either way every file is checked first (manifest, then the pickle allowlist: ``checkpoint.verify_checkpoint``)
and read by torch's weights-only unpickler: a checkpoint from someone else cannot run code here.

A run's ``final/`` directory (written at the end of training) holds everything a later stage, ``alpro eval``
or ``alpro search`` needs: ``model.safetensors``, ``config.yaml``, ``tokenizer/``, and when relevant
``answer_vocab.json`` (QA) and ``entities.txt`` (PEM).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from alpro.errors import AlproError
from alpro.models.checkpoint import write_safetensors
from alpro.train.checkpoint import (
    newest_intact,
    restricted_unpickling,
    verify_checkpoint,
)

LOG = logging.getLogger("alpro")


def consolidated_state_dict(ckpt: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """fp32 state dict of the whole model from a checkpoint directory ``.../checkpoints/step-N``, with every
    parameter in the model's own shape (0-d parameters are 1-element vectors inside the engine: runtime.py).
    ``verify=False`` only for a checkpoint that :func:`verify_checkpoint` has just passed."""
    model_states = sorted(ckpt.glob("*model_states.pt"))
    if not model_states:
        raise AlproError(f"{ckpt}: not a DeepSpeed checkpoint (no *model_states.pt)")
    if verify:
        verify_checkpoint(ckpt)
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text()) if (ckpt / "trainer_state.json").is_file() \
        else {}
    stage = 0
    config = ckpt / "config.yaml"
    if config.is_file():
        try:
            stage = int(yaml.safe_load(config.read_text()).get("train", {}).get("zero_stage", 0))
        except (yaml.YAMLError, AttributeError, TypeError, ValueError) as e:
            raise AlproError(f"{config}: no readable train.zero_stage ({type(e).__name__})") from None
    with restricted_unpickling():  # also covers zero_to_fp32's own torch.load(..., weights_only=False)
        if stage == 0:
            states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
            module = states.get("module") if isinstance(states, dict) else None
            if not isinstance(module, dict):
                raise AlproError(f"{ckpt / 'mp_rank_00_model_states.pt'}: no 'module' state dict in it")
            state = _fp32(module)
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
    for name in trainer_state.get("scalar_params", []):
        if name in state:
            state[name] = state[name].reshape(())
    return state


def _fp32(module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors as fp32, one copy per shared storage, so tied weights stay tied (and are written once)."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for key, v in module.items():
        if not v.is_floating_point():
            out[key] = v
        elif v.numel() == 0:
            out[key] = v.float()
        else:
            out[key] = cast.setdefault(v.data_ptr(), v.float())
    return out


def checkpoint_metadata(ckpt: Path) -> dict[str, str]:
    """``alpro_config`` / ``alpro_task`` / ``stage`` from the checkpoint's ``config.yaml`` (the run's resolved
    config), as the trainer's ``final/model.safetensors`` carries them; nothing when it names no model."""
    from alpro.models.checkpoint import model_metadata
    from alpro.train.config import load_run_config

    path = ckpt / "config.yaml"
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or "model" not in raw:
        return {}
    cfg = load_run_config(path)
    return {**model_metadata(cfg.model, cfg.stage), "stage": cfg.stage}


def export_final(ckpt: Path, final_dir: Path, cfg, task: str, tokenizer, answer_vocab: dict[str, Any] | None,
                 num_entities: int | None = None) -> Path:
    """Write ``final/`` for a finished run (rank 0 only): the consolidated fp32 master weights (not the possibly
    bf16, possibly ZeRO-3-partitioned module copy) loaded into a fresh model, then saved through it so the file
    carries its config and task, stores tied weights once and has the model's own parameter shapes."""
    from alpro.models import build_model, save_safetensors
    from alpro.train.config import dump_config

    final_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg.model, task, vocab_size=len(tokenizer),
                        num_answers=len(answer_vocab) if answer_vocab else None, num_entities=num_entities)
    result = model.load_state_dict(consolidated_state_dict(ckpt), strict=False)
    if result.missing_keys:
        raise AlproError(f"{ckpt}: checkpoint lacks {len(result.missing_keys)} weights, e.g. {result.missing_keys[:3]}")
    save_safetensors(model, final_dir / "model.safetensors", {"stage": cfg.stage})
    (final_dir / "config.yaml").write_text(dump_config(cfg))
    tokenizer.save_pretrained(str(final_dir / "tokenizer"))
    if answer_vocab is not None:
        (final_dir / "answer_vocab.json").write_text(json.dumps(answer_vocab, indent=1))
    if cfg.init.entities is not None and Path(cfg.init.entities).is_file():
        shutil.copyfile(cfg.init.entities, final_dir / "entities.txt")
    return final_dir / "model.safetensors"


@dataclass
class ExportOptions:
    """The options of ``alpro export`` (parsed by :func:`alpro.config.parse_command`; help from these docstrings)."""

    checkpoint: Path
    """a checkpoint directory (checkpoints/step-N) or a run directory"""
    out: Path | None = None
    """output .safetensors (default RUN/export/step-N.safetensors; never final/ unless named here)"""


def main(argv: list[str] | None = None) -> int:
    from alpro.config import parse_command

    args = parse_command(ExportOptions, list(sys.argv[1:] if argv is None else argv), prog="alpro export",
                         description=__doc__.splitlines()[0])
    ckpt = args.checkpoint
    if (ckpt / "checkpoints").is_dir():
        skipped: list[str] = []
        found = newest_intact(ckpt / "checkpoints", skipped)
        for warning in skipped:
            LOG.warning(warning)
        if found is None:
            raise AlproError(f"{ckpt}: no complete checkpoint under checkpoints/")
        run, ckpt = ckpt, found
    else:
        if not ckpt.is_dir():
            raise AlproError(f"{ckpt}: no such checkpoint directory")
        run = ckpt.parent.parent
    out = args.out or run / "export" / f"{ckpt.name}.safetensors"
    state = consolidated_state_dict(ckpt, verify=ckpt is args.checkpoint)
    write_safetensors(state, out, {**checkpoint_metadata(ckpt), "format": "alpro", "source": str(ckpt)})
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out} ({len(state)} tensors, {n / 1e6:.2f}M values) from {ckpt}")
    return 0


if __name__ == "__main__":
    from alpro.cli import guarded

    raise SystemExit(guarded("export", main))
