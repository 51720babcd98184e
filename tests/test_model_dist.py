"""VTC across ranks: two gloo processes on 127.0.0.1 each hold half the batch; the mean of their losses and their
averaged gradients must equal one process computing VTC over the concatenated batch (targets offset by the
global rank)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alpro.data.batch import Batch
from alpro.models import ModelConfig, build_model

B_LOCAL, WORLD = 3, 2


def _model():
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("debug"), "prompter", vocab_size=1000).eval()  # eval: no dropout
    with torch.no_grad():
        model.temp.fill_(0.1)
    return model


def _batch(rows: slice) -> Batch:
    g = torch.Generator().manual_seed(7)
    video = torch.randn(B_LOCAL * WORLD, 3, 4, 32, 32, generator=g)[rows]
    ids = torch.randint(5, 1000, (B_LOCAL * WORLD, 6), generator=g)[rows]
    return Batch(type="video", keys=[str(i) for i in range(len(ids))], video=video, input_ids=ids,
                 attention_mask=torch.ones_like(ids))


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _rank(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        loss = model(_batch(slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)))["loss_vtc"]
        loss.backward()
        grads = _grads(model)
        dist.all_reduce(grads)  # data-parallel averaging, as DDP / DeepSpeed do
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.save({"loss": mean_loss / WORLD, "grads": grads / WORLD}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
@pytest.mark.slow
def test_vtc_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    model = _model()
    loss = model(_batch(slice(None)))["loss_vtc"]
    loss.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["grads"], _grads(model), atol=1e-6, rtol=1e-4)
