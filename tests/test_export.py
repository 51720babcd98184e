"""One safetensors writer: ``alpro export`` and the trainer's ``final/model.safetensors`` store tied weights once
and the model's config and task, and export never replaces ``final/model.safetensors`` unless ``--out`` names it.

The checkpoint is a real stage-0 DeepSpeed layout (``mp_rank_00_model_states.pt`` holding the module state, as
``torch.save`` writes it: tied tensors share storage) with a run config, checked by the same manifest code."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from alpro.cli import main
from alpro.config import to_dict
from alpro.data import DataConfig
from alpro.models import ModelConfig, build_model, load_checkpoint, read_metadata, save_safetensors
from alpro.models.checkpoint import _aliases, write_safetensors
from alpro.train.checkpoint import write_manifest
from alpro.train.config import RunConfig

CFG = ModelConfig.preset("debug")


def _run_with_checkpoint(root: Path, model: torch.nn.Module, step: int = 7) -> Path:
    ckpt = root / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    data = DataConfig(frame_size=CFG.vision.image_size)
    data.pem.patch_size = CFG.vision.patch_size
    cfg = RunConfig(stage="pretrain", model=CFG, data=data)
    cfg.train.zero_stage = 0
    (ckpt / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_manifest(ckpt)
    return ckpt


def test_the_writer_stores_tied_weights_once(tmp_path):
    torch.manual_seed(0)
    model = build_model(CFG, "pretrain")
    aliases = _aliases(model)
    assert aliases, "the debug model ties its MLM decoder to the word embeddings"
    path = write_safetensors(model.state_dict(), tmp_path / "w.safetensors", {"k": "v"})
    stored = load_file(str(path))
    assert set(stored) == set(model.state_dict()) - aliases
    assert read_metadata(path) == {"k": "v"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_export_writes_what_the_trainer_writes_and_keeps_final(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(CFG, "pretrain")
    run = tmp_path / "run"
    ckpt = _run_with_checkpoint(run, model)
    final = save_safetensors(model, run / "final" / "model.safetensors", {"stage": "pretrain"})
    final_bytes = final.read_bytes()

    assert main(["export", str(run)]) == 0
    out = run / "export" / f"{ckpt.name}.safetensors"
    assert str(out) in capsys.readouterr().out
    assert final.read_bytes() == final_bytes  # the trainer's file is not touched by default

    exported, trained = load_file(str(out)), load_file(str(final))
    assert set(exported) == set(trained)  # tied weights once, as in final/
    for key, value in trained.items():
        assert torch.equal(exported[key], value), key
    meta, final_meta = read_metadata(out), read_metadata(final)
    for key in ("alpro_config", "alpro_task", "stage"):
        assert meta[key] == final_meta[key], key
    assert meta["source"] == str(ckpt)

    torch.manual_seed(1)
    again = build_model(CFG, meta["alpro_task"])  # rebuilt from the file's own metadata: loads strictly
    assert load_checkpoint(again, out, strict=True).source == "alpro"
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)

    # Replacing final/ is possible, but only by naming it.
    assert main(["export", str(ckpt), "--out", str(final)]) == 0
    assert set(load_file(str(final))) == set(trained) and read_metadata(final)["source"] == str(ckpt)
