"""kill -9 a real `alpro shard` mid-build, rerun it, and get the same bytes as an uninterrupted build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import media_factory as mf
import pytest

from alpro.sharding.shard import shard_manifest
from alpro.sharding.writer import shard_is_complete


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.suffix in (".tar", ".idx") or p.name in ("index.json.zst", "sizes.json", "rejects.jsonl")}


@pytest.mark.slow
def test_kill_9_mid_build_then_resume_is_byte_identical(tmp_path):
    clips = mf.corpus(tmp_path / "media", 36, seconds=1.0)
    rows = [{"id": p.stem, "video": str(p), "caption": f"clip {i}"} for i, p in enumerate(clips)]
    rows.insert(5, {"id": "gone", "video": str(tmp_path / "media" / "gone.mp4"), "caption": "missing file"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = tmp_path / "reference"
    shard_manifest(manifest, reference, shard_size=2, progress=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "alpro", "shard", str(manifest), str(out), "--shard-size", "2", "--workers", "2",
           "--no-progress"]
    # Own session: the kill takes the worker processes too, as a preempted SLURM job would.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "shard-000002_stats.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / "index.json.zst").exists()

    # Whatever has a final name is complete: every tar reads to its end, every stats file matches its tar.
    for tar_path in out.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            assert len(tar.getmembers()) % 4 == 0
        stem = tar_path.name[: -len(".tar")]
        if (out / f"{stem}_stats.json").exists():
            assert shard_is_complete(out, stem) is not None
    done_before = sorted(p.name for p in out.glob("*_stats.json"))
    assert 3 <= len(done_before) < 18

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done_before)} shard(s) resumed" in rerun.stdout
    assert _outputs(out) == _outputs(reference)
    assert not list(out.glob(".*.tmp"))
