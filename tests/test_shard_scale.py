"""The ordered writer's state at scale (issue 16.3): content dedup in sorted runs of hash prefixes (confirmed from
the shards' stats files) and finished shards' stats read back from disk give the bytes of the in-memory writer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import media_factory as mf
import pytest
from shard_files import shard_set_bytes

from alpro.sharding import shard as shard_mod
from alpro.sharding.shard import shard_manifest

ARGS = {"progress": False, "shard_size": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """9 clips, 4 of them byte copies of earlier ones (two copies of v0), spread over the shards."""
    d = tmp_path_factory.mktemp("dedup")
    for i in range(5):
        mf.make_video(d / f"v{i}.mp4", seed=i)
    for name, src in (("c0", "v0"), ("c1", "v1"), ("c2", "v0"), ("c3", "v4")):
        shutil.copyfile(d / f"{src}.mp4", d / f"{name}.mp4")
    order = ["v0", "v1", "v2", "c0", "v3", "c1", "v4", "c2", "c3"]
    (d / "m.jsonl").write_text("".join(json.dumps({"id": n, "video": f"{n}.mp4", "caption": n}) + "\n" for n in order))
    return d


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    summary = shard_manifest(corpus / "m.jsonl", out, **ARGS)
    assert summary.rejects_by_reason == {"duplicate": 4} and summary.written == 5
    return shard_set_bytes(out)


def test_dedup_in_frozen_runs_gives_the_same_bytes(corpus, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(shard_mod._Seen.__init__, "__defaults__", (1,))  # freeze after every shard
    out = tmp_path / "out"
    shard_manifest(corpus / "m.jsonl", out, **ARGS)
    assert shard_set_bytes(out) == reference
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["detail"] for r in rejects] == ["same bytes as key v0", "same bytes as key v1", "same bytes as key v0",
                                              "same bytes as key v4"]
    # resumed: the dedup state is rebuilt from the complete shards' stats, frozen, and still decides the same
    (out / "shard-000002_stats.json").unlink()
    (out / "index.json.zst").unlink()
    assert shard_manifest(corpus / "m.jsonl", out, **ARGS).resumed_shards == 2
    assert shard_set_bytes(out) == reference


def test_seen_confirms_a_prefix_match_from_the_stats(tmp_path):
    stats = {0: {"sha256": ["ab" * 32, "ab" * 8 + "cd" * 24], "keys": ["k0", "k1"]}}
    seen = shard_mod._Seen(lambda seq: stats[seq], freeze_at=1)
    seen.add("ab" * 32, "k0", 0, 0)
    seen.add("ab" * 8 + "cd" * 24, "k1", 0, 1)  # same 8-byte prefix, other bytes
    seen.maybe_freeze()
    assert seen.recent == {} and len(seen.runs) == 1
    assert seen.get("ab" * 32) == "k0" and seen.get("ab" * 8 + "cd" * 24) == "k1"
    assert seen.get("ab" * 8 + "ef" * 24) is None and seen.get("00" * 32) is None
