"""`alpro shard` end to end on tiny media: output format, validation, options, determinism, nodes, resume."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import media_factory as mf
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from alpro.errors import AlproError
from alpro.sharding import writer as writer_mod
from alpro.sharding.index import read_index
from alpro.sharding.shard import DEFAULT_GOP, main, shard_manifest

FAST = {"progress": False}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """9 rows: plain clips, B-frames + long GOP + audio, odd size, VFR, rotation, VP9 source, two images."""
    d = tmp_path_factory.mktemp("corpus")
    mf.make_video(d / "plain0.mp4", seed=0)
    mf.make_video(d / "plain1.mp4", seed=1, fps=30, seconds=1.5)
    mf.make_video(d / "bframes.mp4", seed=2, bframes=2, gop=250, audio=True, seconds=2)
    mf.make_video(d / "odd.mp4", seed=3, width=63, height=47)
    mf.make_video(d / "vfr.mp4", seed=4, vfr=True)
    mf.make_video(d / "rotated.mp4", seed=5, rotation=90)
    mf.make_video(d / "vp9src.webm", seed=6, codec="vp9")
    mf.make_image(d / "photo.jpg", width=400, height=300, seed=7)
    mf.make_image(d / "small.png", width=40, height=30, seed=8)
    rows = [
        {"id": "plain0", "video": "plain0.mp4", "caption": "a clip", "split": "train", "objects": ["square"]},
        {"id": "plain1", "video": "plain1.mp4", "captions": ["first", "  second\n caption "], "split": "train"},
        {"id": "bframes", "video": "bframes.mp4", "caption": "b-frames, long gop, audio", "split": "train"},
        {"id": "odd", "video": "odd.mp4", "caption": "odd size", "split": "test"},
        {"id": "vfr", "video": "vfr.mp4", "caption": "variable frame rate", "split": "train"},
        {"id": "rot.90", "video": "rotated.mp4", "caption": "rotated", "split": "train"},
        {"id": "vp9src", "video": "vp9src.webm", "caption": "vp9 source", "split": "test"},
        {"id": "photo", "image": "photo.jpg", "caption": "a photo", "split": "train"},
        {"id": "small", "image": "small.png", "caption": "a small png", "split": "train"},
    ]
    _jsonl(d / "manifest.jsonl", rows)
    return d


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    summary = shard_manifest(corpus / "manifest.jsonl", out, shard_size=4, **FAST)
    assert (summary.inputs, summary.written, summary.rejected, summary.shards) == (9, 9, 0, 3)
    return out


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx")}


def test_layout_and_tar_format(built):
    names = sorted(p.name for p in built.iterdir())
    assert names == ["build.json", "index.cols", "index.json.zst", "rejects.jsonl",
                     "shard-000000.idx", "shard-000000.tar", "shard-000000_stats.json",
                     "shard-000001.idx", "shard-000001.tar", "shard-000001_stats.json",
                     "shard-000002.idx", "shard-000002.tar", "shard-000002_stats.json", "sizes.json"]
    raw = (built / "shard-000000.tar").read_bytes()
    assert raw[257:265] == b"ustar  \x00"  # GNU magic (PAX/ustar would be b"ustar\x0000")
    with tarfile.open(built / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == ["plain0.json", "plain0.txt", "plain0.vinfo", "plain0.mp4"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(writer_mod.MTIME, 0, 0, "", 0o444)}
    listing = subprocess.run(["tar", "-tf", str(built / "shard-000001.tar")], capture_output=True, text=True,
                             check=True).stdout.split()
    assert listing[:4] == ["vfr.json", "vfr.txt", "vfr.vinfo", "vfr.mp4"] and listing[-1] == "photo.jpg"
    assert json.loads((built / "sizes.json").read_text()) == {"shard-000000.tar": 4, "shard-000001.tar": 4,
                                                             "shard-000002.tar": 1}
    assert (built / "rejects.jsonl").read_bytes() == b""


def test_metadata_is_validated_against_a_real_decode(built):
    samples = {k: v for t in sorted(built.glob("*.tar")) for k, v in _samples(t).items()}
    assert list(samples) == ["plain0", "plain1", "bframes", "odd", "vfr", "rot_90", "vp9src", "photo", "small"]
    for key, members in samples.items():
        meta = json.loads(members["json"])
        vinfo = struct.unpack("<4i", members["vinfo"])
        assert vinfo == (meta["num_frames"], meta["width"], meta["height"], round(meta["fps"] * 1000))
        assert members["txt"].decode().split("\n") == meta["captions"]
        if meta["media"] == "image":
            img = Image.open(io.BytesIO(members["jpg"]))
            assert img.format == "JPEG" and (img.width, img.height) == (meta["width"], meta["height"])
            continue
        with av.open(io.BytesIO(members["mp4"])) as c:
            s = c.streams.video[0]
            packets = [p for p in c.demux(s) if p.size]
            frames = [f for p in packets for f in p.decode()]
        assert len(frames) == meta["num_frames"], key
        pts = [f.pts for f in frames]
        assert pts == [meta["start_pts"] + i * meta["pts_per_frame"] for i in range(len(pts))], key
        assert meta["keyframes"] == [i for i, p in enumerate(packets) if p.is_keyframe] == list(range(0, len(pts), DEFAULT_GOP))
        assert meta["codec"] == "h264" and s.codec_context.pix_fmt == "yuv420p" and not s.codec_context.has_b_frames
        assert len(c.streams.audio) == 0 and meta["width"] % 2 == 0 and meta["height"] % 2 == 0
        assert meta["duration"] == pytest.approx(meta["num_frames"] / meta["fps"], abs=1e-6)
        assert meta["time_base"] == [s.time_base.numerator, s.time_base.denominator]


def test_per_source_kinds(built):
    metas = {k: json.loads(v["json"]) for t in sorted(built.glob("*.tar")) for k, v in _samples(t).items()}
    assert metas["plain0"]["extra"] == {"objects": ["square"]} and metas["plain0"]["split"] == "train"
    assert metas["plain0"]["id"] == "plain0" and len(metas["plain0"]["sha256"]) == 64
    assert metas["plain1"]["captions"] == ["first", "second caption"]  # whitespace-normalised, one line each
    assert (metas["plain1"]["num_frames"], metas["plain1"]["fps"]) == (45, 30.0)
    assert metas["bframes"]["num_frames"] == 48 and metas["bframes"]["src"]["codec"] == "h264"
    assert (metas["odd"]["width"], metas["odd"]["height"]) == (64, 48)  # 63x47 -> even, not upscaled
    assert metas["vfr"]["src"]["duration"] == pytest.approx(1.47, abs=0.01)
    assert metas["vfr"]["num_frames"] == round(metas["vfr"]["fps"] * 1.47)
    rot = metas["rot_90"]
    assert (rot["id"], rot["width"], rot["height"]) == ("rot.90", 48, 64)  # display rotation applied
    assert metas["vp9src"]["src"]["codec"] == "vp9" and metas["vp9src"]["codec"] == "h264"
    assert (metas["photo"]["width"], metas["photo"]["height"], metas["photo"]["num_frames"]) == (341, 256, 1)
    assert (metas["small"]["width"], metas["small"]["height"], metas["small"]["codec"]) == (40, 30, "jpeg")


def test_rotation_turns_the_pixels(built, corpus):
    stored_mp4 = _samples(built / "shard-000001.tar")["rot_90"]["mp4"]
    with av.open(io.BytesIO(stored_mp4)) as c:
        stored = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(float)
    expected = np.rot90(mf.frame_pattern(0, 64, 48, seed=5), k=1).astype(float)  # counter-clockwise, (64, 48, 3)
    assert stored.shape == expected.shape
    assert np.abs(stored - expected).mean() < 12  # lossy codec; the unrotated frame would differ by ~60


def test_index_offsets_and_dali_idx(built):
    index = read_index(built)
    assert index["format"] == "alpro-shards" and index["totals"]["samples"] == 9
    assert index["totals"]["images"] == 2 and index["totals"]["videos"] == 7 and index["totals"]["rejected"] == 0
    assert index["options"]["gop"] == DEFAULT_GOP and index["options"]["codec"] == "h264"
    for entry in index["shards"]:
        raw = (built / entry["file"]).read_bytes()
        assert entry["bytes"] == len(raw)
        for key, off, size in zip(entry["keys"], entry["offsets"], entry["sizes"]):
            header = tarfile.TarInfo.frombuf(raw[off : off + 512], "utf-8", "surrogateescape")
            assert header.name == f"{key}.json"
            sample = tarfile.open(fileobj=io.BytesIO(raw[off : off + size] + b"\0" * 1024))
            assert [m.name.split(".")[0] for m in sample.getmembers()] == [key] * 4
        # Our idx equals what DALI's own wds2idx tool writes for the same tar.
        wds2idx = Path(sys.executable).with_name("wds2idx")
        ref = built.parent / "ref.idx"
        subprocess.run([str(wds2idx), str(built / entry["file"]), str(ref)], check=True, capture_output=True)
        assert ref.read_text() == (built / entry["idx"]).read_text()


def test_webdataset_round_trip(built):
    ds = wds.WebDataset(str(built / "shard-{000000..000002}.tar"), shardshuffle=False).decode("pil")
    seen = {}
    for s in ds:
        seen[s["__key__"]] = s
        meta = s["json"]
        assert s["txt"].split("\n") == meta["captions"]
        assert ("jpg" in s) == (meta["media"] == "image") and ("mp4" in s) == (meta["media"] == "video")
    assert len(seen) == 9 and seen["photo"]["jpg"].size == (341, 256)


def test_workers_give_byte_identical_shards(corpus, built, tmp_path):
    out = tmp_path / "w2"
    shard_manifest(corpus / "manifest.jsonl", out, shard_size=4, workers=2, **FAST)
    assert _files(out) == _files(built)
    assert (out / "index.json.zst").read_bytes() == (built / "index.json.zst").read_bytes()


def test_filters_codec_and_frame_rate_options(corpus, tmp_path):
    out = tmp_path / "vp9"
    s = shard_manifest(corpus / "manifest.jsonl", out, media="video", split="train", codec="vp9", fps=12,
                       short_side=32, gop=4, max_duration=1.0, name="train", **FAST)
    assert s.written == 5 and (out / "train-000000.tar").is_file()
    for key, members in _samples(out / "train-000000.tar").items():
        meta = json.loads(members["json"])
        assert meta["codec"] == "vp9" and meta["fps"] == 12.0 and min(meta["width"], meta["height"]) == 32
        assert meta["num_frames"] == 12 and meta["keyframes"] == [0, 4, 8], key
    scaled = shard_manifest(corpus / "manifest.jsonl", tmp_path / "scaled", media="video", limit=1, fps_scale=0.1,
                            **FAST)
    meta = json.loads(_samples(tmp_path / "scaled" / "shard-000000.tar")["plain0"]["json"])
    assert scaled.written == 1 and (meta["fps"], meta["num_frames"]) == (2.4, 3)  # 24 fps x 0.1 over 1 s


def test_shard_bytes_rolls_before_overflow(corpus, tmp_path):
    out = tmp_path / "bytes"
    shard_manifest(corpus / "manifest.jsonl", out, shard_bytes=40_000, **FAST)
    index = read_index(out)
    assert index["totals"]["samples"] == 9 and len(index["shards"]) > 2
    assert all(e["bytes"] <= 40_000 or e["num_samples"] == 1 for e in index["shards"])


def test_copy_mode_keeps_bytes_and_rejects_vfr(corpus, tmp_path):
    s = shard_manifest(corpus / "manifest.jsonl", tmp_path / "copy", copy=True, media="video", **FAST)
    samples = _samples(tmp_path / "copy" / "shard-000000.tar")
    assert samples["plain0"]["mp4"] == (corpus / "plain0.mp4").read_bytes()
    meta = json.loads(samples["bframes"]["json"])
    assert meta["num_frames"] == 48 and meta["keyframes"] == [0]  # long GOP kept as is, B-frames in display order
    rejected = {json.loads(x)["id"]: json.loads(x)["reason"]
                for x in (tmp_path / "copy" / "rejects.jsonl").read_text().splitlines()}
    assert rejected == {"vfr": "copy_unsupported", "vp9src": "copy_unsupported"}  # VFR; webm is not mp4
    assert (s.written, s.rejected) == (5, 2)


def test_dedup_and_keep_duplicates(corpus, tmp_path):
    rows = [{"id": "a", "video": str(corpus / "plain0.mp4"), "caption": "x"},
            {"id": "b", "video": str(corpus / "plain0.mp4"), "caption": "same bytes"},
            {"id": "c", "video": str(corpus / "plain1.mp4"), "caption": "y"}]
    m = _jsonl(tmp_path / "dups.jsonl", rows)
    s = shard_manifest(m, tmp_path / "dedup", **FAST)
    assert (s.written, s.rejects_by_reason) == (2, {"duplicate": 1})
    reject = json.loads((tmp_path / "dedup" / "rejects.jsonl").read_text())
    assert (reject["id"], reject["reason"], reject["row"]) == ("b", "duplicate", 2) and "key a" in reject["detail"]
    kept = shard_manifest(m, tmp_path / "keep", keep_duplicates=True, **FAST)
    assert (kept.written, kept.rejected) == (3, 0)


@pytest.mark.slow  # three node builds with worker pools and two merges: ~20 s inside the suite
def test_nodes_partition_and_merge(corpus, built, tmp_path):
    out = tmp_path / "nodes"
    parts = [shard_manifest(corpus / "manifest.jsonl", out, shard_size=4, num_nodes=3, node_rank=r, **FAST)
             for r in (2, 0)]
    assert [p.index_path for p in parts] == [None, None] and all(p.part_path.is_file() for p in parts)
    assert main([str(out), "--merge-index", str(out)]) == 2  # usage error: one line, exit 2
    assert main(["--merge-index", str(out)]) == 2  # node 1 missing
    shard_manifest(corpus / "manifest.jsonl", out, shard_size=4, num_nodes=3, node_rank=1, **FAST)
    assert main(["--merge-index", str(out)]) == 0
    index = read_index(out)
    assert [e["file"] for e in index["shards"]] == ["shard-n000-000000.tar", "shard-n001-000000.tar",
                                                  "shard-n002-000000.tar"]
    keys = [k for e in index["shards"] for k in e["keys"]]
    assert keys == [k for e in read_index(built)["shards"] for k in e["keys"]]
    assert index["totals"]["samples"] == 9 and index["totals"]["inputs"] == 9
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 9 and set(sizes) == {e["file"] for e in index["shards"]}


def test_rerun_skips_complete_shards_and_resume_is_identical(corpus, built, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(built, out)
    again = shard_manifest(corpus / "manifest.jsonl", out, shard_size=4, **FAST)
    assert (again.resumed_shards, again.processed) == (3, 0)
    (out / "shard-000001_stats.json").unlink()  # shard 1 "unfinished": it and everything after are rebuilt
    (out / "shard-000002.tar").write_bytes(b"garbage")
    (out / ".shard-000002.tar.tmp").write_bytes(b"partial")
    resumed = shard_manifest(corpus / "manifest.jsonl", out, shard_size=4, **FAST)
    assert (resumed.resumed_shards, resumed.processed) == (1, 5)
    assert _files(out) == _files(built) and not list(out.glob(".*.tmp"))
    assert (out / "index.json.zst").read_bytes() == (built / "index.json.zst").read_bytes()


def test_crash_between_tar_and_stats_rename_is_recovered(corpus, built, tmp_path, monkeypatch):
    """A kill after the tar got its final name but before its stats did: the tar is complete, the shard is
    redone on the next run and the result is identical."""
    real_write = writer_mod.atomic_write

    def crash_on_second_stats(path: Path, data: bytes) -> None:
        if path.name == "shard-000001_stats.json":
            raise KeyboardInterrupt("simulated kill")
        real_write(path, data)

    monkeypatch.setattr(writer_mod, "atomic_write", crash_on_second_stats)
    out = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        shard_manifest(corpus / "manifest.jsonl", out, shard_size=4, **FAST)
    assert (out / "shard-000001.tar").is_file() and not (out / "shard-000001_stats.json").exists()
    assert not (out / "index.json.zst").exists()
    monkeypatch.setattr(writer_mod, "atomic_write", real_write)
    resumed = shard_manifest(corpus / "manifest.jsonl", out, shard_size=4, **FAST)
    assert resumed.resumed_shards == 1 and _files(out) == _files(built)


def test_other_options_into_same_dir_is_an_error(corpus, built, tmp_path):
    out = tmp_path / "mix"
    shutil.copytree(built, out)
    with pytest.raises(AlproError, match=rf"options\.gop: {DEFAULT_GOP} -> 4"):
        shard_manifest(corpus / "manifest.jsonl", out, shard_size=4, gop=4, **FAST)


def test_cli_summary_reject_ratio_and_one_line_errors(corpus, tmp_path, capsys):
    rows = [{"id": "a", "video": "plain0.mp4", "caption": "ok"}, {"id": "b", "video": "missing.mp4", "caption": "x"}]
    m = _jsonl(corpus / "half_missing.jsonl", rows)
    assert main([str(m), str(tmp_path / "o1"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 inputs -> 1 samples in 1 shard(s)" in out and "missing" in out
    assert main([str(m), str(tmp_path / "o2"), "--no-progress", "--max-reject-ratio", "0.2"]) == 1
    assert "rejected (50.0 % > --max-reject-ratio 0.2)" in capsys.readouterr().err
    assert (tmp_path / "o2" / "shard-000000.tar").is_file()  # what was written is kept
    for argv, msg in [([str(m)], "give MANIFEST and OUT_DIR"),
                      ([str(m), str(tmp_path / "o3"), "--gop", "0"], "gop must be >= 1"),
                      ([str(m), str(tmp_path / "o3"), "--fps", "10", "--fps-scale", "0.1"], "either fps or fps_scale"),
                      ([str(m), str(tmp_path / "o3"), "--node-rank", "2"], "node_rank must be in"),
                      ([str(tmp_path / "nope.jsonl"), str(tmp_path / "o3")], "manifest not found")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("alpro shard: error:") and msg in err and "\n" not in err
    r = subprocess.run([sys.executable, "-m", "alpro", "shard", str(m)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_webvid_csv_cc3m_tsv_and_folder_end_to_end(corpus, tmp_path):
    webvid = tmp_path / "webvid"
    (webvid / "000_001").mkdir(parents=True)
    shutil.copy(corpus / "plain0.mp4", webvid / "000_001" / "1001.mp4")
    (webvid / "results.csv").write_text('videoid,name,page_dir,duration\n1001,"a clip, quoted",000_001,PT1S\n')
    s = shard_manifest(webvid / "results.csv", tmp_path / "o_csv", **FAST)
    meta = json.loads(_samples(tmp_path / "o_csv" / "shard-000000.tar")["1001"]["json"])
    assert s.written == 1 and meta["captions"] == ["a clip, quoted"] and meta["extra"] == {"page_dir": "000_001",
                                                                                        "duration": "PT1S"}
    (tmp_path / "cc3m.tsv").write_text(f"a photo\t{corpus / 'photo.jpg'}\n")
    assert shard_manifest(tmp_path / "cc3m.tsv", tmp_path / "o_tsv", **FAST).written == 1
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(corpus / "plain1.mp4", folder / "x.mp4")
    (folder / "x.txt").write_text("first\nsecond\n")
    shutil.copy(corpus / "small.png", folder / "y.png")  # no sidecar: missing_caption
    s = shard_manifest(folder, tmp_path / "o_dir", **FAST)
    assert (s.written, s.rejects_by_reason) == (1, {"missing_caption": 1})
    assert json.loads(_samples(tmp_path / "o_dir" / "shard-000000.tar")["x"]["json"])["captions"] == ["first", "second"]


def test_cross_node_duplicates_are_counted_at_merge(corpus, tmp_path, capsys):
    rows = [{"id": "a", "video": str(corpus / "plain0.mp4"), "caption": "x"},
            {"id": "b", "video": str(corpus / "plain0.mp4"), "caption": "same bytes, other node"}]
    m = _jsonl(tmp_path / "m.jsonl", rows)
    for rank in (0, 1):
        assert shard_manifest(m, tmp_path / "o", num_nodes=2, node_rank=rank, **FAST).written == 1
    assert main(["--merge-index", str(tmp_path / "o")]) == 0
    assert "1 sample(s) duplicate the bytes of a sample on another node" in capsys.readouterr().out
    assert read_index(tmp_path / "o")["totals"]["cross_node_duplicates"] == 1
