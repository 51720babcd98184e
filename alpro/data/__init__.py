"""The streaming loader: tar shards in, :class:`Batch` out (see ``docs/loader.md``).

    tok = build_tokenizer(tokenizer_dir=None, train_texts=corpus_texts(cfg, "pretrain"), save_dir=run / "tokenizer")
    loader = build_train_loader(cfg, "pretrain", tok, rank, world_size, seed)
    for batch in loader: ...
    state = loader.state_dict(); loader.load_state_dict(state)
"""

from alpro.data.batch import CLIP_MEAN, CLIP_STD, Batch
from alpro.data.config import DataConfig, PemConfig, RandAugmentConfig, SplitConfig
from alpro.data.loader import Loader, build_answer_vocab, build_eval_loader, build_train_loader, corpus_texts
from alpro.data.text import IMAGE_PROMPT_TEMPLATES, VIDEO_PROMPT_TEMPLATES, build_tokenizer

__all__ = [
    "Batch",
    "CLIP_MEAN",
    "CLIP_STD",
    "DataConfig",
    "SplitConfig",
    "RandAugmentConfig",
    "PemConfig",
    "Loader",
    "build_train_loader",
    "build_eval_loader",
    "build_answer_vocab",
    "build_tokenizer",
    "corpus_texts",
    "VIDEO_PROMPT_TEMPLATES",
    "IMAGE_PROMPT_TEMPLATES",
]
