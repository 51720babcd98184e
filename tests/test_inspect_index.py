"""`alpro inspect` through the index (issue 16.8): the report of the walk over every tar, without reading a tar
header; a tar that no longer matches its index entry is walked (a cut is still reported)."""

from __future__ import annotations

import json
from pathlib import Path

import media_factory as mf
import pytest

from alpro.sharding import inspect as inspect_mod
from alpro.sharding.inspect import inspect_shards
from alpro.sharding.shard import shard_manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inspect-index")
    rows = []
    for i in range(5):
        mf.make_video(d / f"v{i}.mp4", seed=i, seconds=1.0 + i / 2)
        rows.append({"id": f"v{i}", "video": f"v{i}.mp4", "captions": ["a", "b"][: 1 + i % 2]})
    for i in range(2):
        mf.make_image(d / f"p{i}.jpg", width=80, height=60, seed=10 + i)
        rows.append({"id": f"p{i}", "image": f"p{i}.jpg", "caption": "an image"})
    rows.append({"id": "gone", "video": "gone.mp4", "caption": "missing"})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shard_manifest(d / "m.jsonl", d / "out", shard_size=3, progress=False)
    return d / "out"


def _walked(target, monkeypatch) -> dict:
    with monkeypatch.context() as m:
        m.setattr(inspect_mod, "_index_entries", lambda tars: {})
        return inspect_shards(target)


def test_the_index_gives_the_report_of_the_walk_without_reading_a_tar_header(shards, monkeypatch):
    walked = _walked(shards, monkeypatch)
    pattern = str(shards / "shard-00000[01].tar")
    walked_two = _walked(pattern, monkeypatch)
    assert walked["samples"] == 7 and walked["rejects"] == {"missing": 1}

    def no_walk(*a, **k):
        raise AssertionError("a tar was walked")

    monkeypatch.setattr(inspect_mod, "_iter_members", no_walk)
    assert inspect_shards(shards) == walked
    assert inspect_shards(pattern) == walked_two


def test_a_tar_that_no_longer_matches_its_index_is_walked(shards, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(shards, out)
    tar = out / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])  # cut inside its first sample's media
    report = inspect_shards(out)
    assert report == _walked(out, monkeypatch)
    assert report["truncated"] and report["truncated"][0]["file"] == str(tar)
