"""What a user calls: the training and evaluation loaders of a task, each a :class:`Loader` shell over the
back-end the configuration asks for (see ``docs/loader.md``, Structure)::

    loader = build_train_loader(cfg, "pretrain", tok, rank, world_size, seed)
    for batch in loader: ...
    state = loader.state_dict(); loader.load_state_dict(state)
"""

from __future__ import annotations

from alpro.data.config import DataConfig
from alpro.data.loader import Loader
from alpro.data.sources import task_sources


def build_train_loader(cfg: DataConfig, task: str, tokenizer, rank: int, world_size: int, seed: int,
                       answer_vocab: dict[str, int] | None = None) -> Loader:
    """The training loader of ``task`` on this rank: deterministic, resumable (state_dict / load_state_dict),
    batches of ``cfg.batch_size`` on every rank, drop-last per epoch. ``pipe:`` sources stream instead; with
    ``data.dali_reader: webdataset`` and DALI decoding, DALI's reader reads the video shards."""
    if _dali_reader_mode(cfg):
        from alpro.data.dali_reader import DaliReaderSource

        source = DaliReaderSource(cfg, task, "train", tokenizer, rank, world_size, seed, answer_vocab)
    elif any(s is not None and str(s).startswith("pipe:") for s in _flat_specs(cfg, task, "train")):
        from alpro.data.stream import StreamSource

        source = StreamSource(cfg, task, tokenizer, rank, world_size, seed, answer_vocab)
    else:
        source = _indexed(cfg, task, "train", tokenizer, rank, world_size, seed, answer_vocab)
    return Loader(source, cfg, task, "train", rank, world_size, seed)


def build_eval_loader(cfg: DataConfig, task: str, tokenizer, rank: int, world_size: int, split: str = "val",
                      answer_vocab: dict[str, int] | None = None, seed: int = 0) -> Loader:
    """Every clip (retrieval, pre-training) or question (QA) of ``split`` exactly once across ranks, in shard
    order, ``uniform`` frames, no augmentation; ``Batch.all_texts`` holds each clip's captions and
    ``Batch.valid`` marks the padding that evens out the last batches."""
    if _dali_reader_mode(cfg):
        from alpro.data.dali_reader import DaliReaderSource

        source = DaliReaderSource(cfg, task, split, tokenizer, rank, world_size, seed, answer_vocab)
    else:
        source = _indexed(cfg, task, split, tokenizer, rank, world_size, seed, answer_vocab)
    return Loader(source, cfg, task, split, rank, world_size, seed)


def _indexed(cfg: DataConfig, task: str, split: str, tokenizer, rank: int, world_size: int, seed: int,
             answer_vocab: dict[str, int] | None):
    """The plan back-end, decoding with DALI (``decoder: dali``, or ``auto`` on a GPU machine) or PyAV."""
    from alpro.data.dali import DaliIndexedSource, choose_decoder
    from alpro.data.indexed import IndexedSource

    kind = DaliIndexedSource if choose_decoder(cfg) == "dali" else IndexedSource
    return kind(cfg, task, split, tokenizer, rank, world_size, seed, answer_vocab)


def _dali_reader_mode(cfg: DataConfig) -> bool:
    """``data.dali_reader: webdataset`` and DALI decodes (``decoder: dali``, or ``auto`` on a GPU machine)."""
    from alpro.data.dali import choose_decoder

    return cfg.dali_reader == "webdataset" and choose_decoder(cfg) == "dali"


def _flat_specs(cfg: DataConfig, task: str, split: str) -> list[str]:
    out = []
    for _, spec, _, _ in task_sources(cfg, task, split):
        out.extend([spec] if isinstance(spec, str) else list(spec))
    return out
