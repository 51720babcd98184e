"""ALPRO models: TimeSformer + BERT, the four pre-training losses, the prompter, retrieval and QA.

    from alpro.models import ModelConfig, build_model
    model = build_model(ModelConfig.preset("debug"), task="pretrain", vocab_size=len(tokenizer))
    out = model(batch)          # {"loss", "loss_vtc", "loss_vtm", "loss_mlm", "loss_pem", "acc_*", ...}

Files, read top to bottom: ``config.py`` (presets) -> ``video_encoder.py`` (TimeSformer) -> ``text_encoder.py``
(BERT split at the fusion layer) -> ``dual_encoder.py`` (encoders, projections, temperature, VTC: the base of the
two models) -> ``alpro.py`` (heads and losses) -> ``prompter.py`` (PEM teacher and prompts) -> ``evaluation.py`` (retrieval and QA maths) -> ``checkpoint.py`` (key maps, safetensors) ->
``entities.py`` (``alpro entities``).
"""

from __future__ import annotations

import dataclasses

from alpro.models.alpro import ALPRO, TASKS, Task, sample_hard_negatives
from alpro.models.checkpoint import (
    LoadReport,
    load_bert_weights,
    load_checkpoint,
    load_vit_weights,
    read_metadata,
    save_safetensors,
)
from alpro.models.config import PRESETS, LossConfig, ModelConfig, TextConfig, VisionConfig
from alpro.models.dual_encoder import DualEncoder
from alpro.models.prompter import IMAGE_TEMPLATES, VIDEO_TEMPLATES, Prompter


def build_model(cfg: ModelConfig, task: Task, vocab_size: int | None = None, num_answers: int | None = None,
                num_entities: int | None = None) -> ALPRO | Prompter:
    """The model for one stage. ``vocab_size`` (the tokenizer's) and ``num_entities`` override the config;
    ``num_answers`` sizes the QA head. ``task="prompter"`` gives a :class:`Prompter`, the others an :class:`ALPRO`
    (siblings on :class:`DualEncoder`). Pre-training with PEM gets a frozen :class:`Prompter` (load it with
    ``model.load_prompter(path)``, then ``model.build_prompts(tokenizer, entities)``)."""
    if vocab_size is not None:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=vocab_size))
    if num_entities is not None:
        cfg = dataclasses.replace(cfg, num_entities=num_entities)
    if task == "prompter":
        return Prompter(cfg)
    prompter = Prompter(cfg) if task == "pretrain" and cfg.loss.pem > 0 else None
    return ALPRO(cfg, task, num_answers=num_answers, prompter=prompter)


__all__ = [
    "ALPRO", "Prompter", "DualEncoder", "ModelConfig", "VisionConfig", "TextConfig", "LossConfig", "PRESETS",
    "TASKS", "Task",
    "build_model", "load_checkpoint", "load_vit_weights", "load_bert_weights", "save_safetensors", "read_metadata",
    "LoadReport", "sample_hard_negatives", "VIDEO_TEMPLATES", "IMAGE_TEMPLATES",
]
