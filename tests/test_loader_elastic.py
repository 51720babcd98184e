"""Elastic resume through the real loader: a state saved on 2 ranks restores on 1 rank (and on 3) and the epoch
continues at the same global position, every clip exactly once."""

from __future__ import annotations

import json

import pytest

from alpro.config import from_dict
from alpro.data import DataConfig, build_tokenizer, build_train_loader, corpus_texts


@pytest.fixture(scope="module")
def corpus(loader_shards):
    return loader_shards


def make_cfg(corpus) -> DataConfig:
    return from_dict(DataConfig, {"train": {"video": str(corpus["video"])}, "frame_size": 32, "num_frames": 4,
                                  "batch_size": 1, "num_workers": 0, "max_text_len": 16,
                                  "pem": {"patch_size": 8}})


@pytest.fixture(scope="module")
def tok(corpus):
    return build_tokenizer(train_texts=corpus_texts(make_cfg(corpus), "pretrain"))


def test_state_of_2_ranks_resumes_on_1_and_on_3_ranks(corpus, tok):
    cfg = make_cfg(corpus)
    ranks = [build_train_loader(cfg, "pretrain", tok, rank, 2, seed=5) for rank in (0, 1)]
    clips = 2 * len(ranks[0])  # 8 clips, 4 global batches of 2 per epoch
    seen = []
    for loader in ranks:  # one step on each of the 2 ranks
        seen.extend(next(iter(loader)).keys)
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert state["world_size"] == 2 and state["sources"] == [[0, 1]]

    single = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=5)
    single.load_state_dict(state)
    rest = [(step["epoch"], item["key"]) for step in single.plan(steps=clips - 2) for item in step["items"]]
    assert {e for e, _ in rest} == {0}
    keys = seen + [k for _, k in rest]
    assert len(keys) == clips == len(set(keys))  # nothing lost, nothing twice
    batch = next(iter(single))
    assert batch.keys == [rest[0][1]]  # the batches are what the plan said
    moved = single.state_dict()
    assert moved["world_size"] == 1 and moved["starts"] == [3]  # 2 x 1 + 1 x 1 items into the epoch

    three = [build_train_loader(cfg, "pretrain", tok, rank, 3, seed=5) for rank in range(3)]
    for loader in three:
        loader.load_state_dict(json.loads(json.dumps(moved)))
    firsts = [next(loader.plan(steps=1)) for loader in three]
    got = [item["key"] for step in firsts for item in step["items"]]
    assert got == [k for _, k in rest[1:4]]  # the next global batch of 3, in order
    assert all(step["epoch"] == 0 for step in firsts)
