"""The loaders the trainer and evaluators iterate: plan in the main process, build batches in workers.

The main process turns the loader state into a stream of :class:`~alpro.data.plan.Task` (which items, which
epoch, which replacements); a ``torch.utils.data.DataLoader`` with a map-style dataset hands each task to a
worker and returns the batches in task order, whatever the number of workers. Workers are stateless: the
state is (step, per-source epoch and batch), updated as batches are *delivered*, so prefetched batches never
leak into a checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from alpro.data.batch import Batch
from alpro.data.config import DataConfig
from alpro.data.pem import crop_video
from alpro.data.plan import EvalPlan, ItemTable, Task, TrainPlan, choose_source
from alpro.data.samples import BatchBuilder, BatchStats, ItemLoader, captions_of, count_subitems, qa_of, read_meta
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

LOG = logging.getLogger("alpro.data")
TASKS = ("pretrain", "prompter", "retrieval", "qa")
STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------ sources


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
              cfg: DataConfig | None = None) -> list:
    """``fn(members)`` over the small members (json, txt) of samples ``ids`` (default: all, or ``limit`` spread
    evenly over the set), read in parallel threads (I/O bound); where a sample cannot be read or ``fn`` rejects
    it, the :class:`SampleError` itself (its ``reason`` says why). Streaming sets are read front to back up to
    ``limit`` samples. ``cfg`` supplies the size caps and ``pipe:`` retries (defaults when None)."""
    cfg = cfg or DataConfig()
    if shardset.streaming:
        out: list = []
        try:
            for shard in shardset.shards:
                for _, members in stream_samples(shard.url, out.append, cfg.limits, cfg.pipe_retries):
                    out.append(_try(fn, members))
                    if limit is not None and len(out) >= limit:
                        return out
        except AlproError as e:  # a failing pipe: command, named with the source it belongs to
            raise AlproError(f"{shardset.name}: {e}") from None
        return out
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

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, ids, chunksize=64))


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
    media = np.concatenate([s.media for s in shardset.shards]) if shardset.shards else np.zeros(0, np.uint8)
    keep = (media == (MEDIA_VIDEO if kind == "video" else MEDIA_IMAGE)) | (media == MEDIA_UNKNOWN)
    ids = np.flatnonzero(keep).astype(np.int64)
    per_caption = task == "retrieval" and train and cfg.retrieval_items == "per_caption" and not cfg.paragraph
    if not (task == "qa" or per_caption):
        return ItemTable(shardset, ids, np.full(len(ids), -1, np.int32)), Counter()
    found = map_heads(shardset, lambda m: count_subitems(task, m), ids, cfg=cfg)
    left_out = Counter(f.reason if not _ok(f) else "missing_text" for f in found if not _ok(f) or not f)
    counts = np.array([f if _ok(f) else (0 if train else 1) for f in found], dtype=np.int64)
    if not train:
        left_out = Counter({"missing_text": left_out["missing_text"]} if left_out["missing_text"] else {})
    sample = np.repeat(ids, counts)
    sub = np.concatenate([np.arange(c, dtype=np.int32) for c in counts] or [np.zeros(0, np.int32)])
    return ItemTable(shardset, sample, sub), left_out


# ------------------------------------------------------------------------------------------------- loader


class _TaskDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by Task: what each DataLoader worker runs."""

    def __init__(self, builder: BatchBuilder, prepare_only: tuple[bool, ...]):
        self.builder, self.prepare_only = builder, prepare_only

    def __getitem__(self, task: Task):
        try:
            if self.prepare_only[task.source]:
                stats = BatchStats()
                prepared, fallbacks = self.builder.prepare_task(task, stats)
                return "prepared", task, prepared, fallbacks, stats
            batch, stats = self.builder.build(task)
            return "batch", task, batch, None, stats
        except AlproError as e:  # handed to the main process, which raises it as one clear line
            return "error", task, str(e), None, None


class _TaskStream:
    """The DataLoader's sampler: yields the tasks the loader set up for the current pass."""

    def __init__(self):
        self.tasks: Iterator[Task] = iter(())

    def __iter__(self) -> Iterator[Task]:
        return self.tasks


def _identity(x):
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode parallelism comes from workers; avoid oversubscribing cores


class Loader:
    """Training or evaluation batches for one task; see :func:`build_train_loader` / :func:`build_eval_loader`."""

    def __init__(self, cfg: DataConfig, task: str, split: str, tokenizer, rank: int, world_size: int, seed: int,
                 answer_vocab: dict[str, int] | None = None):
        self.cfg, self.task, self.split, self.rank, self.world, self.seed = cfg, task, split, rank, world_size, seed
        self.train = split == "train"
        if task == "qa" and answer_vocab is None and self.train:
            raise AlproError("QA training needs answer_vocab (build_answer_vocab on the training shards)")
        sources = task_sources(cfg, task, split)
        self.kinds = [kind for kind, *_ in sources]
        self.weights = [w for *_, w in sources]
        self.shardsets = [resolve(spec, f"data.{split}.{kind}", index, cfg.allow_index_outside)
                          for kind, spec, index, _ in sources]
        if any(s.streaming for s in self.shardsets):
            raise AlproError(f"data.{split}: pipe: sources are streamed; use build_train_loader(...) which routes "
                             "them to the streaming loader")
        tables, dropped = zip(*(item_table(s, k, task, self.train, cfg) for s, k in zip(self.shardsets, self.kinds)))
        self.tables = list(tables)
        self._skips: Counter = Counter()
        for kind, table, left_out in zip(self.kinds, self.tables, dropped):
            if left_out:
                why = ", ".join(f"{n} {_LEFT_OUT.get(r, r)}" for r, n in sorted(left_out.items()))
                LOG.warning(f"data.{split}.{kind}: {sum(left_out.values())} samples are left out ({why})")
                self._skips.update(left_out)
            if len(table) == 0:
                raise AlproError(f"data.{split}.{kind}: no usable samples for task {task}")
        self.items = ItemLoader(cfg, task, split, self.tables, seed, answer_vocab)
        self.builder = BatchBuilder(self.items, tokenizer, self.kinds, rank)
        self.batch_size = cfg.batch_size_for(self.train)
        if self.train:
            self.plans = [TrainPlan(t, self.batch_size, rank, world_size, seed, i, cfg.shuffle_block,
                                    cfg.max_replacements) for i, t in enumerate(self.tables)]
            for kind, plan in zip(self.kinds, self.plans):
                if plan.batches_per_epoch == 0:
                    raise AlproError(f"data.{split}.{kind}: {len(plan.table)} items is less than one global batch "
                                     f"({self.batch_size} x {world_size} ranks)")
        else:
            self.eval_plan = EvalPlan(self.tables[0], self.batch_size, rank, world_size)
        self.renderer = self._dali_renderer()
        prepare_only = tuple(self.renderer is not None and k == "video" for k in self.kinds)
        self._dataset = _TaskDataset(self.builder, prepare_only)
        self._sampler = _TaskStream()
        self._dataloader: DataLoader | None = None
        self._state = {"step": 0, "sources": [[0, 0] for _ in self.kinds]}
        self._window = MetricsWindow()

    # -- decoder selection

    def _dali_renderer(self):
        from alpro.data.dali import choose_decoder

        self.decoder = choose_decoder(self.cfg)
        if "video" not in self.kinds or self.decoder != "dali":
            return None
        from alpro.data.dali import DaliRenderer

        codecs = {str(self.shardsets[0].options.get("codec", ""))} - {""}
        return DaliRenderer(self.cfg, self.builder, codecs)

    # -- sizes and state

    def __len__(self) -> int:
        """Batches per pass: per-source batches per epoch summed over sources (the original's count), or the
        number of evaluation batches."""
        if not self.train:
            return self.eval_plan.num_batches
        return sum(p.batches_per_epoch for p in self.plans)

    def state_dict(self) -> dict:
        """Position of the next batch: small (a few integers), valid for any worker count."""
        return {"version": STATE_VERSION, "mode": "indexed", "task": self.task, "seed": self.seed, "rank": self.rank,
                "world_size": self.world, "batch_size": self.batch_size, "kinds": list(self.kinds),
                "step": self._state["step"], "sources": [list(p) for p in self._state["sources"]]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION or state.get("mode") != "indexed":
            raise AlproError(f"loader state (version {state.get('version')}, mode {state.get('mode')}) is not an "
                             f"indexed-loader state of version {STATE_VERSION}: were the sources changed?")
        mismatched = [k for k in ("task", "seed", "world_size", "batch_size", "kinds")
                      if state.get(k) != (list(self.kinds) if k == "kinds" else getattr(self, _ATTR[k]))]
        if mismatched:
            raise AlproError(f"loader state was saved with different {', '.join(mismatched)}: "
                             f"{ {k: state.get(k) for k in mismatched} }; resume with the same data settings")
        self._state = {"step": int(state["step"]), "sources": [list(map(int, p)) for p in state["sources"]]}

    # -- the task stream

    def _advance(self, source: int, pos: list[list[int]]) -> None:
        epoch, batch = pos[source]
        batch += 1
        if batch >= self.plans[source].batches_per_epoch:
            epoch, batch = epoch + 1, 0
        pos[source] = [epoch, batch]

    def _tasks(self, start: dict, stop: int | None) -> Iterator[Task]:
        if not self.train:
            for step in range(start["step"], self.eval_plan.num_batches):
                yield self.eval_plan.task(step)
            return
        pos = [list(p) for p in start["sources"]]
        for step in itertools.count(start["step"]) if stop is None else range(start["step"], stop):
            source = choose_source(self.seed, step, self.weights)
            epoch, batch = pos[source]
            yield self.plans[source].task(step, epoch, batch)
            self._advance(source, pos)

    def _pass_end(self) -> int | None:
        if not self.train:
            return self.eval_plan.num_batches
        if self.cfg.resampled:
            return None
        length = len(self)
        return (self._state["step"] // length + 1) * length

    def plan(self, steps: int | None = None) -> Iterator[dict]:
        """The remaining sequence of the current pass without decoding pixels: per step, the source, epoch,
        batch and for every item its key, frame indices, augmentation parameters, PEM box and text. Items
        that fail before decoding are replaced exactly as in training; decode failures cannot be foreseen."""
        stop = self._pass_end()
        if steps is not None:
            stop = self._state["step"] + steps if stop is None else min(stop, self._state["step"] + steps)
        for task in self._tasks(self._state, stop):
            prepared, _ = self.builder.prepare_task(task, BatchStats())
            yield {"step": task.step, "type": self.kinds[task.source], "epoch": task.epoch, "batch": task.batch,
                   "items": [p.describe() if p is not None else None for p in prepared]}

    # -- iteration

    def _loader(self) -> DataLoader:
        if self._dataloader is None:
            workers = self.cfg.num_workers
            context = None
            if workers and self.decoder == "dali":
                # Forking a process that runs DALI threads crashes the children: DALI runs start their
                # workers from a clean fork server instead (the dataset is pickled to them once).
                multiprocessing.set_forkserver_preload(["alpro.data.loader"])
                context = "forkserver"
            self._dataloader = DataLoader(
                self._dataset, batch_size=None, sampler=self._sampler, num_workers=workers,
                collate_fn=_identity, worker_init_fn=_worker_init if workers else None,
                prefetch_factor=self.cfg.prefetch_factor if workers else None, persistent_workers=workers > 0,
                multiprocessing_context=context,
                # Its own generator: creating an iterator must not draw from the global torch RNG, or a resumed
                # run (which restores that RNG) would see different dropout / VTM draws than the original run.
                generator=torch.Generator().manual_seed(self.seed),
            )
        return self._dataloader

    def __iter__(self) -> Iterator[Batch]:
        if not self.train:
            self._state["step"] = 0
        self._sampler.tasks = self._tasks(dict(self._state), self._pass_end())
        iterator = iter(self._loader())
        self._window.start_if_idle()
        while True:
            t0 = time.perf_counter()
            try:
                kind, task, payload, fallbacks, stats = next(iterator)
            except StopIteration:
                return
            if kind == "error":
                raise AlproError(payload)
            batch = self.renderer.render(task, payload, fallbacks, stats) if kind == "prepared" else payload
            if batch.pem_box is not None:
                batch.crop_video = crop_video(batch.video, batch.pem_box)
            if self.cfg.pin_memory and torch.cuda.is_available() and batch.video.device.type == "cpu":
                batch = pin_batch(batch)
            self._window.add(stats, time.perf_counter() - t0)
            self._skips.update(stats.skips)
            self._state["step"] = task.step + 1
            if self.train:
                self._advance(task.source, self._state["sources"])
            yield batch

    def metrics(self) -> dict[str, float]:
        """Throughput since the previous call and totals: clips/s, frames decoded per frame delivered, seconds
        the consumer waited for data, decode seconds per clip, skipped samples by reason (cumulative)."""
        out = self._window.report()
        out["skipped"] = float(sum(self._skips.values()))
        out.update({f"skipped/{reason}": float(n) for reason, n in sorted(self._skips.items())})
        return out

    def close(self) -> None:
        """Stop persistent workers now (they also stop when the loader is garbage collected)."""
        self._dataloader = None


_LEFT_OUT = {"missing_text": "without caption/question", "truncated": "cut off by a truncated tar",
             "bad_metadata": "with a malformed KEY.json"}
_ATTR = {"task": "task", "seed": "seed", "world_size": "world", "batch_size": "batch_size"}


def pin_batch(batch: Batch) -> Batch:
    for name in ("video", "crop_video", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        value = getattr(batch, name)
        if value is not None:
            setattr(batch, name, value.pin_memory())
    return batch


class MetricsWindow:
    """Counters between two ``metrics()`` calls."""

    def __init__(self):
        self.stats, self.wait, self.t0 = BatchStats(), 0.0, None

    def start_if_idle(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def add(self, stats: BatchStats, wait: float) -> None:
        self.stats.items += stats.items
        self.stats.decoded_frames += stats.decoded_frames
        self.stats.delivered_frames += stats.delivered_frames
        self.stats.decode_seconds += stats.decode_seconds
        self.wait += wait

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - (self.t0 or now), 1e-9)
        s = self.stats
        out = {"clips_per_s": s.items / elapsed, "wait_s": self.wait,
               "decoded_per_delivered": s.decoded_frames / max(s.delivered_frames, 1),
               "decode_s_per_clip": s.decode_seconds / max(s.items, 1)}
        self.stats, self.wait, self.t0 = BatchStats(), 0.0, now
        return out


# ------------------------------------------------------------------------------------------------ public


def build_train_loader(cfg: DataConfig, task: str, tokenizer, rank: int, world_size: int, seed: int,
                       answer_vocab: dict[str, int] | None = None):
    """The training loader of ``task`` on this rank: deterministic, resumable (state_dict / load_state_dict),
    batches of ``cfg.batch_size`` on every rank, drop-last per epoch. ``pipe:`` sources stream instead; with
    ``data.dali_reader: webdataset`` and DALI decoding, DALI's reader reads the video shards."""
    if _dali_reader_mode(cfg):
        from alpro.data.dali_reader import DaliReaderLoader

        return DaliReaderLoader(cfg, task, "train", tokenizer, rank, world_size, seed, answer_vocab)
    if any(s is not None and str(s).startswith("pipe:") for s in _flat_specs(cfg, task, "train")):
        from alpro.data.stream import StreamLoader

        return StreamLoader(cfg, task, tokenizer, rank, world_size, seed, answer_vocab)
    return Loader(cfg, task, "train", tokenizer, rank, world_size, seed, answer_vocab)


def build_eval_loader(cfg: DataConfig, task: str, tokenizer, rank: int, world_size: int, split: str = "val",
                      answer_vocab: dict[str, int] | None = None, seed: int = 0) -> Loader:
    """Every clip (retrieval, pre-training) or question (QA) of ``split`` exactly once across ranks, in shard
    order, ``uniform`` frames, no augmentation; ``Batch.all_texts`` holds each clip's captions and
    ``Batch.valid`` marks the padding that evens out the last batches."""
    if _dali_reader_mode(cfg):
        from alpro.data.dali_reader import DaliReaderLoader

        return DaliReaderLoader(cfg, task, split, tokenizer, rank, world_size, seed, answer_vocab)
    return Loader(cfg, task, split, tokenizer, rank, world_size, seed, answer_vocab)


def _dali_reader_mode(cfg: DataConfig) -> bool:
    """``data.dali_reader: webdataset`` and DALI decodes (``decoder: dali``, or ``auto`` on a GPU machine)."""
    from alpro.data.dali import choose_decoder

    return cfg.dali_reader == "webdataset" and choose_decoder(cfg) == "dali"


def _flat_specs(cfg: DataConfig, task: str, split: str) -> list[str]:
    out = []
    for _, spec, _, _ in task_sources(cfg, task, split):
        out.extend([spec] if isinstance(spec, str) else list(spec))
    return out


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
    for answers in map_heads(shardset, answers_of, cfg=cfg):
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
        for found in map_heads(shardset, texts_of, limit=limit, cfg=cfg):
            texts.extend(t for t in (found if _ok(found) else []) if t)
    return texts
