"""The slow rule of tests/conftest.py: what counts as spawning the trainer, torchrun, the demo or the sharder, and
what does not (in-process entry points stay fast)."""

from __future__ import annotations

import pytest
from conftest import _ARGV_SPAWNS, SPAWNS


def _kinds(source: str) -> set[str]:
    return {kind for kind, pattern in SPAWNS if pattern.search(source)}


@pytest.mark.parametrize("source, kind", [
    ('run_cli("train", "--config", cfg)', "trainer"),
    ("[sys.executable, '-m', 'alpro', 'demo', '--out', out]", "trainer"),
    ('[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "alpro.train"]', "torchrun"),
    ('subprocess.run(["bash", "launch/deepspeed.sh"])', "torchrun"),
    ("mp.spawn(_rank, nprocs=2)", "torchrun"),
    ('run_cli("shard", manifest, out)', "sharder"),
    ('[sys.executable, "-m", "alpro.sharding.shard", manifest]', "sharder"),
])
def test_spawn_signatures_are_recognised(source, kind):
    assert kind in _kinds(source)


@pytest.mark.parametrize("source", [
    'main(["train", "--config", cfg, "--print-config"])',  # the CLI entry point, in-process
    'load_run_config(cfg, ["--train.steps", "2"])',
    'run_cli("synth", out, "--num-clips", "4")',
    '{"split": "train", "media": "video"}',
])
def test_in_process_calls_are_not_spawns(source):
    assert not _kinds(source)


LAUNCHER = "torch.distributed" + ".run"  # split: this test only reads the name, it starts nothing


def test_the_run_time_backstop_reads_command_lines():
    assert _ARGV_SPAWNS.search("/venv/bin/python -m alpro shard m.jsonl out")
    assert _ARGV_SPAWNS.search(f"/venv/bin/python -m {LAUNCHER} --standalone -m alpro.train")
    assert not _ARGV_SPAWNS.search("/venv/bin/python -m alpro synth out")
    assert not _ARGV_SPAWNS.search("/venv/bin/python -m alpro --version")
