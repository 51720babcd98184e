"""Streaming fallback for sources that cannot seek (``pipe:`` commands): whole shards, front to back.

Each DataLoader worker of each rank draws shards with replacement from a generator seeded by (seed, source,
rank, worker, draw) -- webdataset's ``resampled`` mode, which keeps every worker busy and every rank at the
same number of batches -- streams the drawn shard through a shuffle buffer that is emptied at the end of the
shard, and batches what comes out. Each sample is one item (a random caption or question per draw).

The resume state is, per worker, the draw number and how many samples its buffer had emitted. Restoring
re-reads (without decoding) the current shard up to that point, so the continuation is exact as long as the
number of workers is unchanged; with another worker count the streams are different and a warning says so.
The sample counts come from the shard set's ``index.json.zst`` (``data.<split>.video_index``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from alpro.data.batch import Batch
from alpro.data.config import DataConfig
from alpro.data.plan import ORDER, ItemTable, Task, rng
from alpro.data.protocol import Mix
from alpro.data.samples import BatchBuilder, BatchStats, ItemLoader
from alpro.data.shards import SampleError, ShardSet, resolve, stream_samples
from alpro.data.sources import task_sources
from alpro.errors import AlproError
from alpro.shard_format import INDEX_NAME

LOG = logging.getLogger("alpro.data")


class _ShardStream(IterableDataset):
    """One source's endless batch stream on this rank; each worker yields (payload, worker, draw, emitted)."""

    def __init__(self, builder: BatchBuilder, source: int, shardset: ShardSet, rank: int, world: int, seed: int,
                 batch_size: int, buffer: int, positions: dict[int, list[int]]):
        self.builder, self.source, self.shardset = builder, source, shardset
        self.rank, self.world, self.seed, self.batch_size, self.buffer = rank, world, seed, batch_size, buffer
        self.positions = positions

    def _draw(self, worker: int, workers: int, k: int) -> int:
        g = rng(self.seed, self.source, ORDER, self.rank, worker, workers, k)
        return int(g.integers(len(self.shardset.shards)))

    def _emitted(self, shard: int, worker: int, workers: int, k: int, stats: BatchStats):
        """Samples of draw k in shuffle-buffer order: (global sample id, key, members)."""
        g = rng(self.seed, self.source, ORDER, self.rank, worker, workers, k, 1)
        pool: list = []
        start = int(self.shardset.starts[shard])
        on_error = lambda exn: stats.skips.update([getattr(exn, "reason", "truncated")])  # noqa: E731
        cfg = self.builder.items.cfg
        url = self.shardset.shards[shard].url
        for j, (key, members) in enumerate(stream_samples(url, on_error, cfg.limits, cfg.pipe_retries)):
            pool.append((start + j, key, members))
            if len(pool) >= self.buffer:
                yield pool.pop(int(g.integers(len(pool))))
        while pool:
            yield pool.pop(int(g.integers(len(pool))))

    def __iter__(self):
        try:
            yield from self._batches()
        except AlproError as e:  # a command that keeps failing: handed to the main process as one line
            info = get_worker_info()
            yield "error", str(e), info.id if info else 0, None

    def _batches(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k, skip = self.positions.get(worker, [0, 0])
        items = self.builder.items
        stats, prepared, rendered, count = BatchStats(), [], [], 0
        # Draws in a row that gave no usable sample: commands that print nothing (or only bad samples) would
        # otherwise be drawn forever without a batch. Reaching the limit is all but impossible for a set with
        # any good shard (each draw is uniform over the shards).
        barren, limit = 0, max(16, 2 * len(self.shardset.shards))
        while True:
            shard = self._draw(worker, workers, k)
            epoch = k * self.world * workers + self.rank * workers + worker  # unique per (draw, rank, worker)
            usable = False
            for emitted, (sample, key, members) in enumerate(self._emitted(shard, worker, workers, k, stats), 1):
                if emitted <= skip:
                    usable = True
                    continue  # restoring: replay the buffer without decoding
                try:
                    p = items.prepare_members(key, members, self.source, epoch, sample, -1)
                    rendered.append(self.builder.render_timed(p, stats, self.builder.defer))
                    prepared.append(p)
                    usable = True
                except SampleError as e:
                    stats.skips[e.reason] += 1
                    continue
                if len(prepared) == self.batch_size:
                    task = Task(step=count, source=self.source, epoch=worker, batch=count, items=())
                    batch = self.builder.assemble_rendered(task, prepared, rendered, stats)
                    yield batch, stats, worker, [k, emitted]
                    stats, prepared, rendered, count = BatchStats(), [], [], count + 1
            barren = 0 if usable else barren + 1
            if barren >= limit:
                skipped = ", ".join(f"{n} {r}" for r, n in sorted(stats.skips.items())) or "no tar data at all"
                raise AlproError(f"{barren} shard draws in a row gave no usable sample (last: "
                                 f"{self.shardset.shards[shard].url!r}; skipped: {skipped})")
            k, skip = k + 1, 0


def _identity(x):
    return x


class StreamSource:
    """Training back-end over ``pipe:`` sources (see the module docstring)."""

    mode = "stream"
    resume_hints: dict[str, str] = {}

    def __init__(self, cfg: DataConfig, task: str, tokenizer, rank: int, world_size: int, seed: int,
                 answer_vocab: dict[str, int] | None = None):
        self.cfg, self.task, self.rank, self.world, self.seed = cfg, task, rank, world_size, seed
        sources = task_sources(cfg, task, "train")
        self.kinds = [kind for kind, *_ in sources]
        self.weights = [w for *_, w in sources]
        self.shardsets = [resolve(spec, f"data.train.{kind}", index, cfg.allow_index_outside)
                          for kind, spec, index, _ in sources]
        for kind, shardset in zip(self.kinds, self.shardsets):
            if not shardset.streaming:
                raise AlproError(f"data.train.{kind}: mix of pipe: and seekable sources across video/image")
            if len(shardset) == 0:
                raise AlproError(f"data.train.{kind}: pipe: sources need data.train.{kind}_index (the shard set's "
                                 f"{INDEX_NAME}) to know how many samples they hold")
        tables = [ItemTable.per_sample(s) for s in self.shardsets]
        items = ItemLoader(cfg, task, "train", tables, seed, answer_vocab)
        self.builder = BatchBuilder(items, tokenizer, self.kinds, rank)
        self.batch_size = cfg.batch_size
        self.batches_per_source = [len(s) // (self.batch_size * world_size) for s in self.shardsets]
        if min(self.batches_per_source) == 0:
            raise AlproError("data.train: a pipe: source holds less than one global batch")
        self.left_out: Counter = Counter()
        self._workers = cfg.num_workers
        self._positions: list[dict[int, list[int]]] = [{} for _ in self.kinds]
        self._delivered = [0 for _ in self.kinds]

    def __len__(self) -> int:
        return sum(self.batches_per_source)

    def position(self) -> dict:
        positions = [{str(w): list(p) for w, p in pos.items()} for pos in self._positions]
        return {"workers": self._workers, "positions": positions, "delivered": list(self._delivered)}

    def restore(self, position: dict) -> None:
        positions = [{int(w): list(p) for w, p in pos.items()} for pos in position["positions"]]
        delivered = list(position["delivered"])
        if position["workers"] != self.cfg.num_workers:
            LOG.warning(f"streaming loader resumed with {self.cfg.num_workers} workers instead of "
                        f"{position['workers']}: the sample sequence differs from the uninterrupted run")
            positions, delivered = [{} for _ in self.kinds], [0 for _ in self.kinds]
        self._workers, self._positions, self._delivered = self.cfg.num_workers, positions, delivered

    def _stream(self, source: int) -> Iterator:
        dataset = _ShardStream(self.builder, source, self.shardsets[source], self.rank, self.world, self.seed,
                               self.batch_size, self.cfg.stream_buffer, self._positions[source])
        workers = self.cfg.num_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                            prefetch_factor=self.cfg.prefetch_factor if workers else None,
                            generator=torch.Generator().manual_seed(self.seed))  # keep the global RNG untouched
        return iter(loader)

    def _next(self, source: int, streams: dict, stash: dict):
        """The source's next batch in worker round-robin order, continuing the order of the run that saved the
        state (a fresh DataLoader iterator always starts at worker 0; batches of other workers wait)."""
        expected = self._delivered[source] % max(self.cfg.num_workers, 1)
        while (source, expected) not in stash:
            if source not in streams:
                streams[source] = self._stream(source)
            batch, stats, worker, position = next(streams[source])
            if batch == "error":
                raise AlproError(f"data.train.{self.kinds[source]}: {stats}")
            stash[(source, worker)] = (batch, stats, position)
        return stash.pop((source, expected)) + (expected,)

    def batches(self, step: int, stop: int | None, mix: Mix) -> Iterator[tuple[Batch, BatchStats]]:
        streams: dict[int, Iterator] = {}
        stash: dict = {}
        while stop is None or step < stop:
            source = mix(step)
            batch, stats, position, worker = self._next(source, streams, stash)
            self._delivered[source] += 1
            self._positions[source][worker] = position
            step += 1
            yield batch, stats

    def plan(self, step: int, stop: int | None, mix: Mix):
        raise AlproError("plan() needs seekable shards; pipe: sources are only known by streaming them")

    def close(self) -> None:
        """Nothing held between passes: each pass starts its own workers."""
