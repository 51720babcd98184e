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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alpro.dist import destroy
from alpro.errors import ConfigError

if TYPE_CHECKING:
    from alpro.train.config import DeepSpeedConfig

LOG = logging.getLogger("alpro")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The rendezvous variables init_distributed set for a world of one; shutdown() removes them, so a process that
# runs a command in-process (the tests, a notebook) is left as it was: no RANK / MASTER_PORT pointing at a store
# that no longer exists for the next command or child process to inherit.
_ENV_SET_HERE: list[str] = []


def shutdown() -> None:
    """End of a command: tear the process group down and undo init_distributed's environment changes."""
    destroy()
    while _ENV_SET_HERE:
        os.environ.pop(_ENV_SET_HERE.pop(), None)


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU). Returns (rank, world, local)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed would detect, without its warning
    import deepspeed

    if "RANK" not in os.environ:  # plain `alpro train`: a world of one
        world_of_one = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        for key, value in world_of_one.items():
            if key not in os.environ:
                os.environ[key] = value
                _ENV_SET_HERE.append(key)
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


# The DeepSpeed keys the trainer acts on itself, and the run-config field each comes from: the loader makes the
# batches, the trainer clips at ZeRO-0 and reads the stage, the model runs in train.precision. A user JSON may
# repeat them only with the same value (another would be silently at odds with what the trainer does).
TRAINER_OWNED = {
    ("train_micro_batch_size_per_gpu",): "data.batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("train_batch_size",): "data.batch_size x train.grad_accum x world size",
    ("gradient_clipping",): "optim.grad_clip (0 at ZeRO-0, where the trainer clips)",
    ("zero_optimization", "stage"): "train.zero_stage",
    ("bf16", "enabled"): "train.precision",
    ("fp16", "enabled"): "train.precision",
    ("checkpoint", "load_universal"): "train.elastic (set by the trainer when it resumes a universal checkpoint)",
}


def generate_ds_config(
    settings: DeepSpeedConfig,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    precision: str,
    zero_stage: int,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed JSON from typed fields alone (``train.deepspeed`` and the fields the trainer owns).

    Each ZeRO key goes in only for the stages that read it, as the former ``launch/ds_configs/zero{0..3}.json``
    did. Note DeepSpeed 0.19 defaults ``gradient_clipping`` to 1.0: it is always set (0 = off).
    ``load_universal``: the run resumes a universal checkpoint (another world size or ZeRO stage: the trainer
    decides, ``alpro.train.checkpoint.elastic_plan``)."""
    s = settings
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update(contiguous_gradients=s.contiguous_gradients, overlap_comm=s.overlap_comm)
    if zero_stage in (1, 2):
        zero.update(reduce_scatter=s.reduce_scatter, reduce_bucket_size=s.reduce_bucket_size,
                    allgather_bucket_size=s.allgather_bucket_size)
    if zero_stage == 3:
        zero.update(reduce_bucket_size=s.reduce_bucket_size,
                    stage3_prefetch_bucket_size=s.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=s.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=s.stage3_gather_16bit_weights_on_model_save)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        # ZeRO-0: the trainer clips (DeepSpeed's stage-0 clipping breaks on 0-d parameters); else DeepSpeed does.
        "gradient_clipping": float(grad_clip) if zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a client torch AdamW (no JIT-built fused Adam)
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": s.loss_scale,
                 "initial_scale_power": s.initial_scale_power, "loss_scale_window": s.loss_scale_window,
                 "hysteresis": s.hysteresis, "min_loss_scale": s.min_loss_scale},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": s.wall_clock_breakdown,
        "checkpoint": {"load_universal": load_universal},
    }


def read_user_ds_config(path: Path) -> dict[str, Any]:
    """A user's DeepSpeed JSON (``train.ds_config``), relative to the working directory or else the source tree."""
    found = path if path.is_absolute() or path.exists() else REPO_ROOT / path
    if not found.is_file():
        raise ConfigError(f"train.ds_config: DeepSpeed config not found: {path}")
    try:
        data = json.loads(found.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{found}:{e.lineno}: invalid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{found}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{found}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("optimizer", "scheduler"):
        if key in data:
            raise ConfigError(f"{found}: remove '{key}': the trainer passes AdamW and the LR schedule itself")
    return data


def build_ds_config(
    template: Path | None,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    precision: str,
    zero_stage: int,
    settings: DeepSpeedConfig | None = None,
    load_universal: bool = False,
) -> dict[str, Any]:
    """DeepSpeed config: :func:`generate_ds_config`, with the user's JSON ``template`` (``train.ds_config``, optional)
    merged on top key by key. The user's keys win, except those in :data:`TRAINER_OWNED`, which must agree with
    the run config (one line naming the field to set otherwise)."""
    from alpro.config import merge
    from alpro.train.config import DeepSpeedConfig

    ds = generate_ds_config(settings or DeepSpeedConfig(), micro_batch=micro_batch, grad_accum=grad_accum,
                            world_size=world_size, grad_clip=grad_clip, precision=precision, zero_stage=zero_stage,
                            load_universal=load_universal)
    if template is None:
        return ds
    user = read_user_ds_config(Path(template))
    for keys, owner in TRAINER_OWNED.items():
        node: Any = user
        for key in keys:
            node = node.get(key, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT:
            continue
        want: Any = ds
        for key in keys:
            want = want[key]
        if node != want or type(node) is bool is not type(want):
            raise ConfigError(f"{template}: '{'.'.join(keys)}' is {json.dumps(node)} but the run config gives "
                              f"{json.dumps(want)}: set {owner} instead (or remove the key)")
    return merge(ds, user)


_ABSENT = object()


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


def ds_to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` conversion of one ZeRO checkpoint directory into ``out``, in this process (one
    extract and one merge worker: no process pool, so a caller's ``torch.load`` restrictions hold for every file it
    reads; ``alpro.train.checkpoint.convert_to_universal`` is the caller), its progress output swallowed. Our
    checkpoints carry no ``universal_checkpoint_info`` (a model without tensor or pipeline parallelism needs none):
    ``inject_missing_state`` adds the default."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal as convert

    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        convert.main(args)


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
