"""Process-level setup: distributed init, device, seeds, and the DeepSpeed engine (optimizer + schedule).

Kept out of the model (which only calls ``alpro.dist`` for the VTC gather). Works the same under
``torchrun`` (one or many nodes), DeepSpeed's own launcher, or a plain single process.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alpro.errors import ConfigError

LOG = logging.getLogger("alpro")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU). Returns (rank, world, local)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would detect, without its warning
    import deepspeed

    if "RANK" not in os.environ:  # plain `alpro train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed otherwise JIT-compiles a shared-memory comm op (~85 s) on the first CPU collective;
        # gloo alone gives identical results (PLATFORM.md).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return rank, world, local


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------------------------- optimisation


def param_groups(model: torch.nn.Module, weight_decay: float, exclude: set[str]) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights, and the names in ``model.no_weight_decay()`` (biases, norms, ...).

    Frozen parameters (the prompter) are not handed to the optimizer at all.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in exclude else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_ds_config(
    template: Path | None,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    precision: str,
    zero_stage: int,
) -> dict[str, Any]:
    """DeepSpeed config: the JSON template under ``launch/ds_configs/`` with the run config's values on top.

    Batch sizes, clipping, precision and ZeRO stage always come from the run config so there is one source of
    truth. Note DeepSpeed 0.19 defaults ``gradient_clipping`` to 1.0: we always set it (0 = off).
    """
    ds: dict[str, Any] = {}
    if template is not None:
        path = template if template.is_absolute() or template.exists() else REPO_ROOT / template
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config not found: {template}")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{template}: remove '{key}': the trainer passes AdamW and the LR schedule itself")
    ds["train_micro_batch_size_per_gpu"] = micro_batch
    ds["gradient_accumulation_steps"] = grad_accum
    ds["train_batch_size"] = micro_batch * grad_accum * world_size
    # ZeRO-0: the trainer clips (DeepSpeed's stage-0 clipping breaks on 0-d parameters); else DeepSpeed does.
    ds["gradient_clipping"] = float(grad_clip) if zero_stage > 0 else 0.0
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    zero = dict(ds.get("zero_optimization", {}))
    zero["stage"] = zero_stage
    ds["zero_optimization"] = zero
    ds.setdefault("zero_allow_untested_optimizer", True)  # a client torch AdamW (no JIT-built fused Adam)
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, ds_config: dict[str, Any]):
    """``deepspeed.initialize`` -> (engine, optimizer, scheduler, names of the 0-d parameters, see below)."""
    import deepspeed
    # DeepSpeed 0.19 broadcasts (ZeRO 0-2) and partitions (ZeRO-3) parameters through `p.data.view(torch.uint8)`,
    # which raises for 0-d parameters such as ALPRO's learnable temperature. Under the engine they live as
    # 1-element vectors (the model's maths broadcasts either way); exported weights get the model's own shapes
    # back (alpro/train/export.py).
    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    for p in model.parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler, scalars


def warmup_linear_schedule(optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int):
    """The original's schedule exactly (``src/optimization/sched.py::get_lr_sched``, decay ``linear``): optimizer
    step k (1-based, as its ``global_step`` after the increment) runs at ``lr * k / W`` while ``k < W``, then at
    ``lr * (T - k) / (T - W)``, and at 1e-8 where that is <= 0 (its floor: the last step). No step runs at lr 0.

    A ``LambdaLR`` (position 0 = the first optimizer step), stepped and checkpointed by the DeepSpeed engine; its
    state (position and last lr) is restored on resume, so the first logged lr of a resumed run is right."""
    total, warmup = max(total_steps, 1), max(warmup_steps, 0)

    def factor(position: int) -> float:
        k = position + 1
        f = k / warmup if k < warmup else max(0.0, (total - k) / (total - warmup))
        return f if f > 0 else 1e-8 / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def decay_before_zero_grad_steps(groups: list[dict[str, Any]], lr: float, steps: int) -> None:
    """The weight decay the original's zero-gradient steps apply (see :func:`zero_grad_steps`): each multiplies
    the weights by ``1 - lr * weight_decay`` at the optimizer's initial (peak) lr. Applied to the model before
    DeepSpeed copies it into its fp32 master partitions, so every ZeRO stage starts from the same weights."""
    with torch.no_grad():
        for group in groups:
            factor = (1.0 - lr * group["weight_decay"]) ** steps
            if factor != 1.0:
                for p in group["params"]:
                    p.mul_(factor)


def zero_grad_steps(engine, steps: int) -> None:
    """Run ``steps`` AdamW steps on zero gradients, as the original does before its first batch: Horovod's
    ``broadcast_optimizer_state`` initialises a fresh optimizer's state with one ``step()`` on zero gradients, and
    ``run_pretrain_sparse.py`` / ``run_video_qa.py`` call ``optimizer.step()`` once more before the loop ("quick
    hack for amp delay_unscale bug"). Neither uses data: the moments stay 0 and the weights do not move, but Adam's
    step count starts at ``steps``, which scales the bias correction of the first real updates.

    Runs on the innermost torch AdamW (DeepSpeed's fp32 master partitions under ZeRO) with weight decay off; the
    decay of those steps is :func:`decay_before_zero_grad_steps`. One parameter at a time in its own group, as
    ZeRO-3 does (its AdamW's groups are empty between steps: each sub-group's flat fp32 partition is swapped in
    around ``step()``); AdamW is element-wise, so this equals one step over all of them."""
    if steps <= 0:
        return
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise RuntimeError(f"no torch optimizer inside {type(engine.optimizer).__name__}")
    zero3_flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if zero3_flat is not None:
        group_of = engine.optimizer.sub_group_to_group_id
        pairs = [(group_of[i], p) for i, p in enumerate(zero3_flat)]
    else:
        pairs = [(gi, p) for gi, g in enumerate(opt.param_groups) for p in g["params"]]
    saved = [(g["params"], g["weight_decay"]) for g in opt.param_groups]
    try:
        for group in opt.param_groups:
            group["weight_decay"] = 0.0
        for gi, p in pairs:
            for j, group in enumerate(opt.param_groups):
                group["params"] = [p] if j == gi else []
            p.grad = torch.zeros_like(p)
            for _ in range(steps):
                opt.step()
            p.grad = None
    finally:
        for group, (params, wd) in zip(opt.param_groups, saved):
            group["params"], group["weight_decay"] = params, wd
