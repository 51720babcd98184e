"""The plan at scale, without pixels: the block order on >= 1M items over 1,024 ranks x 8 workers (every item
of an epoch exactly once, drop-last), the unchanged order of small sources, and elastic resume (4 -> 2 -> 3
ranks) through the same position code the indexed loader uses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alpro.data.plan import (
    FULL_ORDER_MAX,
    ORDER,
    Cursor,
    ItemTable,
    TrainPlan,
    cursors_from_state,
    cursors_state,
    rng,
)
from alpro.data.shards import Shard, ShardSet


def _shardset(counts) -> ShardSet:
    shards = [Shard(url=f"s{i}.tar", keys=np.zeros(c, "S1"), offsets=np.zeros(c, np.int64),
                    sizes=np.zeros(c, np.int64), media=np.zeros(c, np.uint8), num_frames=np.full(c, -1, np.int32))
              for i, c in enumerate(counts)]
    return ShardSet(name="synthetic", shards=shards)


def _plans(table, batch, world, **kw):
    return [TrainPlan(table, batch, r, world, seed=7, source=0, shuffle_block=kw.get("block", 8192),
                      max_replacements=4, full_order_max=kw.get("full_order_max", FULL_ORDER_MAX))
            for r in range(world)]


def test_1024_ranks_8_workers_see_every_item_once_per_epoch():
    counts = np.random.default_rng(0).integers(900, 1100, size=1100)  # uneven shards, ~1.1M items
    table = ItemTable.per_sample(_shardset(counts))
    n, world, batch, workers = len(table), 1024, 1, 8
    assert n > FULL_ORDER_MAX  # the block order, not the materialised one
    plans = _plans(table, batch, world)
    per_epoch = plans[0].batches_per_epoch
    assert per_epoch == n // (batch * world)
    seen_by_epoch = []
    for epoch in (0, 1):
        parts = []
        for plan in plans:
            rows = plan.rank_epoch(epoch)  # (batches, batch) of this rank
            # the DataLoader hands the k-th task of a pass to worker k % workers
            by_worker = [rows[w::workers] for w in range(workers)]
            assert sum(len(p) for p in by_worker) == per_epoch
            parts.extend(p.ravel() for p in by_worker)
        seen = np.concatenate(parts)
        assert len(seen) == per_epoch * batch * world
        assert len(np.unique(seen)) == len(seen)  # nothing twice
        assert seen.min() >= 0 and seen.max() < n
        dropped = n - len(seen)
        assert 0 <= dropped < batch * world  # drop-last: only the tail that does not fill a global batch
        seen_by_epoch.append(seen)
    assert not np.array_equal(seen_by_epoch[0], seen_by_epoch[1])  # reshuffled each epoch
    # what a rank computes per batch (task) is its slice of the global block order
    full = plans[0].order(0)
    assert np.array_equal(np.sort(full), np.arange(n))
    for rank, b in [(0, 0), (1023, 0), (517, per_epoch - 1), (3, per_epoch // 2)]:
        task = plans[rank].task(step=0, epoch=0, batch=b)
        start = b * batch * world + rank * batch
        assert list(task.items) == full[start:start + batch].tolist()
        assert list(task.fallbacks) == full[(start + batch + np.arange(4)) % n].tolist()


def test_block_order_is_local_and_shuffled():
    """Quality of the block order: a global batch draws from few shards (a block spans about block / shard
    size + 1 shards), and inside a block the order is a permutation (no item kept in place more than chance)."""
    table = ItemTable.per_sample(_shardset([1000] * 2000))
    plan = _plans(table, 64, 1, block=8192, full_order_max=0)[0]
    order = plan.order(3)
    assert np.array_equal(np.sort(order), np.arange(len(table)))
    shard_of = order // 1000
    shards_per_block = [len(np.unique(shard_of[i:i + 8192])) for i in range(0, len(order), 8192)]
    assert max(shards_per_block) <= 8192 // 1000 + 2
    assert np.mean(np.diff(order) == 1) < 0.01  # not left in shard order


def test_small_sources_keep_the_order_they_always_had():
    counts = [5, 7, 3, 9]
    table = ItemTable.per_sample(_shardset(counts))
    for block in (4, 0):
        plan = _plans(table, 2, 1, block=block)[0]
        # the order before the block order existed, spelled out
        g = rng(7, 0, ORDER, 2)
        ranges = np.concatenate([[0], np.cumsum(counts)])
        shard_order = g.permutation(len(counts))
        order = np.concatenate([np.arange(ranges[s], ranges[s + 1]) for s in shard_order])
        if block:
            order = order[np.argsort(np.arange(len(order)) // block + g.random(len(order)), kind="stable")]
        else:
            order = order[g.permutation(len(order))]
        assert np.array_equal(plan.order(2), order)


@pytest.mark.parametrize("full_order_max", [FULL_ORDER_MAX, 0])  # materialised order, block order
def test_elastic_resume_4_then_2_then_3_ranks(full_order_max):
    table = ItemTable.per_sample(_shardset([97] * 103))  # 9,991 items
    batch = 8
    stages = [(4, 37), (2, 51), (3, None)]  # (world size, global batches run before the next "kill")
    state = None
    seen: list[int] = []
    step_kw = dict(block=500, full_order_max=full_order_max)
    for world, steps in stages:
        plans = _plans(table, batch, world, **step_kw)
        if state is None:
            cursor = Cursor()
        else:
            restored = json.loads(json.dumps(state))  # as the trainer stores it
            [cursor] = cursors_from_state(restored, [plans[0]])
        assert cursor.epoch == 0
        done = 0
        while cursor.epoch == 0 and (steps is None or done < steps):
            for plan in plans:  # every rank builds its part of the same global batch
                seen.extend(plan.task(0, cursor.epoch, cursor.batch, cursor.start).items)
            cursor = plans[0].advance(cursor)
            done += 1
        state = {**cursors_state([cursor], [plans[0]]), "world_size": world, "batch_size": batch}
    assert cursor == Cursor(1, 0, 0)
    n = len(table)
    assert len(seen) == len(set(seen))  # nothing repeated
    consumed = (37 * 4 + 51 * 2) * batch
    tail = (n - consumed) % (3 * batch)
    assert len(seen) == n - tail and tail < 3 * batch  # nothing lost but the last, partial global batch
    assert seen == plans[0].order(0)[: len(seen)].tolist()  # the same global sequence as one world throughout


def test_same_world_state_is_the_old_layout():
    table = ItemTable.per_sample(_shardset([50] * 4))
    [plan] = _plans(table, 4, 1)
    cursor = Cursor()
    for _ in range(60):
        cursor = plan.advance(cursor)
    assert cursors_state([cursor], [plan]) == {"sources": [[cursor.epoch, cursor.batch]]}
    back = cursors_from_state({"sources": [[cursor.epoch, cursor.batch]], "world_size": 1, "batch_size": 4}, [plan])
    assert back == [cursor]
