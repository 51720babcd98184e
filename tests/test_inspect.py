"""`alpro inspect`: directory / glob / brace inputs, histograms, rejects, --json, --extract, foreign shards."""

from __future__ import annotations

import json
from pathlib import Path

import media_factory as mf
import pytest
import webdataset as wds

from alpro.errors import AlproError
from alpro.sharding.inspect import inspect_shards, main, resolve_shards
from alpro.sharding.shard import shard_manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inspect")
    rows = [{"id": f"v{i}", "video": str(mf.make_video(d / f"v{i}.mp4", seed=i, seconds=1 + i, fps=24 + 6 * (i % 2))),
             "caption": [f"clip {i}", "again"]} for i in range(3)]
    rows += [{"id": "img", "image": str(mf.make_image(d / "i.jpg", width=96, height=64)), "caption": "image"},
             {"id": "gone", "video": str(d / "gone.mp4"), "caption": "missing"}]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shard_manifest(d / "m.jsonl", d / "out", shard_size=2, progress=False)
    return d / "out"


def test_summary_of_a_directory(shards):
    r = inspect_shards(shards)
    assert (r["shards"], r["samples"], r["media"]) == (2, 4, {"video": 3, "image": 1})
    assert r["frames"] == 24 + 60 + 72 and r["duration_s"] == pytest.approx(6.0)
    assert r["captions"] == 7 and r["codecs"] == {"h264": 3, "jpeg": 1}
    assert r["resolutions"] == {"64x48": 3, "96x64": 1}
    assert r["fps"] == {"24": 2, "30": 1}
    assert r["durations"] == {"1-2 s": 1, "2-5 s": 2}
    assert r["members"] == {"jpg": 1, "json": 4, "mp4": 3, "txt": 4, "vinfo": 4}
    assert r["rejects"] == {"missing": 1}
    assert r["bytes"]["total"] == sum(p.stat().st_size for p in shards.glob("*.tar"))


def test_glob_brace_and_single_file_select_the_same_shards(shards):
    both = [shards / "shard-000000.tar", shards / "shard-000001.tar"]
    assert resolve_shards(shards) == both
    assert resolve_shards(f"{shards}/shard-*.tar") == both
    assert resolve_shards(f"{shards}/shard-{{000000..000001}}.tar") == both
    assert resolve_shards(both[1]) == both[1:]
    assert inspect_shards(both[1])["samples"] == 2
    with pytest.raises(AlproError, match="do not exist"):
        resolve_shards(f"{shards}/shard-{{000000..000005}}.tar")
    with pytest.raises(AlproError, match="no such shard"):
        resolve_shards(shards / "nope.tar")


def test_cli_text_json_and_extract(shards, tmp_path, capsys):
    assert main([str(shards)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("2 shard(s), 4 sample(s) (3 videos, 1 images)") and "missing" in text
    assert main([f"{shards}/*.tar", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 4
    assert main([str(shards), "--extract", "v1", "--to", str(tmp_path / "x")]) == 0
    written = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert written == ["v1.json", "v1.mp4", "v1.txt", "v1.vinfo"]
    assert json.loads((tmp_path / "x" / "v1.json").read_text())["captions"] == ["clip 1", "again"]
    assert main([str(shards), "--extract", "nope"]) == 2
    assert capsys.readouterr().err.strip() == f"alpro inspect: error: no sample with key 'nope' in {shards}"
    assert main([]) == 2


def test_foreign_shards_without_our_metadata(tmp_path):
    clip = mf.make_video(tmp_path / "c.mp4").read_bytes()
    with wds.TarWriter(str(tmp_path / "foreign-000000.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:05d}", "mp4": clip, "txt": "a caption", "json": {"url": "http://x"}})
    r = inspect_shards(tmp_path / "foreign-000000.tar")
    assert (r["samples"], r["samples_without_metadata"], r["media"]) == (3, 3, {})
    assert r["members"] == {"json": 3, "mp4": 3, "txt": 3}
