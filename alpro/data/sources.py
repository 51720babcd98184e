"""Which shards a task reads and what they hold: the sources of a (task, split), their item tables, and the
corpus-wide reads (answer vocabulary, tokenizer texts). Every back-end starts from :func:`task_sources`."""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from alpro.data.config import DataConfig
from alpro.data.plan import ItemTable
from alpro.data.samples import captions_of, count_subitems, qa_of, read_meta
from alpro.data.shards import (
    MEDIA_IMAGE,
    MEDIA_UNKNOWN,
    MEDIA_VIDEO,
    Reader,
    SampleError,
    ShardSet,
    resolve,
    stream_samples,
)
from alpro.errors import AlproError
from alpro.tasks import TASKS

LOG = logging.getLogger("alpro.data")
HEADS_WORKERS = 8
"""Threads of :func:`iter_heads` (the reads are I/O bound)."""
HEADS_WINDOW = 2048
"""Samples :func:`iter_heads` keeps submitted and not yet yielded (its bounded window of in-flight work)."""
LEFT_OUT = {"missing_text": "without caption/question", "truncated": "cut off by a truncated tar",
            "bad_metadata": "with a malformed KEY.json"}
"""How the warning names the samples :func:`item_table` leaves out, by reason."""


def task_sources(cfg: DataConfig, task: str, split: str) -> list[tuple[str, Any, str | None, float]]:
    """(kind, spec, index, weight) of the sources a task reads in a split."""
    if task not in TASKS:
        raise AlproError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    sc = cfg.split(split)
    if sc.video is None:
        raise AlproError(f"data.{split}.video is not set: the {task} {split} loader needs video shards")
    out = [("video", sc.video, sc.video_index, 1.0 - sc.image_fraction)]
    if sc.image is not None and split == "train" and task in ("pretrain", "prompter"):
        out.append(("image", sc.image, sc.image_index, sc.image_fraction))
    if len(out) == 2 and out[0][3] == 0.0:
        out = out[1:]
    elif len(out) == 2 and out[1][3] == 0.0:
        out = out[:1]
    return out


def map_heads(shardset: ShardSet, fn, ids: np.ndarray | None = None, limit: int | None = None,
              cfg: DataConfig | None = None, window: int = HEADS_WINDOW) -> list:
    """``fn(members)`` over the small members (json, txt) of samples ``ids`` (default: all, or ``limit`` spread
    evenly over the set), as a list in the order of ``ids``: :func:`iter_heads` collected (see there). Callers
    that only aggregate should iterate :func:`iter_heads` instead and keep O(window) memory."""
    return list(iter_heads(shardset, fn, ids, limit, cfg, window))


def iter_heads(shardset: ShardSet, fn, ids: np.ndarray | None = None, limit: int | None = None,
               cfg: DataConfig | None = None, window: int = HEADS_WINDOW) -> Iterator:
    """``fn(members)`` over the small members (json, txt) of samples ``ids`` (default: all, or ``limit`` spread
    evenly over the set), yielded in the order of ``ids``, read in parallel threads (I/O bound); where a sample
    cannot be read or ``fn`` rejects it, the :class:`SampleError` itself (its ``reason`` says why). At most
    ``window`` samples are submitted and not yet yielded at any time (chunks of up to 64 ids per task), so
    memory and queued work stay bounded whatever the set's size. Streaming sets are read front to back up to
    ``limit`` samples. ``cfg`` supplies the size caps and ``pipe:`` retries (defaults when None)."""
    cfg = cfg or DataConfig()
    if window < 1:
        raise ValueError(f"iter_heads: window must be >= 1, got {window}")
    if shardset.streaming:
        yield from _stream_heads(shardset, fn, limit, cfg)
        return
    n = len(shardset)
    if ids is None:
        ids = np.arange(n) if limit is None or limit >= n else np.linspace(0, n - 1, limit).astype(np.int64)
    local = threading.local()

    def one(gid: int):
        if not hasattr(local, "reader"):
            local.reader = Reader(limits=cfg.limits)
        try:
            shard, j = shardset.locate(int(gid))
            return fn(local.reader.head(shard, j))
        except SampleError as e:
            return e

    chunk = max(1, min(64, window // HEADS_WORKERS))
    most = max(1, window // chunk)  # chunks in flight: most * chunk <= window
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=HEADS_WORKERS) as pool:
        try:
            for start in range(0, len(ids), chunk):
                if len(pending) >= most:
                    yield from pending.popleft().result()
                pending.append(pool.submit(lambda part: [one(g) for g in part], ids[start:start + chunk]))
            while pending:
                yield from pending.popleft().result()
        finally:  # a consumer that stops early: drop the queued chunks instead of reading them
            for f in pending:
                f.cancel()


def _stream_heads(shardset: ShardSet, fn, limit: int | None, cfg: DataConfig) -> Iterator:
    """A streaming set front to back; a shard's read errors come in order, before the sample that follows them,
    and count towards ``limit`` (which is checked after each sample)."""
    n, errors = 0, []
    try:
        for shard in shardset.shards:
            for _, members in stream_samples(shard.url, errors.append, cfg.limits, cfg.pipe_retries):
                yield from errors
                n += len(errors) + 1
                errors.clear()
                yield _try(fn, members)
                if limit is not None and n >= limit:
                    return
            yield from errors
            n += len(errors)
            errors.clear()
    except AlproError as e:  # a failing pipe: command, named with the source it belongs to
        raise AlproError(f"{shardset.name}: {e}") from None


def _try(fn, members):
    try:
        return fn(members)
    except SampleError as e:
        return e


def _ok(found) -> bool:
    return not isinstance(found, SampleError)


def item_table(shardset: ShardSet, kind: str, task: str, train: bool, cfg: DataConfig) -> tuple[ItemTable, Counter]:
    """Items of a source and, by reason, the samples left out. Samples of the other media are left out, so one
    mixed shard set can serve as both ``video`` and ``image``. Retrieval training (per caption) and QA read
    each sample's json/txt once to expand it into its captions / questions: a sample with none is left out
    (``missing_text``), one that cannot be read or parsed too in training (``truncated``, ``bad_metadata``,
    ...); evaluation keeps it as one item, which then becomes an invalid slot, so no clip silently vanishes
    from a metric's denominator."""
    ids = shardset.media_ids((MEDIA_VIDEO if kind == "video" else MEDIA_IMAGE, MEDIA_UNKNOWN))  # None: all
    per_caption = task == "retrieval" and train and cfg.retrieval_items == "per_caption" and not cfg.paragraph
    if not (task == "qa" or per_caption):
        if ids is None:  # from the per-shard media counts: no per-sample column read, no array above 1M samples
            return ItemTable.per_sample(shardset), Counter()
        return ItemTable(shardset, ids, np.full(len(ids), -1, np.int32)), Counter()
    ids = np.arange(len(shardset), dtype=np.int64) if ids is None else ids
    left_out: Counter = Counter()
    counts = np.empty(len(ids), dtype=np.int64)
    for i, f in enumerate(iter_heads(shardset, lambda m: count_subitems(task, m), ids, cfg=cfg)):
        if not _ok(f) or not f:
            left_out[f.reason if not _ok(f) else "missing_text"] += 1
        counts[i] = f if _ok(f) else (0 if train else 1)
    if not train:
        left_out = Counter({"missing_text": left_out["missing_text"]} if left_out["missing_text"] else {})
    sample = np.repeat(ids, counts)
    sub = (np.arange(len(sample), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)).astype(np.int32)
    return ItemTable(shardset, sample, sub), left_out


def build_answer_vocab(train_source: str | list[str] | DataConfig, top_k: int = 1500) -> dict[str, int]:
    """QA answer vocabulary: the ``top_k`` most frequent answers of the training shards -> label index
    (most frequent first, ties alphabetical). Accepts a shard spec or a DataConfig (its train.video)."""
    if isinstance(train_source, DataConfig):
        spec, index = train_source.train.video, train_source.train.video_index
    else:
        spec, index = train_source, None
    if spec is None:
        raise AlproError("build_answer_vocab: no training shards given")
    cfg = train_source if isinstance(train_source, DataConfig) else DataConfig()
    shardset = resolve(spec, "qa answers", index, cfg.allow_index_outside)
    answers_of = lambda m: [str(p.get("answer", "")).strip() for p in qa_of(read_meta(m))]  # noqa: E731
    counts: Counter = Counter()
    for answers in iter_heads(shardset, answers_of, cfg=cfg):
        counts.update(a for a in (answers if _ok(answers) else []) if a)
    if not counts:
        raise AlproError(f"build_answer_vocab: no QA answers in {spec}")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    return {answer: i for i, (answer, _) in enumerate(ranked)}


def corpus_texts(cfg: DataConfig, task: str, limit: int | None = 200_000) -> list[str]:
    """Captions, QA questions and answers of the training shards, for training a tokenizer: at most ``limit``
    samples per source, spread evenly over the set (None = all). 200k captions give a stable WordPiece
    vocabulary; reading every sample of a multi-million set would cost minutes of I/O for nothing."""

    def texts_of(members: dict[str, bytes]) -> list[str]:
        meta = read_meta(members)
        qa = [str(p.get(f, "")) for p in qa_of(meta) for f in ("question", "answer")]
        return captions_of(meta, members) + qa

    texts: list[str] = []
    for kind, spec, index, _ in task_sources(cfg, task, "train"):
        shardset = resolve(spec, f"data.train.{kind}", index, cfg.allow_index_outside)
        for found in iter_heads(shardset, texts_of, limit=limit, cfg=cfg):
            texts.extend(t for t in (found if _ok(found) else []) if t)
    return texts
