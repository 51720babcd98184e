"""``alpro.dist``, the one owner of ALPRO's collectives: identities on one process, and on two gloo ranks the
values the trainer (non-finite agreement: max) and the evaluator (score sums, gathered predictions) rely on."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from alpro import dist

WORLD = 2


def test_one_process_is_the_identity():
    x = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_(x, "max") is x and x.tolist() == [1.0, 2.0]
    assert dist.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object("same") == "same"
    dist.destroy()  # nothing to tear down: no error


def _rank(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # a file rendezvous: no port to find free
    tdist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        flags = torch.tensor([0.0, float(rank == 1)])  # rank 1 alone saw a non-finite second loss
        scores = torch.full((2, 3), float(rank + 1))
        result = {
            "max": dist.all_reduce_(flags, "max").tolist(),
            "sum": dist.all_reduce_(scores).tolist(),
            "gathered": dist.all_gather_objects((rank, f"pred{rank}")),
            "broadcast": dist.broadcast_object(f"from{rank}"),
        }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy()
        assert not tdist.is_initialized()


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_agree(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path),), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["max"] == [0.0, 1.0]  # every rank skips the step together
        assert got["sum"] == [[3.0] * 3] * 2
        assert got["gathered"] == [(0, "pred0"), (1, "pred1")]  # rank order
        assert got["broadcast"] == "from0"
