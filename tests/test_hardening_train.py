"""Issue 10, training side: nothing runs from a stranger's checkpoint, damaged checkpoints are detected and
skipped, a full or read-only disk is one line, config values are finite and YAML keys unique, a resumed log is
the uninterrupted log's continuation, and the schedule is the original's.

Fast tests run in-process on crafted files; tests that launch the trainer are marked slow. Full and read-only
disks are real tmpfs mounts (the tests run as root, as the suite does in CI and on this machine).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, fault_env

from alpro.config import ConfigError
from alpro.train.checkpoint import (
    MANIFEST,
    DamagedCheckpoint,
    UnsafeCheckpoint,
    newest_intact,
    resolve_resume,
    verify_checkpoint,
    write_manifest,
)

CONFIGS = REPO / "launch" / "configs" / "debug"


# ------------------------------------------------------------------------------------------ crafted files


class _RunsACommand:
    """Unpickling this runs ``touch MARKER``: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _ckpt(root: Path, step: int, payload: dict | None = None, manifest: bool = True) -> Path:
    """A checkpoint directory as CheckpointManager lays it out (torch files, JSON states, config, manifest)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    ckpt = root / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    torch.save(payload if payload is not None else {"module": {"w": torch.full((256,), float(step))}},
               ckpt / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "exp_avg": torch.zeros(256)}},
               ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "samples_seen": 4 * step}))
    (ckpt / "rank_00000.json").write_text(json.dumps({"rank": 0, "rng": {}, "loader": {"step": step}}))
    (ckpt / "config.yaml").write_text("train: {zero_stage: 0}\n")
    if manifest:
        write_manifest(ckpt)
    return ckpt


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _hostile(root: Path, marker: Path) -> Path:
    """A complete-looking checkpoint whose model file runs a command when unpickled (with a valid manifest:
    a manifest proves integrity, not trust)."""
    return _ckpt(root, 2, {"module": {"w": torch.zeros(2)}, "ds_config": _RunsACommand(marker)})


# ------------------------------------------------------------------------------- 1, 2: no code from files


def test_deepspeed_classes_are_allowed_and_our_layout_verifies(tmp_path):
    ckpt = _ckpt(tmp_path, 2)
    verify_checkpoint(ckpt)  # LossScaler, ZeroStageEnum: DeepSpeed's own classes are on the allowlist
    assert set(json.loads((ckpt / MANIFEST).read_text())["files"]) == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "trainer_state.json",
        "rank_00000.json", "config.yaml"}


def test_export_refuses_a_checkpoint_that_runs_code(tmp_path, capsys):
    from alpro.cli import main

    marker = tmp_path / "PWNED"
    ckpt = _hostile(tmp_path / "run", marker)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert not marker.exists(), "unpickling ran the command"
    assert err.count("\n") == 1 and "refused" in err
    assert str(ckpt / "mp_rank_00_model_states.pt") in err and "posix.system" in err
    assert not (tmp_path / "out.safetensors").exists()
    # the same through a run directory (newest checkpoint): refused, not skipped as "damaged"
    assert main(["export", str(tmp_path / "run")]) == 2
    assert not marker.exists() and "posix.system" in capsys.readouterr().err


def test_export_still_reads_our_own_stage0_checkpoint(tmp_path, capsys):
    from safetensors.torch import load_file

    from alpro.cli import main

    ckpt = _ckpt(tmp_path / "run", 4)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.safetensors")]) == 0
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["w"], torch.full((256,), 4.0))
    assert str(ckpt) in capsys.readouterr().out


def test_resume_path_with_a_hostile_pickle_is_refused_before_loading(tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = _hostile(tmp_path / "run", marker)
    with pytest.raises(UnsafeCheckpoint) as e:
        resolve_resume(str(ckpt), tmp_path / "new")
    assert not marker.exists() and "posix.system" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UnsafeCheckpoint):  # 'auto' does not skip it as merely damaged: it stops
        resolve_resume("auto", tmp_path / "run")
    assert not marker.exists()


def test_deepspeeds_own_weights_only_false_loads_are_restricted(tmp_path):
    """Second layer: inside restricted_unpickling even ``torch.load(..., weights_only=False)`` -- what DeepSpeed's
    checkpoint engine and zero_to_fp32 call -- uses the weights-only unpickler; outside, the env is as it was."""
    import pickle

    from alpro.train.checkpoint import restricted_unpickling

    marker = tmp_path / "PWNED"
    ckpt = _hostile(tmp_path / "run", marker)
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with restricted_unpickling():
        with pytest.raises(pickle.UnpicklingError, match="posix.system"):
            torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert not marker.exists() and os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before
    assert type(sd["optimizer_state_dict"]["loss_scaler"]).__name__ == "LossScaler"


@pytest.mark.slow
def test_train_resume_refuses_a_checkpoint_that_runs_code(tiny_shards, tmp_path):
    """The real trainer (``--train.resume DIR`` on a crafted checkpoint): one line, and the command never ran."""
    marker = tmp_path / "PWNED"
    ckpt = _hostile(tmp_path / "elsewhere", marker)
    proc = _train(tmp_path / "run", tiny_shards, "--train.resume", str(ckpt), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not marker.exists(), "unpickling ran the command"
    lines = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and "posix.system" in lines[0] and "mp_rank_00_model_states.pt" in lines[0]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------- 14: damaged checkpoints


def test_manifest_detects_cut_and_altered_files(tmp_path):
    ckpt = _ckpt(tmp_path, 2)
    _cut(ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(DamagedCheckpoint, match="mp_rank_00_model_states.pt: .* bytes, manifest.json says"):
        verify_checkpoint(ckpt)
    ckpt = _ckpt(tmp_path / "b", 2)
    text = (ckpt / "rank_00000.json").read_text()
    (ckpt / "rank_00000.json").write_text(text.replace('"step": 2', '"step": 9'))  # same size, other bytes
    with pytest.raises(DamagedCheckpoint, match="rank_00000.json: sha256 differs"):
        verify_checkpoint(ckpt)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"]["../../../etc/hostname"] = {"size": 1, "sha256": "0"}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpoint, match="outside the checkpoint directory"):
        verify_checkpoint(ckpt)


def test_checkpoints_without_manifest_are_checked_by_parsing(tmp_path):
    """Saved before manifests existed: still resumable when intact; cut files are caught by parsing them."""
    ckpt = _ckpt(tmp_path, 2, manifest=False)
    verify_checkpoint(ckpt)
    _cut(ckpt / "rank_00000.json")
    with pytest.raises(DamagedCheckpoint, match="rank_00000.json: not valid JSON"):
        verify_checkpoint(ckpt)
    ckpt = _ckpt(tmp_path / "b", 2, manifest=False)
    _cut(ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(DamagedCheckpoint, match="mp_rank_00_model_states.pt: not a readable torch checkpoint"):
        verify_checkpoint(ckpt)


def test_auto_skips_damaged_checkpoints_and_an_explicit_damaged_path_is_one_line(tmp_path):
    for step in (2, 4, 6):
        _ckpt(tmp_path, step)
    ckpts = tmp_path / "checkpoints"
    _cut(ckpts / "step-00000006" / "mp_rank_00_model_states.pt")
    _cut(ckpts / "step-00000004" / "rank_00000.json")
    warnings: list[str] = []
    assert resolve_resume("auto", tmp_path, warnings) == ckpts / "step-00000002"
    assert len(warnings) == 2 and "step-00000006 is damaged" in warnings[0] and "step-00000004" in warnings[1]
    with pytest.raises(DamagedCheckpoint) as e:
        resolve_resume(str(ckpts / "step-00000006"), tmp_path / "other")
    assert "damaged checkpoint" in str(e.value) and "\n" not in str(e.value)
    _cut(ckpts / "step-00000002" / "config.yaml")
    with pytest.raises(DamagedCheckpoint, match="no intact checkpoint"):
        newest_intact(ckpts, [])


def test_truncate_metrics_cuts_the_log_back_to_the_checkpoint(tmp_path):
    """Item 17 in the small: the length recorded at the save wins; checkpoints from before it drop later steps."""
    from alpro.train.metrics import MetricLogger, read_metrics, truncate_metrics

    log = MetricLogger(tmp_path, enabled=True, tensorboard=False)
    for step in (1, 2):
        log.log(step, {"train/loss": float(step)}, kind="train")
    at_save = log.tell()
    log.log(2, {"val/r1": 1.0}, kind="eval")  # after the save of step 2 (the final evaluation)
    log.log(3, {"train/loss": 3.0}, kind="train")
    log.close()
    path = tmp_path / "metrics.jsonl"
    truncate_metrics(path, {"step": 2, "metrics_bytes": at_save})
    assert [(r["step"], r["kind"]) for r in read_metrics(path)] == [(1, "train"), (2, "train")]
    with open(path, "a") as f:
        f.write(json.dumps({"step": 3, "kind": "train"}) + "\n")
    truncate_metrics(path, {"step": 2})  # no recorded length: rows past the step go
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


# --------------------------------------------------------------------------------- 16: config values


@pytest.mark.parametrize("override", [["--optim.lr", ".nan"], ["--optim.lr", ".inf"], ["--optim.lr", "1e999"],
                                      ["--optim.betas", "[0.9, .nan]"], ["--optim.grad_clip=-.inf"]])
def test_every_float_must_be_finite(tmp_path, capsys, override):
    from alpro.cli import main

    assert main(["train", "--config", str(CONFIGS / "prompter.yaml"), "--train.run_dir", str(tmp_path / "r"),
                 *override]) == 2
    err = capsys.readouterr().err
    assert "must be a finite number" in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_float_fields_are_checked_in_yaml_files_too(tmp_path):
    from alpro.train.config import load_run_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {CONFIGS / 'prompter.yaml'}\noptim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match="'optim.lr' must be a finite number, got nan"):
        load_run_config(cfg)


def test_duplicate_yaml_key_is_an_error_with_its_line(tmp_path, capsys):
    from alpro.cli import main

    cfg = tmp_path / "dup.yaml"
    cfg.write_text(f"base: {CONFIGS / 'prompter.yaml'}\ndata:\n  batch_size: 2\ntrain:\n  steps: 3\n"
                   "data:\n  batch_size: 4\n")
    assert main(["train", "--config", str(cfg), "--train.run_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:6:1" in err and "duplicate key 'data' (first at line 2)" in err and err.count("\n") == 1
    # nested mappings too; a YAML merge key may still be overridden
    from alpro.config import load_yaml

    cfg.write_text("optim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError, match=":3:3: .*duplicate key 'lr' \\(first at line 2\\)"):
        load_yaml(cfg)
    cfg.write_text("a: &x {lr: 1}\nb:\n  <<: *x\n  lr: 2\n")
    assert load_yaml(cfg)["b"] == {"lr": 2}


@contextmanager
def _tmpfs(path: Path, options: str):
    """A real small file system (root only: the suite runs as root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_read_only_run_directory_is_one_line_before_any_model(tmp_path, capsys):
    from alpro.cli import main

    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        args = ["train", "--config", str(CONFIGS / "prompter.yaml"), "--data.train.video", "pipe:cat x.tar",
                "--data.test.video", "null", "--train.run_dir", str(ro / "run")]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"cannot write in {ro} (Read-only file system)" in err and err.count("\n") == 1
        assert not (ro / "run").exists()


# --------------------------------------------------------------------------------------- 22: schedule


def _original_get_lr_sched(global_step: int, learning_rate: float, num_train_steps: int, warmup_ratio: float):
    """salesforce/ALPRO src/optimization/sched.py (decay 'linear'), verbatim in substance."""
    warmup_steps = int(warmup_ratio * num_train_steps)
    if global_step < warmup_steps:
        lr = learning_rate * global_step / warmup_steps
    else:
        lr = learning_rate * max(0, (num_train_steps - global_step) / (num_train_steps - warmup_steps))
    return 1e-8 if lr <= 0 else lr


@pytest.mark.parametrize("total, ratio", [(20, 0.1), (6, 0.1), (100, 0.05), (7, 0.5), (1, 0.05)])
def test_schedule_is_the_originals_step_for_step(total, ratio):
    from alpro.train.runtime import warmup_linear_schedule

    lr = 5e-4
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    sched = warmup_linear_schedule(opt, lr, total, int(ratio * total))
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])  # the lr optimizer step k runs at
        opt.step()
        sched.step()
    want = [_original_get_lr_sched(k, lr, total, ratio) for k in range(1, total + 1)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-20)
    assert min(got) > 0  # no optimizer step at lr 0


class _Engine:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_zero_grad_steps_as_the_original_before_its_first_batch():
    """Two AdamW steps on zero gradients: weights unchanged, moments 0, Adam's step count 2, so the first real
    update's bias correction is that of step 3 (the original's AdamW state after Horovod's state broadcast and
    its pre-loop optimizer.step())."""
    from alpro.train.runtime import decay_before_zero_grad_steps, zero_grad_steps

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8))
    w0 = w.detach().clone()
    groups = [{"params": [w], "weight_decay": 0.01}]
    decay_before_zero_grad_steps(groups, 1e-3, 2)
    assert torch.equal(w.detach(), w0 * (1 - 1e-3 * 0.01) ** 2)
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    w1 = w.detach().clone()
    zero_grad_steps(_Engine(opt), 2)
    state = opt.state[w]
    assert float(state["step"]) == 2 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert torch.equal(w.detach(), w1) and w.grad is None and opt.param_groups[0]["weight_decay"] == 0.01
    # the first real step: Adam's update at t=3 (bias correction of step 3), plus decoupled decay
    g = torch.randn(8)
    w.grad = g.clone()
    opt.step()
    m, v = 0.1 * g, 0.02 * g * g
    step = 1e-3 / (1 - 0.9**3) * m / ((v / (1 - 0.98**3)).sqrt() + 1e-6)
    assert torch.allclose(w.detach(), w1 * (1 - 1e-3 * 0.01) - step, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------- slow: the trainer, resume, full disk


def _data_args(shards) -> list[str]:
    return ["--data.train.video", str(shards["train_video"]), "--data.train.image", str(shards["train_image"]),
            "--data.test.video", str(shards["test_video"])]


def _train(run: Path, shards, *extra: str, env: dict | None = None, check: bool = True):
    cmd = [sys.executable, "-m", "alpro", "train", "--config", str(CONFIGS / "prompter.yaml"),
           "--train.run_dir", str(run), *_data_args(shards), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _timing(key: str) -> bool:
    """Wall-clock fields: time, throughput, memory, and the loader's seconds and rates (``data/wait_s``,
    ``data/decode_s_per_clip``, ``data/clips_per_s``); loader counters (``data/skipped*``) are compared."""
    if key == "time" or key.startswith(("throughput/", "memory/")):
        return True
    name = key.split("/")[-1]
    return key.startswith("data/") and ("_s_" in name or name.endswith(("_s", "per_s")))


def _rows(run: Path) -> list[dict]:
    """metrics.jsonl rows without wall-clock fields."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not _timing(k)} for r in rows]


EXTRA = ("--train.steps", "8", "--train.save_interval", "2", "--train.log_interval", "1", "--train.keep_last", "4")


@pytest.mark.slow
def test_resume_auto_falls_back_past_damaged_checkpoints_and_continues_the_log(tiny_shards, tmp_path):
    """Items 14 and 17: kill -9 after the step-6 checkpoint, cut its model file and step 4's rank state; ``auto``
    warns about both, resumes from step 2, and the finished metrics.jsonl equals the uninterrupted run's row for
    row (no step twice, the first resumed lr included) apart from wall-clock fields."""
    ref = tmp_path / "ref"
    _train(ref, tiny_shards, *EXTRA)
    run = tmp_path / "run"
    proc = _train(run, tiny_shards, *EXTRA, env=fault_env(KILL_AFTER_SAVE=6), check=False)
    assert proc.returncode != 0 and (run / "checkpoints" / "step-00000006" / MANIFEST).is_file()
    ckpts = run / "checkpoints"
    _cut(ckpts / "step-00000006" / "mp_rank_00_model_states.pt")
    _cut(ckpts / "step-00000004" / "rank_00000.json")
    (ckpts / ".tmp-step-00000008").mkdir()  # a save that never finished
    proc = _train(run, tiny_shards, *EXTRA, "--train.resume", "auto")
    log = (run / "train.log").read_text()
    assert f"checkpoint {ckpts / 'step-00000006'} is damaged, skipped" in log
    assert f"checkpoint {ckpts / 'step-00000004'} is damaged, skipped" in log
    assert f"resuming from {ckpts / 'step-00000002'}" in log
    assert f"removed {ckpts / '.tmp-step-00000008'}" in log
    got, want = _rows(run), _rows(ref)
    steps = [(r["step"], r["kind"]) for r in got]
    assert len(steps) == len(set(steps))
    assert got == want
    lrs = [r["train/lr"] for r in got if r["kind"] == "train"]
    assert lrs[2] == want[2]["train/lr"] > 0  # step 3, the first after the resume
    # an explicit damaged path is one line (step 6 was saved again by the resumed run: cut it again)
    _cut(ckpts / "step-00000006" / "mp_rank_00_model_states.pt")
    proc = _train(tmp_path / "other", tiny_shards, *EXTRA, "--train.resume", str(ckpts / "step-00000006"),
                  check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if "error:" in x]
    model = ckpts / "step-00000006" / "mp_rank_00_model_states.pt"
    assert len(errors) == 1 and errors[0].startswith(
        f"alpro train: error: --resume {model.parent}: damaged checkpoint: {model}: {model.stat().st_size} bytes, "
        "manifest.json says"), proc.stderr[-2000:]


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(tiny_shards, tmp_path):
    """Item 15 on a real full file system: the first checkpoint fits, the second does not."""
    ref = tmp_path / "ref"
    _train(ref, tiny_shards, "--train.steps", "4", "--train.save_interval", "2", "--train.keep_last", "4")
    ckpt_bytes = sum(p.stat().st_size for p in (ref / "checkpoints" / "step-00000002").iterdir())
    size_kib = (2 * 2**20 + ckpt_bytes * 3 // 2) // 1024
    with _tmpfs(tmp_path / "small", f"size={size_kib}k") as small:
        run = small / "run"
        proc = _train(run, tiny_shards, "--train.steps", "4", "--train.save_interval", "2",
                      "--train.keep_last", "4", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [x for x in proc.stderr.splitlines() if x.strip()]
        assert len(errors) == 1 and "no space left on device" in errors[0], proc.stderr[-3000:]
        assert str(run / "checkpoints" / ".tmp-step-00000004") in errors[0]
        assert not list((run / "checkpoints").glob(".tmp-*"))
        verify_checkpoint(run / "checkpoints" / "step-00000002")  # the previous checkpoint is intact
        shutil.copytree(run, tmp_path / "moved")
    _train(tmp_path / "moved", tiny_shards, "--train.steps", "4", "--train.save_interval", "2",
           "--train.keep_last", "4", "--train.resume", "auto")
    last = [r for r in _rows(tmp_path / "moved") if r["kind"] == "train"][-1]
    assert last == [r for r in _rows(ref) if r["kind"] == "train"][-1] and math.isfinite(last["train/loss"])
