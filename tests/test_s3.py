"""Shards on object storage, against an S3-protocol server on 127.0.0.1 (moto's, started and stopped here:
tests/s3_server.py): the sharder reads media from and writes shards, indexes and stats to ``s3://`` with the bytes
of a local build and nothing partial under a final name; a build into s3 resumes after its complete shards; the
trainer reads the shards by URL and, killed and resumed, gives the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cli_helpers import REPO, fault_env
from s3_server import s3_server
from test_train import losses, train, trainer_cmd

from alpro.sharding.shard import shard_manifest

pytestmark = pytest.mark.slow  # starts moto's S3 server and runs the sharder (~30 s before the first test)

pytest.importorskip("s3fs")
pytest.importorskip("moto")

SETS = (("train_video", "train", "video"), ("train_image", "train", "image"), ("test_video", "test", "video"))
OPTS = {"fps": 8.0, "short_side": 40, "progress": False}  # what tests/cli_helpers.make_tiny_shards uses


@pytest.fixture(scope="module")
def s3(tiny_corpus):
    """The server, with the tiny corpus's media uploaded to s3://alpro/corpus/ (the manifest stays local)."""
    import fsspec

    with s3_server() as server:
        fs = fsspec.filesystem("s3")
        for p in sorted(tiny_corpus.rglob("*")):
            if p.is_file() and p.suffix in (".mp4", ".jpg"):
                fs.put_file(str(p), f"alpro/corpus/{p.relative_to(tiny_corpus).as_posix()}")
        yield server


def _fs():
    import fsspec

    return fsspec.filesystem("s3")


def _objects(url: str) -> dict[str, bytes]:
    """Every object under ``url`` (a ``_stats.json`` without its timing field)."""
    fs, out = _fs(), {}
    for path in sorted(fs.find(url.removeprefix("s3://"))):
        data = fs.cat_file(path)
        name = path.rsplit("/", 1)[-1]
        if name.endswith("_stats.json"):
            stats = json.loads(data)
            stats.pop("seconds")
            data = json.dumps(stats).encode()
        out[path[len(url.removeprefix("s3://")) + 1:]] = data
    return out


def _local(out: Path) -> dict[str, bytes]:
    res = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith("_stats.json"):
                stats = json.loads(data)
                stats.pop("seconds")
                data = json.dumps(stats).encode()
            res[p.relative_to(out).as_posix()] = data
    return res


@pytest.fixture(scope="module")
def s3_shards(s3, tiny_corpus) -> dict[str, str]:
    """The tiny corpus's training videos built from s3 media into s3://alpro/shards/train_video."""
    urls = {}
    for name, split, media in SETS[:1]:
        urls[name] = f"s3://alpro/shards/{name}"
        summary = shard_manifest(tiny_corpus / "manifest.jsonl", urls[name], split=split, media=media,
                                 media_root="s3://alpro/corpus", shard_size=8, **OPTS)
        assert summary.rejected == 0 and summary.index_path == f"{urls[name]}/index.json.zst"
    return urls


def test_a_build_on_s3_has_the_bytes_of_a_local_build(s3_shards, tiny_corpus, tmp_path):
    local = tmp_path / "local"
    shard_manifest(tiny_corpus / "manifest.jsonl", local, split="train", media="video", shard_size=8, **OPTS)
    remote, here = _objects(s3_shards["train_video"]), _local(local)
    shards = [n for n in here if n.endswith((".tar", ".idx", "_stats.json", "sizes.json", "rejects.jsonl"))]
    assert len([n for n in shards if n.endswith(".tar")]) >= 3
    assert {n: remote.get(n) for n in shards} == {n: here[n] for n in shards}
    assert not [n for n in remote if n.rsplit("/", 1)[-1].startswith(".")], "a temporary reached the bucket"
    # the index differs only where the options do: --media-root is recorded as given
    assert json.loads(remote["build.json"])["options"]["media_root"] == "s3://alpro/corpus"


def test_a_build_on_s3_resumes_after_its_complete_shards(s3, tiny_corpus):
    url = "s3://alpro/resume/train_video"
    args = dict(split="train", media="video", media_root="s3://alpro/corpus", shard_size=8, **OPTS)
    shard_manifest(tiny_corpus / "manifest.jsonl", url, **args)
    before = _objects(url)
    fs = _fs()
    fs.rm_file("alpro/resume/train_video/shard-000001_stats.json")  # shard 1 unfinished: 1 and on are rebuilt
    fs.rm_file("alpro/resume/train_video/index.json.zst")
    summary = shard_manifest(tiny_corpus / "manifest.jsonl", url, **args)
    assert summary.resumed_shards == 1 and summary.processed < summary.inputs
    assert _objects(url) == before


def test_media_missing_from_the_bucket_is_a_missing_reject(s3, tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "video": "videos/nope.mp4", "caption": "c"}) + "\n")
    summary = shard_manifest(tmp_path / "m.jsonl", "s3://alpro/missing", media_root="s3://alpro/corpus",
                             progress=False)
    assert summary.rejects_by_reason == {"missing": 1} and summary.written == 0


@pytest.mark.slow  # spawns the trainer three times
def test_training_from_s3_killed_and_resumed_gives_the_uninterrupted_losses(s3_shards, tiny_shards, tmp_path):
    # the training videos from the bucket; images and the held-out set (evaluation only) from the session's disk
    shards = {**tiny_shards, "train_video": f"{s3_shards['train_video']}/index.json.zst"}
    extra = ("--train.steps", "4", "--train.save_interval", "2", "--train.log_interval", "1")
    env = dict(os.environ)
    ref, run = tmp_path / "ref", tmp_path / "killed"
    # the uninterrupted run and the one killed after its step-2 checkpoint run side by side (one core each)
    procs = [subprocess.Popen(trainer_cmd("prompter", d, shards, *extra), cwd=REPO, env={**env, **e},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for d, e in ((ref, {}), (run, fault_env(KILL_AFTER_SAVE=2)))]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert procs[0].returncode == 0, outputs[0][-4000:]
    assert procs[1].returncode != 0 and (run / "checkpoints" / "step-00000002" / "trainer_state.json").is_file()
    train("prompter", run, shards, *extra, "--train.resume", "auto", env=env)
    assert "resuming from" in (run / "train.log").read_text()
    assert len(losses(ref)) == 4 and losses(run) == losses(ref)  # bit-identical


def test_two_nodes_on_s3_then_merge_index(s3, tiny_corpus):
    from alpro.sharding.index import read_json_zst
    from alpro.sharding.shard import merge_index_at

    url = "s3://alpro/nodes/train_image"
    args = dict(split="train", media="image", media_root="s3://alpro/corpus", shard_size=8, num_nodes=2, **OPTS)
    parts = [shard_manifest(tiny_corpus / "manifest.jsonl", url, node_rank=r, **args) for r in (0, 1)]
    assert all(p.index_path is None and str(p.part_path).startswith(url) for p in parts)
    index = merge_index_at(url)
    assert index["totals"]["samples"] == sum(p.written for p in parts) > 0
    objects = _objects(url)
    assert "index.json.zst" in objects and "sizes.json" in objects
    fs = _fs()
    with fs.open("alpro/nodes/train_image/index.json.zst", "rb") as f:
        data = f.read()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "index.json.zst").write_bytes(data)
        merged = read_json_zst(Path(tmp) / "index.json.zst")
    assert [s["file"] for s in merged["shards"]][0].startswith("shard-n000-")
