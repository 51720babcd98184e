"""The streaming loader: tar shards in, :class:`Batch` out (see ``docs/loader.md``).

    tok = build_tokenizer(tokenizer_dir=None, train_texts=corpus_texts(cfg, "pretrain"), save_dir=run / "tokenizer")
    loader = build_train_loader(cfg, "pretrain", tok, rank, world_size, seed)
    for batch in loader: ...
    state = loader.state_dict(); loader.load_state_dict(state)

The names below are imported on first use (PEP 562), so that light modules (``alpro.data.shards``,
``alpro.data.meta``, ``alpro.data.config``) can be used, e.g. by ``alpro inspect``, without importing torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Batch": "batch", "CLIP_MEAN": "batch", "CLIP_STD": "batch",
    "DataConfig": "config", "SplitConfig": "config", "RandAugmentConfig": "config", "PemConfig": "config",
    "LimitsConfig": "config",
    "Loader": "loader", "BatchSource": "protocol", "build_train_loader": "factory", "build_eval_loader": "factory",
    "build_answer_vocab": "sources", "corpus_texts": "sources", "TASKS": "config",
    "build_tokenizer": "text", "VIDEO_PROMPT_TEMPLATES": "text", "IMAGE_PROMPT_TEMPLATES": "text",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'alpro.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"alpro.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
