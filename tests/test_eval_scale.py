"""Issue 16 items 5 and 6: map_heads with a bounded window of in-flight work, and retrieval scoring that scales
(features sharded over ranks, chunked top-k, tokens only for the re-ranked candidates) with the same results as
the dense path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from data_fixtures import write_shards

from alpro.data.samples import captions_of, read_meta
from alpro.data.shards import SampleError, resolve
from alpro.data.sources import item_table, iter_heads, map_heads

# --------------------------------------------------------------------------------------------- map_heads


@pytest.fixture(scope="module")
def head_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    blob = root / "x.jpg"
    blob.write_bytes(b"\xff\xd8 not decoded by head reads")
    samples = [{"key": f"s{i:04d}", "path": blob, "media": "image", "captions": [f"caption {i}"] * (1 + i % 3)}
               for i in range(300)]
    samples[77]["raw_json"] = b"{not json"  # a malformed KEY.json: its SampleError comes back in its place
    return write_shards(root / "set", samples, per_shard=23)


def _caption_of(members):
    return captions_of(read_meta(members), members)[0]


def test_map_heads_order_and_results_with_a_bounded_window(head_shards):
    shardset = resolve(str(head_shards), "heads")
    ids = np.array([5, 299, 0, 77, 5, 150, *range(100, 300, 7)], dtype=np.int64)  # out of order, repeated
    lock, started, seen = threading.Lock(), [0], []

    def fn(members):
        with lock:
            started[0] += 1
        return _caption_of(members)

    window = 8
    out = []
    for found in iter_heads(shardset, fn, ids, window=window):
        with lock:
            seen.append(started[0] - len(out))  # submitted and begun, not yet handed to the caller
        out.append(found)
    assert max(seen) <= window, seen
    assert len(out) == len(ids)
    for gid, found in zip(ids.tolist(), out):
        if gid == 77:
            assert isinstance(found, SampleError) and found.reason == "bad_metadata"
        else:
            assert found == f"caption {gid}"
    # the default window, a window of one and a window larger than the set give the same list
    for w in (1, 3, 64, 10_000):
        assert [str(f) for f in map_heads(shardset, _caption_of, ids, window=w)] == [str(f) for f in out]
    everything = map_heads(shardset, _caption_of)
    assert len(everything) == 300 and everything[299] == "caption 299"
    spread = map_heads(shardset, _caption_of, limit=4)  # limit spread evenly, as before
    assert spread == ["caption 0", "caption 99", "caption 199", "caption 299"]


def test_iter_heads_can_stop_early_and_keeps_the_window(head_shards):
    shardset = resolve(str(head_shards), "heads")
    calls = [0]

    def fn(members):
        calls[0] += 1
        return _caption_of(members)

    it = iter_heads(shardset, fn, window=16)
    first = [next(it) for _ in range(3)]
    it.close()  # a consumer that stops: queued chunks are dropped, nothing hangs
    assert first == ["caption 0", "caption 1", "caption 2"]
    assert calls[0] <= 3 + 16
    with pytest.raises(ValueError):
        next(iter_heads(shardset, fn, window=0))


def test_item_table_counts_subitems_through_the_window(head_shards):
    from alpro.data.config import DataConfig

    shardset = resolve(str(head_shards), "heads")
    cfg = DataConfig()
    table, left_out = item_table(shardset, "image", "retrieval", True, cfg)  # per caption
    per = [1 + i % 3 for i in range(300) if i != 77]
    assert len(table.sample) == sum(per) and left_out == {"bad_metadata": 1}
    assert table.sample[:6].tolist() == [0, 1, 1, 2, 2, 2] and table.sub[:6].tolist() == [0, 0, 1, 0, 1, 2]
    evaluation, left_out = item_table(shardset, "image", "retrieval", False, cfg)
    assert len(evaluation.sample) == 300 and (evaluation.sub == -1).all() and not left_out
