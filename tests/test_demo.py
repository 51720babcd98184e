"""`alpro demo` end to end at a toy scale: every step through the real CLI, the results table with each question
type's chance and majority, the 'what was learned' plot, and a second call that skips every finished step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~4 min on two free cores; every stage is a torchrun or CLI start
def test_demo_end_to_end_at_toy_scale(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "alpro", "demo", "--out", str(out), "--num-clips", "180", "--scale", "0.04"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert "(lavis protocol) | R@1 |" in table
    for qtype in ("background", "color", "count", "direction", "shape"):
        assert f" {qtype} questions | accuracy |" in table and "(chance)" in table and "(majority)" in table
    report = json.loads((out / "report.json").read_text())
    assert set(report["retrieval"]) == {"vtc", "lavis"}
    assert set(report["retrieval"]["lavis"]) == {"color", "shape", "count", "motion", "background", "clip (R@1)"}
    assert (out / "learned.png").read_bytes()[:4] == b"\x89PNG"
    # The training runs skipped their end-of-run evaluation; the eval steps scored the test split instead.
    assert not any(json.loads(line).get("kind") == "eval"
                   for line in (out / "runs" / "qa" / "metrics.jsonl").read_text().splitlines())
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done, skipped") == 11
