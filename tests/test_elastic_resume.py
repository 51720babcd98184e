"""Elastic resume of the model and optimizer (issue 12.2): a ZeRO checkpoint saved by 2 processes resumes on 1
through DeepSpeed's universal checkpoint, converted by the trainer (alpro/train/checkpoint.py), and the run
continues: same lr schedule, Adam step count, samples, and losses within float tolerance of the uninterrupted
2-process run.

How the two runs are made comparable: the global batch stays 8 (2 processes x ``data.batch_size`` 4 -> 1 process x
4 x ``train.grad_accum`` 2; the loader refuses another per-rank batch size), on the QA stage (cross-entropy: each
sample's loss does not depend on the rest of its batch, unlike VTC's in-batch negatives) with dropout and
stochastic depth off (their random streams are per rank and cannot be re-split). Then the 1-process run's two
micro-batches of a step are the two ranks' batches of the same step, and its gradient is their average.
Tests record every micro-batch's keys and loss with the test-side probe ``ALPRO_FAULT_RECORD`` (tests/faults).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, fault_env

QA = REPO / "launch" / "configs" / "debug" / "qa.yaml"
STEPS, KILL_AT = 4, 2
NO_DROPOUT = ("--model.vision.drop_path_rate", "0", "--model.text.hidden_dropout", "0",
              "--model.text.attention_dropout", "0")


def train(run: Path, shards, *extra: str, nproc: int, env: dict | None = None, check: bool = True):
    args = ["--config", str(QA), "--init.weights", "null", "--train.run_dir", str(run),
            "--data.train.video", str(shards["train_video"]), "--data.test.video", str(shards["test_video"]),
            "--train.steps", str(STEPS), "--train.save_interval", str(KILL_AT), "--train.log_interval", "1",
            *NO_DROPOUT, *extra]
    launcher = [sys.executable, "-m", "alpro", "train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m",
        "alpro.train"]
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


def recorded(folder: Path, rank: int) -> dict[int, list[tuple[list[tuple[str, str]], float]]]:
    """step -> [(samples, loss) of each micro-batch], a sample being (clip key, question), from the probe's lines
    (samples then loss, in order)."""
    out: dict[int, list] = {}
    keys = None
    for line in (folder / f"rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "keys" in row:
            keys = list(zip(row["keys"], row["texts"]))
        else:
            out.setdefault(row["step"], []).append((keys, row["loss"]))
    return out


def adam_step(ckpt: Path) -> float:
    """Adam's step count in a ZeRO-1/2 checkpoint (rank 0's optimizer file), read weights-only."""
    from alpro.train.checkpoint import restricted_unpickling

    with restricted_unpickling():
        sd = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu")
    return float(sd["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["step"])


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 2-process ZeRO-2 run, and the same run killed (SIGKILL) right after its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("elastic")
    out = {"root": root, "ref": root / "ref", "killed": root / "killed"}
    train(out["ref"], tiny_shards, nproc=2, env=fault_env(RECORD=root / "rec-ref"))
    proc = train(out["killed"], tiny_shards, nproc=2, check=False,
                 env=fault_env(KILL_AFTER_SAVE=KILL_AT, RECORD=root / "rec-killed"))
    assert proc.returncode != 0, "the run was not killed"
    assert (out["killed"] / "checkpoints" / f"step-{KILL_AT:08d}" / "manifest.json").is_file()
    assert not (out["killed"] / "final").exists()
    return out


def test_killed_two_process_run_resumes_on_one_process(runs, tiny_shards):
    run, rec = runs["root"] / "one", runs["root"] / "rec-one"
    shutil.copytree(runs["killed"], run)
    train(run, tiny_shards, "--train.resume", "auto", "--train.grad_accum", "2", nproc=1, env=fault_env(RECORD=rec))
    log = (run / "train.log").read_text()
    assert "elastic resume (world size 2 -> 1): converted step-00000002" in log
    assert "global batch 8 -> 8" in log and "world 1" in log
    universal = run / "checkpoints" / "universal" / f"step-{KILL_AT:08d}"
    assert (universal / "manifest.json").is_file() and (universal / "zero").is_dir()
    assert json.loads((universal / "source.json").read_text())["tag"] == universal.name

    ref, got = metrics(runs["ref"]), metrics(run)
    assert sorted(got) == list(range(1, STEPS + 1))  # steps 1-2 of the killed run, then 3-4 resumed
    for step in range(KILL_AT + 1, STEPS + 1):
        assert got[step]["train/lr"] == ref[step]["train/lr"], step  # the schedule continues
        assert got[step]["samples"] == ref[step]["samples"], step  # 8 samples per step, counted globally
        assert got[step]["train/grad_norm"] == pytest.approx(ref[step]["train/grad_norm"], rel=1e-4), step
    assert adam_step(run / "checkpoints" / f"step-{STEPS:08d}") == adam_step(
        runs["ref"] / "checkpoints" / f"step-{STEPS:08d}")  # Adam's count continued (4 + 2 zero-gradient steps)

    # Data: the 1-process step = the two ranks' batches of that step, in rank order; nothing lost, nothing twice.
    ref0, ref1 = recorded(runs["root"] / "rec-ref", 0), recorded(runs["root"] / "rec-ref", 1)
    one = recorded(rec, 0)
    assert sorted(one) == list(range(KILL_AT + 1, STEPS + 1))
    for step in one:
        assert [samples for samples, _ in one[step]] == [ref0[step][0][0], ref1[step][0][0]], step
        # Model + optimizer: each micro-batch's loss is the matching rank's (fp32; the first resumed step runs on
        # the restored weights, the next after one update whose gradient sums in another order).
        for (_, loss), ref_loss in zip(one[step], (ref0[step][0][1], ref1[step][0][1])):
            assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), step
    killed = [recorded(runs["root"] / "rec-killed", r) for r in (0, 1)]
    before = [s for r in killed for step in range(1, KILL_AT + 1) for s in r[step][0][0]]
    after = [s for step in one for samples, _ in one[step] for s in samples]
    assert len(before) == len(after) == 8 * KILL_AT and len(set(before + after)) == 8 * STEPS

    from safetensors.torch import load_file

    final, ref_final = load_file(str(run / "final" / "model.safetensors")), load_file(
        str(runs["ref"] / "final" / "model.safetensors"))
    assert set(final) == set(ref_final)
    for name, tensor in final.items():
        torch.testing.assert_close(tensor, ref_final[name], rtol=1e-4, atol=1e-6, msg=name)


def test_same_world_through_the_universal_checkpoint_is_exact(runs, tiny_shards):
    """``train.elastic universal`` on the same 2 processes: the conversion round trip loses nothing, bit for bit."""
    run = runs["root"] / "universal2"
    shutil.copytree(runs["killed"], run)
    train(run, tiny_shards, "--train.resume", "auto", "--train.elastic", "universal", nproc=2)
    assert "elastic resume (train.elastic is universal)" in (run / "train.log").read_text()
    ref, got = metrics(runs["ref"]), metrics(run)
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        assert {s: r[key] for s, r in got.items()} == {s: r[key] for s, r in ref.items()}, key


# ------------------------------------------------------------------------------------- in-process, no trainer


def _ckpt_copy(runs, dst: Path) -> Path:
    ckpt = dst / "checkpoints" / f"step-{KILL_AT:08d}"
    shutil.copytree(runs["killed"] / "checkpoints" / ckpt.name, ckpt)
    return ckpt


def test_elastic_plan_decides_when_to_convert(tmp_path):
    from alpro.errors import AlproError
    from alpro.train.checkpoint import elastic_plan, saved_topology

    ckpt = tmp_path / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 2}))
    (ckpt / "config.yaml").write_text("train:\n  zero_stage: 3\n")
    assert saved_topology(ckpt) == (2, 3)  # saved before trainer states recorded the stage: from config.yaml
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 2, "zero_stage": 2}))
    assert saved_topology(ckpt) == (2, 2)
    assert elastic_plan(ckpt, 2, 2, "auto") is None  # as saved: the exact path
    assert elastic_plan(ckpt, 1, 2, "auto") == "world size 2 -> 1"
    assert elastic_plan(ckpt, 2, 1, "auto") == "ZeRO stage 2 -> 1"
    assert elastic_plan(ckpt, 2, 2, "universal") == "train.elastic is universal"
    with pytest.raises(AlproError, match="saved with 2 processes at ZeRO-2, this run has 1 at ZeRO-2 and "
                                         "train.elastic is never"):
        elastic_plan(ckpt, 1, 2, "never")
    with pytest.raises(AlproError, match="resume it with --train.zero_stage 2"):
        elastic_plan(ckpt, 1, 0, "auto")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["zero_stage"] = 0  # ZeRO-0 keeps one optimizer state: any world size, no conversion
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert elastic_plan(ckpt, 1, 0, "auto") is None and elastic_plan(ckpt, 3, 0, "never") is None


def test_conversion_is_atomic_reused_and_redone_for_another_checkpoint(runs, tmp_path):
    from alpro.train.checkpoint import UNIVERSAL_SOURCE, convert_to_universal, verify_checkpoint

    ckpt = _ckpt_copy(runs, tmp_path)
    out, made = convert_to_universal(ckpt)
    assert made and out == ckpt.parent / "universal" / ckpt.name
    verify_checkpoint(out)  # its own manifest; every .pt passes the weights-only allowlist
    assert sorted(p.name for p in out.parent.iterdir()) == [ckpt.name]  # no .tmp-*, no latest_universal
    assert convert_to_universal(ckpt) == (out, False)
    # the same tag now names another checkpoint (a re-saved step): the old conversion is not reused
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))
    source_before = (out / UNIVERSAL_SOURCE).read_text()
    assert convert_to_universal(ckpt) == (out, True) and (out / UNIVERSAL_SOURCE).read_text() != source_before


def test_conversion_reads_every_file_weights_only(runs, tmp_path):
    """ds_to_universal's own ``torch.load(weights_only=False)`` runs under the allowlist: a ZeRO file whose pickle
    runs a command is refused by name, and the command never runs."""
    from alpro.train.checkpoint import UnsafeCheckpoint, convert_to_universal

    marker = tmp_path / "PWNED"
    ckpt = _ckpt_copy(runs, tmp_path)
    target = ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _RunsACommand(marker)}, target)
    with pytest.raises(UnsafeCheckpoint, match="refused: its pickle wants posix.system") as e:
        convert_to_universal(ckpt)
    assert "\n" not in str(e.value) and str(ckpt) in str(e.value)
    assert not marker.exists(), "unpickling ran the command"
    assert not (ckpt.parent / "universal" / ckpt.name).exists()
    assert not list((ckpt.parent / "universal").glob(".tmp-*"))


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
