"""One trainer for every stage: prompter (VTC), pre-training (VTC+VTM+MLM+PEM), retrieval and QA fine-tuning.

    torchrun --standalone --nproc_per_node 2 -m alpro.train --config launch/configs/pretrain_debug.yaml
    alpro train --config launch/configs/qa_msrvtt.yaml --init.weights runs/pretrain/final/model.safetensors

The loop is deliberately plain (torchtitan / nanoGPT style): build -> (resume) -> for step: accumulate
micro-batches through the DeepSpeed engine -> log / evaluate / checkpoint. DeepSpeed owns the optimizer
partitioning (ZeRO), gradient accumulation, clipping and precision; the model owns the maths; the loader owns
the data order (its state is checkpointed, so a resumed run sees exactly the batches it would have seen).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alpro.dist import all_reduce_, barrier, broadcast_object
from alpro.errors import AlproError
from alpro.kernels.triton_support import set_tf32
from alpro.train import runtime
from alpro.train.checkpoint import (
    CheckpointManager,
    convert_to_universal,
    elastic_plan,
    load_engine_checkpoint,
    load_rank_state,
    load_trainer_state,
    resolve_resume,
    rng_state,
    saved_topology,
    set_rng_state,
)
from alpro.train.config import RunConfig, dump_config
from alpro.train.metrics import LOG, MetricLogger, format_duration, progress_line, setup_logging, truncate_metrics


class NonFiniteError(AlproError):
    pass


@dataclass
class _Window:
    """Accumulates timings and scalars between two log lines."""

    start: float
    steps: int = 0
    clips: int = 0
    data_wait: float = 0.0
    sums: dict[str, float] | None = None

    def add(self, scalars: dict[str, float]) -> None:
        self.sums = self.sums or {}
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self, n: int) -> dict[str, float]:
        return {k: v / max(n, 1) for k, v in (self.sums or {}).items()}


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.task = cfg.stage  # a stage is its task (alpro.tasks)
        self.step = 0
        self.samples_seen = 0
        self.skipped = 0
        self.eval_history: list[dict[str, Any]] = []
        self._dense_grad_norm: float | None = None

    # ---------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        set_tf32(cfg.train.tf32)  # fp32 matmuls (cuBLAS, cuDNN, the Triton kernels) on TF32 tensor cores or not
        self.rank, self.world, self.local_rank = runtime.init_distributed()
        self.device = runtime.device_for(self.local_rank)
        self.run_dir = Path(cfg.train.run_dir)
        resume_warnings, resume_notes = self._resolve_resume()
        self._prepare_run_dir()
        setup_logging(self.run_dir, self.rank, cfg.train.log_all_ranks)
        self.sha = runtime.git_sha()
        LOG.info(f"stage {cfg.stage} | world {self.world} | device {self.device} | git {self.sha} | run {self.run_dir}")
        for warning in resume_warnings:
            LOG.warning(warning)
        for note in resume_notes:
            LOG.info(note)

        from alpro.train import assets

        runtime.seed_everything(cfg.seed)  # identical initial weights on every rank
        self.tokenizer = assets.tokenizer_for(cfg, self.run_dir, self.rank)
        self.answer_vocab = assets.answer_vocab_for(cfg, self.run_dir, self.rank) if self.task == "qa" else None
        self.model = assets.build_initialised_model(cfg, self.task, self.tokenizer, self.answer_vocab, self.rank)
        if cfg.train.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.model.to(self.device)

        self.loader = assets.train_loader_for(cfg, self.task, self.tokenizer, self.answer_vocab, self.rank, self.world)
        steps_per_epoch = max(1, len(self.loader) // cfg.train.grad_accum)
        self.total_steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
        warmup = int(cfg.optim.warmup_ratio * self.total_steps)

        exclude = set() if cfg.optim.decay_all_params else set(self.model.no_weight_decay())
        groups = runtime.param_groups(self.model, cfg.optim.weight_decay, exclude)
        if self.resume_from is None:  # (a resumed run loads weights and optimizer state instead)
            runtime.decay_before_zero_grad_steps(groups, cfg.optim.lr, cfg.optim.initial_zero_grad_steps)
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
        scheduler = runtime.warmup_linear_schedule(optimizer, cfg.optim.lr, self.total_steps, warmup)
        ds_config = runtime.build_ds_config(
            cfg.train.ds_config,
            micro_batch=cfg.data.batch_size,
            grad_accum=cfg.train.grad_accum,
            world_size=self.world,
            grad_clip=cfg.optim.grad_clip,
            precision=cfg.train.precision,
            zero_stage=cfg.train.zero_stage,
            settings=cfg.train.deepspeed,
            load_universal=self.universal is not None,
        )
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())  # before ZeRO-3 partitions them
        self.engine, self.optimizer, self.scheduler, self.scalar_params = runtime.build_engine(
            self.model, optimizer, scheduler, ds_config
        )
        if self.resume_from is None:
            runtime.zero_grad_steps(self.engine, cfg.optim.initial_zero_grad_steps)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.train.keep_last)
        if self.rank == 0 and self.resume_from is not None:
            for stale in self.checkpoints.clean_stale():
                LOG.info(f"removed {stale} (an unfinished save)")
            truncate_metrics(self.run_dir / "metrics.jsonl", load_trainer_state(self.resume_from))
        self.metrics = MetricLogger(self.run_dir, enabled=self.rank == 0, tensorboard=cfg.train.tensorboard)
        LOG.info(
            f"model {n_all / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable) | {self.total_steps} steps "
            f"({steps_per_epoch}/epoch) | batch {cfg.data.batch_size}x{self.world}x{cfg.train.grad_accum} | "
            f"ZeRO-{cfg.train.zero_stage} {cfg.train.precision} | warmup {warmup}"
        )
        if self.resume_from is not None:
            self._resume(self.resume_from)  # restores every RNG as it was at the checkpoint
        else:
            runtime.seed_everything(cfg.seed + 1000 * self.rank)  # distinct dropout / VTM draws per rank

    def _resolve_resume(self) -> tuple[list[str], list[str]]:
        """Rank 0 picks and verifies the checkpoint to resume (manifest hashes, pickle allowlist: checkpoint.py)
        and every rank gets its answer, so files are hashed once and every rank fails with the same line.

        Elastic resume: a ZeRO-1/2/3 checkpoint saved with another world size or ZeRO stage (``train.elastic``
        auto; always with ``universal``) is converted here, by rank 0 while the others wait in the broadcast, to
        DeepSpeed's universal checkpoint (``checkpoints/universal/step-N``, reused by a later resume); the engine
        is then built to load that (``self.universal``). Returns the warnings (damaged checkpoints skipped) and
        notes (the conversion), logged once logging is set up."""
        answer: tuple[str | None, str | None, list[str], list[str], str | None] = (None, None, [], [], None)
        if self.rank == 0:
            warnings: list[str] = []
            notes: list[str] = []
            try:
                found = resolve_resume(self.cfg.train.resume, self.run_dir, warnings)
                universal = None
                if found is not None:
                    reason = elastic_plan(found, self.world, self.cfg.train.zero_stage, self.cfg.train.elastic)
                    if reason is not None:
                        t0 = time.perf_counter()
                        universal, made = convert_to_universal(found)
                        notes.append(f"elastic resume ({reason}): {'converted' if made else 'reusing'} {found.name} "
                                     f"as universal checkpoint {universal}"
                                     + (f" in {time.perf_counter() - t0:.1f}s" if made else ""))
                answer = (None if found is None else str(found), None if universal is None else str(universal),
                          warnings, notes, None)
            except AlproError as e:
                answer = (None, None, warnings, [], str(e))
            except OSError as e:  # an unreadable file: still one line, and no rank left waiting
                answer = (None, None, warnings, [], f"--train.resume {self.cfg.train.resume}: {e}")
        found, universal, warnings, notes, error = broadcast_object(answer)
        if error is not None:
            raise AlproError(error)
        self.resume_from = None if found is None else Path(found)
        self.universal = None if universal is None else Path(universal)
        return warnings, notes

    def _prepare_run_dir(self) -> None:
        """Refuse to overwrite an existing run unless resuming; write config.yaml and the git sha. Before any
        model is built: a read-only or full run directory is one line here."""
        if self.rank == 0:
            exists = self.run_dir.is_dir() and any(
                (self.run_dir / n).exists() for n in ("metrics.jsonl", "checkpoints", "final")
            )
            if exists and self.cfg.train.resume is None:
                raise AlproError(
                    f"run directory {self.run_dir} already holds a run: pass --train.resume auto to continue it, "
                    "or choose another --train.run_dir"
                )
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
                (self.run_dir / "git_sha.txt").write_text(runtime.git_sha() + "\n")
            except OSError as e:
                raise AlproError(f"run directory {self.run_dir} is not writable: {e.strerror or e} "
                                 f"({e.filename or self.run_dir})") from None
        barrier()

    def _resume(self, ckpt: Path) -> None:
        LOG.info(f"resuming from {ckpt}")
        load_engine_checkpoint(self.engine, ckpt, universal=self.universal)
        # The optimizer's lr is the schedule's (restored with it), whatever DeepSpeed restored in param_groups.
        if self.scheduler is not None:
            for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
        state = load_trainer_state(ckpt)
        self.step = state["step"]
        self.samples_seen = state["samples_seen"]
        self.skipped = state.get("skipped", 0)
        saved_world, _ = saved_topology(ckpt)
        if saved_world == self.world:  # every rank continues its own loader position and RNG streams
            rank_state = load_rank_state(ckpt, self.rank)
            self.loader.load_state_dict(rank_state["loader"])
            set_rng_state(rank_state["rng"])
            return
        self._resume_elastic(ckpt, state, saved_world)

    def _resume_elastic(self, ckpt: Path, state: dict[str, Any], saved_world: int) -> None:
        """Another world size: the loader continues from the saved *global* position (every rank saved the same
        one; rank 0's is read), and so continues the epoch with no sample lost or repeated if the loader's state
        allows it. The RNG streams (dropout, VTM negatives, MLM masks) are per rank and cannot be re-split: a rank
        that existed continues its own, a new one is seeded from (seed, rank, step)."""
        cfg = self.cfg
        global_batch = cfg.data.batch_size * cfg.train.grad_accum * self.world
        saved_batch = state.get("global_batch")
        LOG.info(f"elastic resume: world {saved_world} -> {self.world}, global batch {saved_batch or '?'} -> "
                 f"{global_batch} (data.batch_size {cfg.data.batch_size} x train.grad_accum {cfg.train.grad_accum} "
                 f"x {self.world})")
        if saved_batch is not None and saved_batch != global_batch:
            LOG.warning(f"the global batch changes from {saved_batch} to {global_batch} samples per step: the "
                        f"loss curve and lr schedule continue for another batch (keep data.batch_size x "
                        f"train.grad_accum x world size at {saved_batch} to continue the same run)")
        self.loader.load_state_dict(load_rank_state(ckpt, 0)["loader"])
        if (ckpt / f"rank_{self.rank:05d}.json").is_file():
            set_rng_state(load_rank_state(ckpt, self.rank)["rng"])
        else:
            runtime.seed_everything(cfg.seed + 1000 * self.rank + 7919 * self.step)

    # ----------------------------------------------------------------------------------------------- loop

    def _batches(self):
        """Endless iterator over the loader; a new pass starts a new epoch (the loader tracks which)."""
        while True:
            got = False
            for batch in self.loader:
                got = True
                yield batch
            if not got:
                raise AlproError("the training loader produced no batches (empty shards or batch larger than data?)")

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.train.eval_at_start and self.step == 0:
            self.evaluate()
        batches = self._batches()
        window = _Window(start=time.perf_counter())
        run_start, start_step = time.perf_counter(), self.step
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.engine.train()
        while self.step < self.total_steps:
            scalars = self._train_step(batches, window)
            if scalars is None:  # skipped (non-finite, policy "skip")
                continue
            self.step += 1
            window.steps += 1
            window.add(scalars)
            if self.step % cfg.train.log_interval == 0 or self.step == self.total_steps:
                self._log(window, run_start, start_step)
                window = _Window(start=time.perf_counter())
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0 and self.step < self.total_steps:
                self.evaluate()
                self.engine.train()
            if cfg.train.save_interval and self.step % cfg.train.save_interval == 0 and self.step < self.total_steps:
                self.save()
        if not (self.checkpoints.dir / f"step-{self.step:08d}" / "trainer_state.json").is_file():
            self.save()  # (a run resumed from its final checkpoint has nothing new to save)
        results = self.evaluate()
        self._finish(run_start, start_step)
        return results

    def _train_step(self, batches, window: _Window) -> dict[str, float] | None:
        """One optimizer step = grad_accum micro-batches. Returns averaged scalars, or None if skipped."""
        cfg = self.cfg
        sums: dict[str, float] = {}
        lr = float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else cfg.optim.lr  # this step's
        for _ in range(cfg.train.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            window.data_wait += time.perf_counter() - t0
            batch = batch.to(self.device)
            out = self.engine(batch)
            bad = self._nonfinite(out)
            if bad:
                self._on_nonfinite(f"loss {', '.join(bad)}")
                return None
            self.engine.backward(out["loss"])
            if cfg.train.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                self._clip_dense_grads()
            self.engine.step()
            window.clips += len(batch) * self.world
            self.samples_seen += len(batch) * self.world
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
        if not self.engine.was_step_applied() and cfg.train.precision != "fp16":
            # ZeRO-1/2 skip the update when the gradient norm is not finite (and zero the gradients).
            self._on_nonfinite("gradients (non-finite gradient norm)")
            return None
        scalars = {f"train/{k}": v / cfg.train.grad_accum for k, v in sums.items()}
        scalars["train/lr"] = lr
        gnorm = self._dense_grad_norm if cfg.train.zero_stage == 0 else self.engine.get_global_grad_norm()
        if gnorm is not None:
            scalars["train/grad_norm"] = float(gnorm)
        return scalars

    def _nonfinite(self, out: dict[str, torch.Tensor]) -> list[str]:
        """Names of non-finite losses, agreed by all ranks (so every rank stops or skips together)."""
        names = sorted(k for k, v in out.items() if k.startswith("loss") and torch.is_tensor(v))
        flags = torch.tensor([0.0 if torch.isfinite(out[k].detach()).all() else 1.0 for k in names])
        all_reduce_(flags, op="max")
        return [n for n, f in zip(names, flags.tolist()) if f > 0]

    def _clip_dense_grads(self) -> None:
        """ZeRO-0: clip the (already all-reduced) gradients here and check them. DeepSpeed's own stage-0 clipping
        fails on 0-d parameters (the temperature) and has no overflow check in fp32/bf16."""
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        self._dense_grad_norm = float(norm)
        if not math.isfinite(self._dense_grad_norm):
            self._on_nonfinite("gradients")
            self.engine.optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without gradients

    def _on_nonfinite(self, what: str) -> None:
        msg = f"non-finite {what} at step {self.step + 1}"
        if self.cfg.train.nan_policy == "stop":
            raise NonFiniteError(msg + " (train.nan_policy=stop; use 'skip' to drop such steps)")
        self.skipped += 1
        LOG.warning(msg + f": skipped ({self.skipped}/{self.cfg.train.max_skipped_steps})")
        if self.skipped > self.cfg.train.max_skipped_steps:
            raise NonFiniteError(f"{msg}: more than {self.cfg.train.max_skipped_steps} skipped steps")

    def _log(self, window: _Window, run_start: float, start_step: int) -> None:
        elapsed = time.perf_counter() - window.start
        scalars = window.means(window.steps)
        scalars["throughput/clips_per_s"] = window.clips / max(elapsed, 1e-9)
        scalars["throughput/clips_per_s_per_rank"] = scalars["throughput/clips_per_s"] / self.world
        scalars["throughput/data_wait"] = window.data_wait / max(elapsed, 1e-9)
        for k, v in self.loader.metrics().items():
            scalars[f"data/{k}"] = float(v)
        if self.device.type == "cuda":
            scalars["memory/peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            scalars["memory/peak_gb"] = _peak_rss_gb()
        done = self.step - start_step
        rate = (time.perf_counter() - run_start) / max(done, 1)
        eta = rate * (self.total_steps - self.step)
        LOG.info(progress_line(self.step, self.total_steps, scalars, eta))
        self.metrics.log(self.step, scalars, kind="train", samples=self.samples_seen)

    # ------------------------------------------------------------------------------------- eval and save

    def evaluate(self) -> dict[str, Any]:
        from alpro.train.evaluate import evaluate_during_training

        t0 = time.perf_counter()
        results = evaluate_during_training(self.engine.module, self.cfg, self.tokenizer, self.answer_vocab,
                                           self.rank, self.world, self.device)
        if results:
            flat = {f"val/{k}": v for k, v in results.items() if isinstance(v, (int, float))}
            self.metrics.log(self.step, flat, kind="eval")
            shown = " ".join(f"{k} {v:.2f}" for k, v in results.items() if isinstance(v, (int, float)))
            LOG.info(f"eval @ step {self.step} ({time.perf_counter() - t0:.1f}s): {shown}")
            self.eval_history.append({"step": self.step, **results})
        return results

    def save(self) -> Path:
        trainer_state = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped": self.skipped,
            "total_steps": self.total_steps,
            "world_size": self.world,
            "zero_stage": self.cfg.train.zero_stage,
            "global_batch": self.cfg.data.batch_size * self.cfg.train.grad_accum * self.world,
            "git_sha": self.sha,
            "time": time.time(),
            "stage": self.cfg.stage,
            "scalar_params": self.scalar_params,  # 0-d parameters DeepSpeed holds as 1-element vectors
            "metrics_bytes": self.metrics.tell(),  # metrics.jsonl up to this step: a resume continues from here
        }
        rank_state = {"step": self.step, "rng": rng_state(), "loader": self.loader.state_dict()}
        path = self.checkpoints.save(self.engine, self.step, trainer_state, rank_state, dump_config(self.cfg))
        LOG.info(f"saved checkpoint {path}")
        return path

    def _finish(self, run_start: float, start_step: int) -> None:
        from alpro.train import assets
        from alpro.train.export import export_final

        if self.rank == 0:
            num_entities = getattr(self.model.cfg, "num_entities", None) if self.task == "pretrain" else None
            export_final(self.checkpoints.dir / f"step-{self.step:08d}", self.run_dir / "final", self.cfg, self.task,
                         self.tokenizer, self.answer_vocab, num_entities)
            assets.copy_run_assets(self.cfg, self.run_dir)
            from alpro.train.plots import plot_run

            plot_run(self.run_dir)
        barrier()
        elapsed = time.perf_counter() - run_start
        steps = self.step - start_step
        LOG.info(
            f"done: {steps} steps in {format_duration(elapsed)} ({elapsed / max(steps, 1):.2f}s/step), "
            f"{self.samples_seen} samples seen, {self.skipped} skipped steps, final weights in "
            f"{self.run_dir / 'final'}"
        )
        self.metrics.close()


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(cfg: RunConfig) -> dict[str, Any]:
    trainer = Trainer(cfg)
    try:  # setup too: a run that stops in setup (bad run dir, damaged checkpoint) leaves no process group behind
        trainer.setup()
        return trainer.train()
    finally:
        runtime.shutdown()

