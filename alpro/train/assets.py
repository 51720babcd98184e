"""What a stage needs before its first step: tokenizer, answer vocabulary, entity list, initialised model, loader.

Each function is collective-safe: rank 0 creates shared files (a trained tokenizer, the answer vocabulary) in
the run directory, the other ranks wait and read them, so every rank has byte-identical assets.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from alpro.dist import barrier
from alpro.errors import AlproError
from alpro.fileio import atomic_write, read_json

LOG = logging.getLogger("alpro")


def _final_dir_of(weights: Path | None) -> Path | None:
    """``runs/x/final/model.safetensors`` -> ``runs/x/final`` (where the tokenizer etc. were saved)."""
    if weights is None:
        return None
    p = Path(weights)
    return p.parent if p.is_file() else p


def tokenizer_for(cfg, run_dir: Path, rank: int):
    """The run's tokenizer: init.tokenizer, else the one saved next to init.weights / init.prompter, else the
    one this run already saved (resume), else a WordPiece vocabulary trained on the corpus texts by rank 0."""
    from alpro.data import build_tokenizer, corpus_texts

    candidates = [cfg.init.tokenizer]
    for src in (cfg.init.weights, cfg.init.prompter):
        d = _final_dir_of(src)
        if d is not None and (d / "tokenizer").is_dir():
            candidates.append(d / "tokenizer")
    for cand in candidates:
        if cand is not None:
            if not Path(cand).exists():
                raise AlproError(f"init.tokenizer: {cand} does not exist")
            return build_tokenizer(tokenizer_dir=cand)
    save_dir = run_dir / "tokenizer"
    if rank == 0 and not save_dir.is_dir():
        LOG.info("training a WordPiece tokenizer on the corpus texts (no init.tokenizer given)")
        build_tokenizer(train_texts=corpus_texts(cfg.data, cfg.stage), save_dir=save_dir)
    barrier()
    return build_tokenizer(save_dir=save_dir)


def answer_vocab_for(cfg, run_dir: Path, rank: int) -> dict[str, int]:
    """QA answer vocabulary: qa.vocab, else the one saved with this run / init.weights, else the top-k answers
    of the training shards (rank 0 counts and saves; everyone reads the saved file)."""
    from alpro.data import build_answer_vocab

    path = run_dir / "answer_vocab.json"
    if cfg.qa.vocab is not None:
        return _read_vocab(Path(cfg.qa.vocab))
    if rank == 0 and not path.is_file():
        init = _final_dir_of(cfg.init.weights)
        if init is not None and (init / "answer_vocab.json").is_file():
            shutil.copyfile(init / "answer_vocab.json", path)
        else:
            vocab = build_answer_vocab(cfg.data, cfg.qa.top_k)
            atomic_write(path, json.dumps(vocab, indent=1))
            LOG.info(f"answer vocabulary: {len(vocab)} answers (top {cfg.qa.top_k} of the training split)")
    barrier()
    return _read_vocab(path)


def _read_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise AlproError(f"qa.vocab: {path} not found")
    vocab = read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise AlproError(f"{path}: expected a JSON object mapping answer -> integer label")
    return vocab


def build_initialised_model(cfg, task: str, tokenizer, answer_vocab: dict[str, int] | None, rank: int):
    """Build the stage's model and load its initial weights (never a resume: that is the engine's job)."""
    from alpro.corpus.entities import read_entities
    from alpro.models import build_model, load_bert_weights, load_checkpoint, load_vit_weights

    entities = None
    num_entities = None
    if task == "pretrain" and cfg.model.loss.pem > 0:
        if cfg.init.entities is None:
            raise AlproError("pre-training with PEM needs init.entities (alpro entities ... --out unigrams.txt)")
        if not Path(cfg.init.entities).is_file():
            raise AlproError(f"init.entities: {cfg.init.entities} not found")
        entities = read_entities(cfg.init.entities, cfg.model.num_entities)
        num_entities = len(entities)
        if cfg.init.prompter is None:
            raise AlproError("pre-training with PEM needs init.prompter (a trained prompter checkpoint)")
    model = build_model(cfg.model, task, vocab_size=len(tokenizer),
                        num_answers=len(answer_vocab) if answer_vocab else None, num_entities=num_entities)
    reports = []
    if cfg.init.vit is not None:
        reports.append(load_vit_weights(model, cfg.init.vit))
    if cfg.init.bert is not None:
        reports.append(load_bert_weights(model, cfg.init.bert))
    if cfg.init.weights is not None:
        if not Path(cfg.init.weights).exists():
            raise AlproError(f"init.weights: {cfg.init.weights} does not exist")
        reports.append(load_checkpoint(model, cfg.init.weights))
    if entities is not None:
        if not Path(cfg.init.prompter).exists():
            raise AlproError(f"init.prompter: {cfg.init.prompter} does not exist")
        reports.append(model.load_prompter(cfg.init.prompter))
        model.build_prompts(tokenizer, entities)
        LOG.info(f"PEM: {len(entities)} entities, prompts embedded by the frozen prompter")
    for report in reports:
        LOG.info(str(report))
    return model


def train_loader_for(cfg, task: str, tokenizer, answer_vocab, rank: int, world: int):
    from alpro.data import build_train_loader

    return build_train_loader(cfg.data, task, tokenizer, rank, world, cfg.seed, answer_vocab=answer_vocab)


def copy_run_assets(cfg, run_dir: Path) -> None:
    """Keep the run self-contained: the entity list it used next to its outputs."""
    if cfg.init.entities is not None and Path(cfg.init.entities).is_file():
        shutil.copyfile(cfg.init.entities, run_dir / "entities.txt")

