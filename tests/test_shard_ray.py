"""`alpro shard --distributor ray` on a local Ray cluster (2 CPUs on 127.0.0.1, started and stopped here):
the bytes equal a local build, a Ray worker killed mid-build costs a retry and nothing else, and a restarted
build resumes after the complete shards."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import media_factory as mf
import psutil
import pytest
from shard_files import shard_set_bytes

from alpro.sharding.shard import shard_manifest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow  # starts a Ray cluster (~10 s) and transcodes

FAST = {"progress": False, "shard_size": 3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """14 rows: 11 clips, a missing file, a repeated id and a repeated source (rejects inside slices)."""
    d = tmp_path_factory.mktemp("raycorpus")
    rows = []
    for i in range(11):
        mf.make_video(d / f"v{i}.mp4", seed=i, seconds=2.0, width=96, height=64)
        rows.append({"id": f"v{i}", "video": f"v{i}.mp4", "caption": f"clip {i}"})
    rows.insert(4, {"id": "gone", "video": "gone.mp4", "caption": "missing file"})
    rows.insert(7, {"id": "v1", "video": "v2.mp4", "caption": "repeated id"})
    rows.append({"id": "again", "video": "v3.mp4", "caption": "repeated bytes"})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def local_build(corpus, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "out"
    shard_manifest(corpus / "m.jsonl", out, **FAST)
    return shard_set_bytes(out)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_ray_build_is_byte_identical_to_the_local_build(cluster, corpus, local_build, tmp_path):
    summary = shard_manifest(corpus / "m.jsonl", tmp_path / "out", distributor="ray", **FAST)
    assert summary.inputs == 14 and summary.rejected == 3 and summary.shards == 4
    got = shard_set_bytes(tmp_path / "out")
    assert sorted(got) == sorted(local_build)
    assert [n for n in got if got[n] != local_build[n]] == []


def _kill_one_task(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray worker seen running a slice (its process title is ``ray::_transcode_slice``)."""
    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith("ray::_transcode_slice"):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return
        time.sleep(0.01)


def test_a_killed_ray_worker_is_retried_and_the_bytes_do_not_change(cluster, corpus, local_build, tmp_path):
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_task, args=(stop, killed), daemon=True)
    killer.start()
    try:
        shard_manifest(corpus / "m.jsonl", tmp_path / "out", distributor="ray", **FAST)
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray worker was seen running a slice"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    got = shard_set_bytes(tmp_path / "out")
    assert sorted(got) == sorted(local_build)
    assert [n for n in got if got[n] != local_build[n]] == []


def test_a_restarted_ray_build_skips_complete_shards(cluster, corpus, local_build, tmp_path):
    out = tmp_path / "out"
    shard_manifest(corpus / "m.jsonl", out, distributor="ray", **FAST)
    (out / "shard-000002_stats.json").unlink()  # shard 2 unfinished: 0 and 1 are complete, 2 and 3 are rebuilt
    (out / "index.json.zst").unlink()
    summary = shard_manifest(corpus / "m.jsonl", out, distributor="ray", **FAST)
    assert summary.resumed_shards == 2
    got = shard_set_bytes(out)
    assert sorted(got) == sorted(local_build)
    assert [n for n in got if got[n] != local_build[n]] == []


def test_the_command_line_takes_the_distributor_and_records_nothing_of_it():
    from alpro.config import parse_command
    from alpro.sharding.shard import ShardCommand

    cmd = parse_command(ShardCommand, ["m.jsonl", "out", "--distributor", "ray", "--ray-address", "auto"], prog="x")
    assert (cmd.options.distributor, cmd.options.ray_address) == ("ray", "auto")
    assert "distributor" not in cmd.options.output_options() and "ray_address" not in cmd.options.output_options()


def test_alpro_shard_joins_a_running_cluster_by_address(cluster, corpus, local_build, tmp_path):
    """The real command line, as a user runs it next to a cluster: ``--distributor ray --ray-address HOST:PORT``."""
    from cli_helpers import run_cli

    address = ray.get_runtime_context().gcs_address
    out = tmp_path / "out"
    proc = run_cli("shard", str(corpus / "m.jsonl"), str(out), "--distributor", "ray", "--ray-address", address,
                   "--shard-size", "3", "--no-progress")
    assert "14 inputs -> 11 samples in 4 shard(s)" in proc.stdout
    got = shard_set_bytes(out)
    assert sorted(got) == sorted(local_build) and [n for n in got if got[n] != local_build[n]] == []
