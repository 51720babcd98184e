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
from collections import OrderedDict
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


FULL_ORDER_MAX = 1 << 20
"""Sources of at most this many items keep the epoch order materialised exactly as it always was (the demo's
sets, the golden losses); larger ones use the block order (:meth:`TrainPlan.items_at`), computed per batch."""


class Arange:
    """``np.arange(n)`` without the array: the sample ids of a table with one item per sample (8 bytes per item
    saved; 800 MB at 100M samples). Indexing returns what indexing the array would."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return np.arange(*i.indices(self.n), dtype=np.int64)
        if isinstance(i, (int, np.integer)):
            if not -self.n <= i < self.n:
                raise IndexError(f"index {i} out of range for {self.n} items")
            return int(i) % self.n
        idx = np.asarray(i, dtype=np.int64)
        if idx.size and (idx.min() < -self.n or idx.max() >= self.n):
            raise IndexError(f"index out of range for {self.n} items")
        return idx % self.n if idx.size else idx

    def __array__(self, dtype=None, copy=None):
        return np.arange(self.n, dtype=dtype or np.int64)


class Full(Arange):
    """``np.full(n, value)`` without the array (the ``sub`` column of a one-item-per-sample table)."""

    def __init__(self, n: int, value: int):
        super().__init__(n)
        self.value = int(value)

    def __getitem__(self, i):
        got = super().__getitem__(i)
        return self.value if isinstance(got, int) else np.full(np.shape(got), self.value, dtype=np.int32)

    def __array__(self, dtype=None, copy=None):
        return np.full(self.n, self.value, dtype=dtype or np.int32)


@dataclass
class ItemTable:
    """The items of one source: item i is (sample[i], sub[i]); sub = caption / question index, -1 = whole sample.

    Items are sorted by sample, so the items of a shard form one contiguous range. A table with one item per
    sample (every sample of the set, pre-training) holds no arrays at all (:class:`Arange`, :class:`Full`)."""

    shardset: ShardSet
    sample: np.ndarray | Arange  # (n,) int64 global sample id
    sub: np.ndarray | Full  # (n,) int32

    def __len__(self) -> int:
        return len(self.sample)

    @classmethod
    def per_sample(cls, shardset: ShardSet) -> ItemTable:
        """Every sample once; above :data:`FULL_ORDER_MAX` samples without arrays (:class:`Arange`, :class:`Full`)."""
        n = len(shardset)
        if n <= FULL_ORDER_MAX:
            return cls(shardset, np.arange(n, dtype=np.int64), np.full(n, -1, dtype=np.int32))
        return cls(shardset, Arange(n), Full(n, -1))

    def shard_ranges(self) -> np.ndarray:
        """(n_shards + 1,) item index where each shard's items start."""
        if isinstance(self.sample, Arange):
            return np.asarray(self.shardset.starts, dtype=np.int64)
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


_BLOCK_CACHE_ITEMS = 1 << 22  # within-block permutations kept per process (32 MB; a rank reads one or two blocks)
_blocks: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()


def _block_permutation(seed: int, source: int, epoch: int, b: int, length: int) -> np.ndarray:
    """The permutation inside block ``b`` of an epoch, from its own generator; the most recent ones are kept
    (up to ``_BLOCK_CACHE_ITEMS`` positions in all), so the plans of one process share them."""
    key = (seed, source, epoch, b, length)
    perm = _blocks.get(key)
    if perm is not None:
        _blocks.move_to_end(key)
        return perm
    perm = rng(seed, source, ORDER, epoch, 2, b).permutation(length).astype(np.int64)
    _blocks[key] = perm
    total = sum(len(p) for p in _blocks.values())
    while total > _BLOCK_CACHE_ITEMS and len(_blocks) > 1:
        total -= len(_blocks.popitem(last=False)[1])
    return perm


@dataclass(frozen=True)
class Cursor:
    """Where a source's next global batch starts: its epoch, the global batch counter inside the epoch and the
    first position of the epoch order it takes. ``start`` is in items, so it survives a change of world size
    (elastic resume); with a constant world it is always ``batch * batch_size * world``."""

    epoch: int = 0
    batch: int = 0
    start: int = 0


class TrainPlan:
    """Epoch orders and per-rank batches of one source for training."""

    def __init__(self, table: ItemTable, batch_size: int, rank: int, world: int, seed: int, source: int,
                 shuffle_block: int, max_replacements: int, full_order_max: int = FULL_ORDER_MAX):
        self.table, self.batch_size, self.rank, self.world = table, batch_size, rank, world
        self.seed, self.source, self.block, self.max_replacements = seed, source, shuffle_block, max_replacements
        self.n = len(table)
        self.global_batch = batch_size * world
        self.batches_per_epoch = self.n // self.global_batch
        self.materialised = self.n <= full_order_max
        self._cached: tuple[int, np.ndarray] | None = None
        self._ranges: np.ndarray | None = None
        self._epoch_shards: tuple[int, np.ndarray, np.ndarray] | None = None

    # -- the order

    def order(self, epoch: int) -> np.ndarray:
        """(n,) item ids in this epoch's global order. Small sources: computed once per epoch and cached (the
        order they always had); large ones: the block order in full (for tests; training never calls this)."""
        if not self.materialised:
            return self.items_at(epoch, np.arange(self.n, dtype=np.int64))
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

    def _block_size(self) -> int:
        return self.block if 0 < self.block < self.n else max(self.n, 1)

    def _shards_of(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's shard permutation and where each permuted shard's items start in the concatenation
        (O(shards), cached for the current epoch)."""
        if self._epoch_shards is None or self._epoch_shards[0] != epoch:
            if self._ranges is None:
                self._ranges = np.asarray(self.table.shard_ranges(), dtype=np.int64)
            shard_order = rng(self.seed, self.source, ORDER, epoch, 1).permutation(len(self._ranges) - 1)
            counts = np.diff(self._ranges)[shard_order]
            self._epoch_shards = (epoch, shard_order, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        return self._epoch_shards[1], self._epoch_shards[2]

    def _block(self, epoch: int, b: int) -> np.ndarray:
        size = self._block_size()
        return _block_permutation(self.seed, self.source, epoch, b, min(size, self.n - b * size))

    def items_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Item ids at ``positions`` (0 <= p < n) of an epoch's order, without materialising the order.

        Small sources read the cached full order. Large ones use the *block order*: shards are permuted by
        the epoch's generator and their items concatenated; the concatenation is cut into blocks of
        ``shuffle_block`` positions and each block is permuted by a generator of its own (seed, source, epoch,
        block). Position p is item ``concat[b * block + perm_b[p - b * block]]``: one block permutation and one
        binary search over the shards per batch, so a rank costs O(shards + block) memory, not O(items)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.materialised:
            return self.order(epoch)[positions]
        shard_order, cum = self._shards_of(epoch)
        size = self._block_size()
        blocks = positions // size
        inner = positions - blocks * size
        concat = np.empty_like(positions)
        for b in np.unique(blocks):
            where = blocks == b
            concat[where] = int(b) * size + self._block(epoch, int(b))[inner[where]]
        k = np.searchsorted(cum, concat, side="right") - 1
        return self._ranges[shard_order[k]] + (concat - cum[k])

    def rank_epoch(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, batch_size) items of this rank in every batch of an epoch at a constant world
        size, vectorised (tests and benchmarks; training asks per batch with :meth:`task`)."""
        first = np.arange(self.batches_per_epoch, dtype=np.int64) * self.global_batch + self.rank * self.batch_size
        positions = first[:, None] + np.arange(self.batch_size, dtype=np.int64)
        return self.items_at(epoch, positions.ravel()).reshape(positions.shape)

    # -- batches

    def task(self, step: int, epoch: int, batch: int, start: int | None = None) -> Task:
        """This rank's part of the global batch that starts at position ``start`` of the epoch order (default
        ``batch * batch_size * world``) and the replacement items that follow it."""
        start = batch * self.global_batch if start is None else start
        first = start + self.rank * self.batch_size
        items = self.items_at(epoch, first + np.arange(self.batch_size))
        after = first + self.batch_size
        fallbacks = self.items_at(epoch, (after + np.arange(self.max_replacements)) % self.n)
        return Task(step, self.source, epoch, batch, tuple(int(i) for i in items), tuple(int(i) for i in fallbacks))

    def fits(self, start: int) -> bool:
        """Whether a whole global batch of this world starts at ``start`` (drop-last: the tail that does not
        fit is left out of the epoch)."""
        return start + self.global_batch <= self.n

    def normalise(self, cursor: Cursor) -> Cursor:
        """The cursor itself, or the next epoch's first batch when no whole global batch fits any more (after a
        resume on more ranks)."""
        return cursor if self.fits(cursor.start) else Cursor(cursor.epoch + 1, 0, 0)

    def advance(self, cursor: Cursor) -> Cursor:
        """The cursor of the next global batch: ``world * batch_size`` positions further, or the next epoch."""
        return self.normalise(Cursor(cursor.epoch, cursor.batch + 1, cursor.start + self.global_batch))


def cursors_state(cursors: list[Cursor], plans: list[TrainPlan]) -> dict:
    """The resume position of training cursors: ``sources`` (per source ``[epoch, batch]``, as always) and,
    only once a resume on another world size made them differ from ``batch * batch_size * world``, ``starts``
    (per source the item offset in its epoch order)."""
    out: dict = {"sources": [[c.epoch, c.batch] for c in cursors]}
    if any(c.start != c.batch * p.global_batch for c, p in zip(cursors, plans)):
        out["starts"] = [c.start for c in cursors]
    return out


def cursors_from_state(state: dict, plans: list[TrainPlan]) -> list[Cursor]:
    """Training cursors from a saved position (:func:`cursors_state` plus the state's ``batch_size`` and
    ``world_size``). Saved at another world size (or per-rank batch size), each source continues at the same
    global item offset of its epoch order: no item of the epoch is lost or repeated; the tail that no longer
    fills a global batch is dropped, as at every epoch end."""
    sources = [(int(e), int(b)) for e, b in state["sources"]]
    if len(sources) != len(plans):
        raise ValueError(f"state has {len(sources)} sources, the loader {len(plans)}")
    saved = [int(state.get("batch_size", p.batch_size)) * int(state.get("world_size", p.world)) for p in plans]
    starts = state.get("starts") or [b * g for (_, b), g in zip(sources, saved)]
    return [p.normalise(Cursor(e, b, int(s))) for p, (e, b), s in zip(plans, sources, starts)]


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
