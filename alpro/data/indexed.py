"""The indexed back-end: plan in the main process, build batches in workers (PyAV decoding).

The main process turns the loader position into a stream of :class:`~alpro.data.plan.Task` (which items, which
epoch, which replacements); a ``torch.utils.data.DataLoader`` with a map-style dataset hands each task to a
worker and returns the batches in task order, whatever the number of workers. Workers are stateless: the
position is (per-source epoch and batch), updated as batches are *delivered*, so prefetched batches never
leak into a checkpoint. :class:`alpro.data.dali.DaliIndexedSource` is the same back-end with DALI decoding.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from alpro.data.batch import Batch
from alpro.data.config import DataConfig
from alpro.data.plan import Cursor, EvalPlan, Task, TrainPlan, cursors_from_state, cursors_state
from alpro.data.protocol import Mix
from alpro.data.samples import BatchBuilder, BatchStats, ItemLoader
from alpro.data.shards import resolve
from alpro.data.sources import LEFT_OUT, item_table, task_sources
from alpro.errors import AlproError

LOG = logging.getLogger("alpro.data")


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
    """The DataLoader's sampler: yields the tasks the source set up for the current pass."""

    def __init__(self):
        self.tasks: Iterator[Task] = iter(())

    def __iter__(self) -> Iterator[Task]:
        return self.tasks


def _identity(x):
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decode parallelism comes from workers; avoid oversubscribing cores


class IndexedSource:
    """Seekable shard sets of one task and split, in the loader's global plan, decoded by PyAV in workers."""

    mode = "indexed"
    resume_hints: dict[str, str] = {}
    elastic = True
    """A state saved with another world size resumes from the same global position (see ``restore``)."""
    renderer = None
    """What finishes a ``prepared`` task in the main process (:class:`alpro.data.dali.DaliRenderer`); None: the
    workers build whole batches."""

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
        self.left_out: Counter = Counter()
        for kind, table, left_out in zip(self.kinds, self.tables, dropped):
            if left_out:
                why = ", ".join(f"{n} {LEFT_OUT.get(r, r)}" for r, n in sorted(left_out.items()))
                LOG.warning(f"data.{split}.{kind}: {sum(left_out.values())} samples are left out ({why})")
                self.left_out.update(left_out)
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
        self._sampler = _TaskStream()
        self._dataloader: DataLoader | None = None
        self._sources = [Cursor() for _ in self.kinds]  # per source: where its next global batch starts

    def _prepare_only(self) -> tuple[bool, ...]:
        return tuple(self.renderer is not None and k == "video" for k in self.kinds)

    # -- sizes and position

    def __len__(self) -> int:
        """Batches per pass: per-source batches per epoch summed over sources (the original's count), or the
        number of evaluation batches."""
        if not self.train:
            return self.eval_plan.num_batches
        return sum(p.batches_per_epoch for p in self.plans)

    def position(self) -> dict:
        if not self.train:
            return {"sources": [[c.epoch, c.batch] for c in self._sources]}
        return cursors_state(self._sources, self.plans)

    def restore(self, position: dict) -> None:
        """Continue from a position, also one saved at another world size (:func:`cursors_from_state`)."""
        if self.train:
            self._sources = cursors_from_state(position, self.plans)
        else:
            self._sources = [Cursor(int(e), int(b)) for e, b in position["sources"]]

    # -- the task stream

    def _advance(self, source: int, pos: list[Cursor]) -> None:
        pos[source] = self.plans[source].advance(pos[source])

    def _tasks(self, step: int, sources: list[list[int]], stop: int | None, mix: Mix) -> Iterator[Task]:
        if not self.train:
            for s in range(step, self.eval_plan.num_batches if stop is None else stop):
                yield self.eval_plan.task(s)
            return
        pos = list(sources)
        for s in itertools.count(step) if stop is None else range(step, stop):
            source = mix(s)
            c = pos[source]
            yield self.plans[source].task(s, c.epoch, c.batch, c.start)
            self._advance(source, pos)

    def plan(self, step: int, stop: int | None, mix: Mix) -> Iterator[dict]:
        for task in self._tasks(step, self._sources, stop, mix):
            prepared, _ = self.builder.prepare_task(task, BatchStats())
            yield {"step": task.step, "type": self.kinds[task.source], "epoch": task.epoch, "batch": task.batch,
                   "items": [p.describe() if p is not None else None for p in prepared]}

    # -- iteration

    def _context(self) -> str | None:
        """The workers' multiprocessing start method (None: the platform's default)."""
        return None

    def _loader(self) -> DataLoader:
        if self._dataloader is None:
            workers = self.cfg.num_workers
            context = self._context() if workers else None
            if context == "forkserver":
                multiprocessing.set_forkserver_preload([type(self).__module__])
            self._dataloader = DataLoader(
                _TaskDataset(self.builder, self._prepare_only()), batch_size=None, sampler=self._sampler,
                num_workers=workers, collate_fn=_identity, worker_init_fn=_worker_init if workers else None,
                prefetch_factor=self.cfg.prefetch_factor if workers else None, persistent_workers=workers > 0,
                multiprocessing_context=context,
                # Its own generator: creating an iterator must not draw from the global torch RNG, or a resumed
                # run (which restores that RNG) would see different dropout / VTM draws than the original run.
                generator=torch.Generator().manual_seed(self.seed),
            )
        return self._dataloader

    def batches(self, step: int, stop: int | None, mix: Mix) -> Iterator[tuple[Batch, BatchStats]]:
        if not self.train:
            self._sources = [Cursor() for _ in self.kinds]
        self._sampler.tasks = self._tasks(step, self._sources, stop, mix)
        for kind, task, payload, fallbacks, stats in self._loader():
            if kind == "error":
                raise AlproError(payload)
            batch = self.renderer.render(task, payload, fallbacks, stats) if kind == "prepared" else payload
            if self.train:
                self._advance(task.source, self._sources)
            yield batch, stats

    def close(self) -> None:
        """Stop persistent workers now (they also stop when the source is garbage collected)."""
        self._dataloader = None
