"""Minimal distributed helpers, the one place ALPRO calls collectives. Everything is an identity when
torch.distributed is not initialised (or has one process), so callers never test for it.

The model calls :func:`all_gather_with_grad` for VTC; nothing else in the model knows about ranks. The trainer
and the evaluator use :func:`broadcast_object`, :func:`all_reduce_` and :func:`all_gather_objects`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the local slice.

    Uses all_reduce (not reduce_scatter / all_to_all) so it works on gloo as well as NCCL.
    With data-parallel gradient averaging this yields the gradient of the mean over ranks of each rank's loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor(x.shape[0], device=x.device))
        if any(int(s) != x.shape[0] for s in sizes):
            raise RuntimeError(f"all_gather_with_grad: unequal local batch sizes {[int(s) for s in sizes]}")
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world*B, ...) on every rank, rank-major; gradients flow back to every rank."""
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Every rank gets rank ``src``'s object (e.g. the video/image choice of a mixing step)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` on one process."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce_(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``x`` over ranks in place (``op``: ``sum`` or ``max``) and return it; ``x`` must be contiguous
    (a collective on a non-contiguous view would not write through to the caller's tensor)."""
    if get_world_size() > 1:
        dist.all_reduce(x, op=_OPS[op])
    return x


def destroy() -> None:
    """Tear the process group down (end of a command), if there is one."""
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()
