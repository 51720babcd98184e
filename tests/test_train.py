"""The training system end to end through the real CLI: every stage, ZeRO stages, torchrun on one and two
(simulated) nodes, DeepSpeed's launcher, exact resume after kill -9, kill during a save, non-finite guards,
export, golden losses, search and classify.

Everything runs the ``debug`` preset on the session's tiny shapes-world shards (conftest.py), on CPU with gloo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, fault_env, run_cli

CONFIGS = REPO / "launch" / "configs" / "debug"
GOLDEN = REPO / "tests" / "data" / "golden_debug_losses.json"


def data_args(shards: dict[str, Path]) -> list[str]:
    return ["--data.train.video", str(shards["train_video"]), "--data.train.image", str(shards["train_image"]),
            "--data.test.video", str(shards["test_video"])]


def trainer_cmd(stage: str, run_dir: Path, shards, *extra: str, nproc: int = 1) -> list[str]:
    args = ["--config", str(CONFIGS / f"{stage}.yaml"), "--train.run_dir", str(run_dir), *data_args(shards), *extra]
    if nproc == 1:
        return [sys.executable, "-m", "alpro", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "alpro.train", *args]


def train(stage: str, run_dir: Path, shards, *extra: str, nproc: int = 1, env: dict | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(trainer_cmd(stage, run_dir, shards, *extra, nproc=nproc), capture_output=True, text=True,
                          cwd=REPO, timeout=600, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "train" and key in row:
            out[row["step"]] = row[key]  # a step logged twice (resume) keeps the last value
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ the four stages


@pytest.fixture(scope="module")
def stages(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    """prompter (1 process) -> pretrain (2 processes, ZeRO-2) -> retrieval and QA fine-tuning (1 process)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {name: root / name for name in ("prompter", "pretrain", "retrieval", "qa")}
    train("prompter", runs["prompter"], tiny_shards)
    prompter = runs["prompter"] / "final" / "model.safetensors"
    train("pretrain", runs["pretrain"], tiny_shards, "--init.prompter", str(prompter),
          "--init.entities", str(tiny_shards["entities"]), nproc=2)
    pretrained = str(runs["pretrain"] / "final" / "model.safetensors")
    train("retrieval", runs["retrieval"], tiny_shards, "--init.weights", pretrained)
    train("qa", runs["qa"], tiny_shards, "--init.weights", pretrained, "--data.train.image", "null")
    return runs


def test_every_stage_writes_a_complete_run(stages):
    for name, run in stages.items():
        for item in ("config.yaml", "git_sha.txt", "train.log", "metrics.jsonl", "final/model.safetensors",
                     "final/config.yaml", "final/tokenizer", "plots/losses.png", "plots/lr.png",
                     "plots/throughput.png", "checkpoints/latest"):
            assert (run / item).exists(), f"{name}: missing {item}"
        curve = losses(run)
        assert sorted(curve) == [2, 4, 6] and all(map(lambda v: v == v and abs(v) < 1e4, curve.values())), name
    assert (stages["qa"] / "final" / "answer_vocab.json").is_file()
    assert (stages["pretrain"] / "final" / "entities.txt").is_file()


def test_pretraining_logs_all_four_losses_and_progress(stages):
    rows = [json.loads(x) for x in (stages["pretrain"] / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    for key in ("train/loss_vtc", "train/loss_vtm", "train/loss_mlm", "train/loss_pem", "train/lr",
                "train/grad_norm", "throughput/clips_per_s", "throughput/clips_per_s_per_rank",
                "throughput/data_wait", "memory/peak_gb"):
        assert key in train_rows[-1], key
    log = (stages["pretrain"] / "train.log").read_text()
    assert "world 2" in log and "ZeRO-2" in log
    assert "step 6/6 | vtc" in log and "clips/s" in log and "eta" in log and "done: 6 steps" in log
    # the zero-shot retrieval evaluation at the end, with chance levels and both protocols
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and {"val/chance_r1", "val/original_t2v_r1", "val/lavis_t2v_r1"} <= set(evals[-1])


def test_prompter_is_frozen_and_only_the_trainer_sees_trainable_weights(stages):
    from safetensors import safe_open

    with safe_open(str(stages["prompter"] / "final" / "model.safetensors"), "pt") as f:
        prompter_temp = f.get_tensor("temp")
    with safe_open(str(stages["pretrain"] / "final" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("prompter.temp"), prompter_temp)  # 6 steps later, unchanged
        assert "prompter.video_prompt_feat" in f.keys()


def test_eval_cli_retrieval_and_qa(stages, tiny_shards, tmp_path):
    out = tmp_path / "zs.json"
    run_cli("eval", str(stages["pretrain"]), "--task", "retrieval", "--split", "test", "--protocol", "both",
            "--out", str(out))
    res = json.loads(out.read_text())
    assert res["n_videos"] == sum(json.loads((tiny_shards["test_video"] / "sizes.json").read_text()).values())
    assert {"original_t2v_r1", "lavis_t2v_r1", "lavis_v2t_r10", "vtc_t2v_medr", "chance_r1"} <= set(res)
    assert 0 <= res["lavis_t2v_r1"] <= 100 and res["chance_r1"] == pytest.approx(100 / res["n_videos"])
    out = tmp_path / "qa.json"
    run_cli("eval", str(stages["qa"]), "--split", "test", "--out", str(out))
    res = json.loads(out.read_text())
    assert {"acc", "majority_acc", "acc_color", "acc_count"} <= set(res) and res["n"] > 0


def test_export_consolidates_zero_shards(stages, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "exported.safetensors"
    run_cli("export", str(stages["pretrain"]), "--out", str(out))
    exported = load_file(str(out))
    final = load_file(str(stages["pretrain"] / "final" / "model.safetensors"))
    shared = set(exported) & set(final)
    assert len(shared) >= len(final) - 1  # the final file stores tied weights once
    for k in shared:
        assert torch.equal(exported[k], final[k]), k


def test_search_and_classify_on_a_trained_checkpoint(stages, tiny_shards, tmp_path):
    index = tmp_path / "index"
    run_cli("index", str(tiny_shards["test_video"]), "--run", str(stages["pretrain"]), "--out", str(index))
    meta = json.loads((index / "meta.json").read_text())
    keys = json.loads((index / "keys.json").read_text())
    assert meta["num_clips"] == len(keys["keys"]) > 0
    query = keys["captions"][0][0]
    proc = run_cli("search", query, "--index", str(index), "--top-k", "3", "--json", "--sheet", str(tmp_path / "s.png"))
    hits = json.loads(proc.stdout[: proc.stdout.rindex("]") + 1])
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["score"] == pytest.approx(h["vtm_logit"] + h["cosine"], abs=1e-4) for h in hits)
    from PIL import Image

    with Image.open(tmp_path / "s.png") as im:
        assert im.size[1] > 3 * 96
    out = tmp_path / "labels.jsonl"
    run_cli("classify", "--index", str(index), "--top", "2", "--out", str(out))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == meta["num_clips"] and all(len(r["labels"]) == 2 for r in rows)
    assert all(r["scores"][0] >= r["scores"][1] for r in rows)


# ------------------------------------------------------------------------------------------ distributed


def test_zero_stages_agree_on_two_processes(tiny_shards, tmp_path):
    """ZeRO 0, 1 and 3 reproduce ZeRO-2's loss curve (same maths, different partitioning); bf16 follows it."""
    prompter_args = ("--train.steps", "4")
    curves = {}
    for stage in (2, 0, 1, 3):
        run = tmp_path / f"zero{stage}"
        train("prompter", run, tiny_shards, *prompter_args, "--train.zero_stage", str(stage), nproc=2)
        curves[stage] = losses(run)
    for stage in (0, 1, 3):
        for step, value in curves[2].items():
            assert curves[stage][step] == pytest.approx(value, rel=1e-4, abs=1e-5), (stage, step)
    # bf16 (DeepSpeed's bf16 optimizer, fp32 master weights) follows the fp32 curve to bf16 precision.
    run = tmp_path / "bf16"
    train("prompter", run, tiny_shards, *prompter_args, "--train.precision", "bf16", nproc=2)
    for step, value in curves[2].items():
        assert losses(run)[step] == pytest.approx(value, rel=5e-2), step


def test_two_simulated_nodes_match_one_node(tiny_shards, tmp_path):
    one = tmp_path / "one"
    train("prompter", one, tiny_shards, "--train.steps", "4", nproc=2)
    two = tmp_path / "two"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", "alpro-test", "-m", "alpro.train", "--config", str(CONFIGS / "prompter.yaml"),
               "--train.run_dir", str(two), "--train.steps", "4", *data_args(tiny_shards)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    assert "world 2" in (two / "train.log").read_text()
    assert losses(two) == pytest.approx(losses(one), rel=1e-6)


def test_deepspeed_launcher_and_torchrun_script(tiny_shards, tmp_path):
    env = {**os.environ, "CONFIG": str(CONFIGS / "prompter.yaml"), "NPROC": "2", "PY": sys.executable,
           "MASTER_PORT": str(free_port())}
    for script, run in (("launch/deepspeed.sh", tmp_path / "ds"), ("launch/torchrun.sh", tmp_path / "tr")):
        proc = subprocess.run(["bash", script, "--train.run_dir", str(run), "--train.steps", "2",
                               "--train.log_interval", "1", *data_args(tiny_shards)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "world 2" in (run / "train.log").read_text() and len(losses(run)) == 2


# ------------------------------------------------------------------------------------------ resume


def _kill_after_checkpoint(stage: str, run: Path, shards, *extra: str, nproc: int, step: int) -> None:
    """Train, and SIGKILL every training process right after checkpoint ``step`` is complete (the trainer's
    KILL_AFTER_SAVE test hook, tests/faults: deterministic, unlike racing a fast run from outside)."""
    proc = train(stage, run, shards, *extra, nproc=nproc, env=fault_env(KILL_AFTER_SAVE=step),
                 check=False)
    assert proc.returncode != 0, "the run was not killed"
    assert (run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").is_file()


@pytest.mark.parametrize("nproc", [1, 2], ids=["fp32-1proc", "zero2-2proc"])
def test_kill9_then_resume_gives_the_same_loss_curve(tiny_shards, tmp_path, nproc):
    extra = ("--train.steps", "8", "--train.save_interval", "2", "--train.log_interval", "1")
    ref = tmp_path / "ref"
    train("prompter", ref, tiny_shards, *extra, nproc=nproc)
    run = tmp_path / "killed"
    _kill_after_checkpoint("prompter", run, tiny_shards, *extra, nproc=nproc, step=4)
    assert not (run / "final").exists() and len(losses(run)) == 4
    train("prompter", run, tiny_shards, *extra, "--train.resume", "auto", nproc=nproc)
    assert "resuming from" in (run / "train.log").read_text()
    assert losses(run) == losses(ref)  # bit-identical: same batches, RNG, optimizer state
    assert losses(run, "train/grad_norm") == losses(ref, "train/grad_norm")


def test_kill_during_save_leaves_previous_checkpoint_loadable(tiny_shards, tmp_path):
    extra = ("--train.steps", "6", "--train.save_interval", "2", "--train.log_interval", "1")
    run = tmp_path / "run"
    proc = train("prompter", run, tiny_shards, *extra, env=fault_env(KILL_IN_SAVE=4), check=False)
    assert proc.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert (ckpts / ".tmp-step-00000004").is_dir() and not (ckpts / "step-00000004").exists()
    train("prompter", run, tiny_shards, *extra, "--train.resume", "auto")
    ref = tmp_path / "ref"
    train("prompter", ref, tiny_shards, *extra)
    assert losses(run) == losses(ref)
    assert not list(ckpts.glob(".tmp-*"))  # cleaned up by the next save


# ------------------------------------------------------------------------------------------ guards


def test_refuses_to_overwrite_a_run(stages, tiny_shards):
    proc = train("prompter", stages["prompter"], tiny_shards, check=False)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "--train.resume auto" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override, message", [
    (["--optim.lrr", "1"], "unknown key 'optim.lrr' (did you mean 'lr'?)"),
    (["--train.steps", "ten"], "'train.steps' must be int"),
    (["--data.train.video", "/nonexistent/shards"], "data.train.video: no shard matches '/nonexistent/shards'"),
    (["--init.prompter", "/nonexistent/p.safetensors"], "init.prompter: /nonexistent/p.safetensors does not exist"),
    (["--train.zero_stage", "5"], "zero_stage must be 0-3"),
    (["--data.frame_size", "64", "--data.resize", "72"], "data.frame_size (64) must equal model.vision.image_size (32)"),
])
def test_bad_config_is_one_clear_line(tiny_shards, tmp_path, capsys, override, message):
    """Checked in-process, before any process group: the real CLI entry point, exit status 2, one line."""
    from alpro.cli import main

    args = ["train", "--config", str(CONFIGS / "prompter.yaml"), "--train.run_dir", str(tmp_path / "r"),
            *data_args(tiny_shards), *override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_nonfinite_loss_stops_naming_step_and_loss(tiny_shards, tmp_path):
    proc = train("prompter", tmp_path / "stop", tiny_shards, env=fault_env(NAN="3:loss_vtc"), check=False)
    assert proc.returncode == 2
    assert "non-finite loss loss, loss_vtc at step 3" in proc.stderr
    run = tmp_path / "skip"
    train("prompter", run, tiny_shards, "--train.nan_policy", "skip", env=fault_env(NAN="3:loss_vtc"))
    assert "skipped (1/" in (run / "train.log").read_text() and sorted(losses(run)) == [2, 4, 6]


# ------------------------------------------------------------------------------------------ golden losses


def test_golden_losses_of_the_debug_preset(tiny_shards, tmp_path):
    """The debug pretrain-free prompter run must reproduce the committed loss curve (CPU fp32; different CPUs
    round differently, hence the tolerance). Regenerate with ``python tests/golden.py`` after an intended
    change of the maths or the data pipeline."""
    from golden import golden_run

    got = golden_run(tiny_shards, tmp_path / "golden")
    want = json.loads(GOLDEN.read_text())
    assert want["steps"] == sorted(got)
    for step, value in zip(want["steps"], want["loss"]):
        assert got[step] == pytest.approx(value, rel=2e-3), step
