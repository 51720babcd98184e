"""The data order: which items each rank gets at each step, as a pure function of (seed, epoch, step).

An *item* is one training example: a sample (pre-training), a (clip, caption) pair (retrieval) or a
(clip, question) pair (QA). Items of a source are numbered in shard order. For every epoch the global order is
defined by the seed alone (MosaicML-style): shards are shuffled, their items concatenated, and items shuffled
inside blocks of ``shuffle_block`` (so a rank touches few shards at a time). A global batch is ``B * world``
consecutive items of that order; rank r takes the r-th slice of B. The last ``n mod (B * world)`` items of an
epoch are dropped (a different tail each epoch, since the order is reshuffled).

Nothing here depends on the number of DataLoader workers, so the sequence a rank sees is the same with 0, 2 or
8 workers, and a resume needs only (step, per-source epoch and batch). Every random draw of an item (frames,
augmentation, PEM box, caption choice) comes from a generator seeded by (seed, source, epoch, sample, sub-item,
purpose): :func:`item_rng`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from alpro.data.shards import ShardSet

# Purposes of the independent random streams.
ORDER, MIX, FRAMES, AUGMENT, PEM, TEXT, MLM = range(7)


def rng(*keys: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (any sign, any size)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) % (1 << 64) for k in keys]))


def item_rng(seed: int, source: int, epoch: int, sample: int, sub: int, purpose: int) -> np.random.Generator:
    return rng(seed, source, epoch, sample, sub + 1, purpose)


@dataclass
class ItemTable:
    """The items of one source: item i is (sample[i], sub[i]); sub = caption / question index, -1 = whole sample.

    Items are sorted by sample, so the items of a shard form one contiguous range."""

    shardset: ShardSet
    sample: np.ndarray  # (n,) int64 global sample id
    sub: np.ndarray  # (n,) int32

    def __len__(self) -> int:
        return len(self.sample)

    @classmethod
    def per_sample(cls, shardset: ShardSet) -> ItemTable:
        n = len(shardset)
        return cls(shardset, np.arange(n, dtype=np.int64), np.full(n, -1, dtype=np.int32))

    def shard_ranges(self) -> np.ndarray:
        """(n_shards + 1,) item index where each shard's items start."""
        return np.searchsorted(self.sample, self.shardset.starts, side="left")


@dataclass(frozen=True)
class Task:
    """One batch to build: what a DataLoader worker receives."""

    step: int  # loader step (training) or batch index (evaluation)
    source: int  # index of the source (video / image)
    epoch: int
    batch: int  # batch index inside the source's epoch (training) or rank (evaluation)
    items: tuple[int, ...]  # item ids, -1 = padding (evaluation tail)
    fallbacks: tuple[int, ...] = ()  # replacement items for bad samples, in order


class TrainPlan:
    """Epoch orders and per-rank batches of one source for training."""

    def __init__(self, table: ItemTable, batch_size: int, rank: int, world: int, seed: int, source: int,
                 shuffle_block: int, max_replacements: int):
        self.table, self.batch_size, self.rank, self.world = table, batch_size, rank, world
        self.seed, self.source, self.block, self.max_replacements = seed, source, shuffle_block, max_replacements
        self.batches_per_epoch = len(table) // (batch_size * world)
        self._cached: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """(n,) item ids in this epoch's global order (cached for the current epoch)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        g = rng(self.seed, self.source, ORDER, epoch)
        ranges = self.table.shard_ranges()
        shard_order = g.permutation(len(ranges) - 1)
        order = np.concatenate([np.arange(ranges[s], ranges[s + 1]) for s in shard_order] or [np.zeros(0, np.int64)])
        n = len(order)
        if self.block and self.block < n:
            # Shuffle inside consecutive blocks: sort by (block number, random key).
            keys = np.arange(n) // self.block + g.random(n)
            order = order[np.argsort(keys, kind="stable")]
        else:
            order = order[g.permutation(n)]
        self._cached = (epoch, order.astype(np.int64))
        return self._cached[1]

    def task(self, step: int, epoch: int, batch: int) -> Task:
        order = self.order(epoch)
        start = batch * self.batch_size * self.world + self.rank * self.batch_size
        items = order[start : start + self.batch_size]
        after = start + self.batch_size
        fallbacks = order[(after + np.arange(self.max_replacements)) % len(order)]
        return Task(step, self.source, epoch, batch, tuple(int(i) for i in items), tuple(int(i) for i in fallbacks))


class EvalPlan:
    """Every item exactly once, in order: rank r takes a contiguous 1/world of the items; all ranks get the same
    number of full batches, padded with item -1 (``Batch.valid`` False), so collective gathers line up."""

    def __init__(self, table: ItemTable, batch_size: int, rank: int, world: int):
        n = len(table)
        per_rank = math.ceil(n / world)
        self.lo, self.hi = min(rank * per_rank, n), min((rank + 1) * per_rank, n)
        self.batch_size, self.rank = batch_size, rank
        self.num_batches = math.ceil(per_rank / batch_size) if n else 0

    def task(self, step: int) -> Task:
        start = self.lo + step * self.batch_size
        items = [i if i < self.hi else -1 for i in range(start, start + self.batch_size)]
        return Task(step, 0, 0, self.rank, tuple(items))


def choose_source(seed: int, step: int, weights: list[float]) -> int:
    """Which source step ``step`` draws from: a function of (seed, step) only, so every rank agrees without
    communication (the original broadcast rank 0's ``random.choice``)."""
    if len(weights) == 1:
        return 0
    cum = np.cumsum(weights) / np.sum(weights)
    return int(min(np.searchsorted(cum, rng(seed, MIX, step).random(), side="right"), len(weights) - 1))
