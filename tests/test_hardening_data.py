"""Issue 10, loader side: shards, indexes and streams from someone else are refused or skipped and counted,
never crash, hang or balloon memory (items 4-8 and 18).

Every case is built for real: crafted tars, zstd bombs, a cut tar, a failing ``pipe:`` command run by the
shell; memory is measured in a fresh subprocess (``ru_maxrss``) or with ``tracemalloc``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path

import media_factory as mf
import pytest
import zstandard
from data_fixtures import write_foreign, write_shards

from alpro.config import from_dict
from alpro.data import DataConfig, build_eval_loader, build_tokenizer, build_train_loader
from alpro.data.decode import decode_picture
from alpro.data.shards import INDEX_NAME, SampleError, resolve, stream_samples
from alpro.errors import AlproError, ConfigError
from alpro.sharding.inspect import extract_sample, format_report, inspect_shards
from alpro.sharding.inspect import main as inspect_main

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("clips")
    return [mf.make_video(root / f"g{i}.mp4", seconds=1, gop=8, seed=i) for i in range(6)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(train_texts=["good clip number bad json many minus five captions"])


def _good(clips: list[Path], n: int = 4) -> list[dict]:
    return [{"key": f"good{i}", "path": clips[i], "media": "video", "captions": [f"good clip {i}", f"clip {i} again"]}
            for i in range(n)]


def _cfg(video, **kw) -> DataConfig:
    return from_dict(DataConfig, {"train": {"video": str(video)}, "val": {"video": str(video)}, "frame_size": 32,
                                  "num_frames": 2, "batch_size": 2, "num_workers": 0, "pem": {"patch_size": 8},
                                  **kw})


def _skips(loader) -> dict[str, float]:
    return {k.split("/", 1)[1]: v for k, v in loader.metrics().items() if k.startswith("skipped/")}


def _run_measured(code: str, timeout: int = 120) -> tuple[str, int]:
    """Run ``code`` in a fresh interpreter; (its stdout, its peak resident memory in MB)."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest, with
    # torch loaded) across exec, while VmHWM belongs to this process image alone.
    script = textwrap.dedent(code) + textwrap.dedent("""
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print("MAXRSS_KB", hwm.split()[1])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    out, _, rss = done.stdout.rpartition("MAXRSS_KB ")
    return out, int(rss) // 1024


class _Deadline:
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def on_alarm(*_):
            raise TimeoutError(f"still running after {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(self.seconds)
        return self

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)
        return False


# ------------------------------------------------------------------------------------------ item 4: pipe:


def test_failing_pipe_command_is_retried_then_one_line_error(tmp_path, clips, tok):
    shards = write_shards(tmp_path / "set", _good(clips), per_shard=2)
    cmd = "cat /nonexistent/shard-{000000..000001}.tar"
    cfg = _cfg(f"pipe:{cmd}", train={"video": f"pipe:{cmd}", "video_index": str(shards / INDEX_NAME)},
               pipe_retries=1, num_workers=1, resampled=True)
    loader = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=0)
    t0 = time.monotonic()
    with _Deadline(60), pytest.raises(AlproError) as err:
        next(iter(loader))
    message = str(err.value)
    assert "\n" not in message
    assert "cat /nonexistent/shard-00000" in message and "exit status 1" in message
    assert "No such file or directory" in message and "2 attempt(s)" in message
    assert time.monotonic() - t0 < 30  # one retry after 1 s, not an endless loop


def test_pipe_command_that_prints_nothing_is_an_error_not_an_endless_loop(tmp_path, clips, tok):
    shards = write_shards(tmp_path / "set", _good(clips), per_shard=2)
    cmd = "pipe:true shard-{000000..000001}.tar"  # exits 0 and writes nothing
    cfg = _cfg(cmd, train={"video": cmd, "video_index": str(shards / INDEX_NAME)}, resampled=True)
    loader = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=0)
    with _Deadline(60), pytest.raises(AlproError, match=r"16 shard draws in a row gave no usable sample") as err:
        next(iter(loader))
    assert "\n" not in str(err.value) and "truncated" in str(err.value)


def test_pipe_retry_continues_after_the_samples_already_delivered(tmp_path, clips):
    shards = write_shards(tmp_path / "set", _good(clips), per_shard=4)
    tar = shards / "shard-000000.tar"
    marker = tmp_path / "failed-once"
    # First run: half of the tar, then exit 3 (a dropped connection); second run: the whole tar.
    cmd = (f"pipe:if [ -f {marker} ]; then cat {tar}; else touch {marker}; head -c {tar.stat().st_size // 2} {tar};"
           " echo 'connection reset' >&2; exit 3; fi")
    errors: list = []
    keys = [k for k, _ in stream_samples(cmd, errors.append, retries=2)]
    assert keys == ["good0", "good1", "good2", "good3"]  # each once, in order
    assert errors == []


# ------------------------------------------------------------------------------------ item 5: bad KEY.json


BAD_JSON = {"capfive": {"captions": 5}, "minusfive": {"num_frames": -5}, "many": {"num_frames": "many"}}


@pytest.fixture(scope="module")
def bad_meta_shards(tmp_path_factory, clips) -> Path:
    root = tmp_path_factory.mktemp("badmeta")
    samples = _good(clips)
    for i, (key, override) in enumerate(BAD_JSON.items()):
        meta = {"id": key, "key": key, "media": "video", "captions": ["bad json"], "num_frames": 24,
                "keyframes": [0, 8, 16], "start_pts": 0, "pts_per_frame": 512, **override}
        samples.insert(1 + 2 * i, {"key": key, "path": clips[4], "media": "video", "captions": ["bad json"],
                                   "raw_json": json.dumps(meta).encode()})
    return write_shards(root / "shards", samples, per_shard=3)


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_training_skips_and_counts_bad_metadata(bad_meta_shards, tok, task):
    loader = build_train_loader(_cfg(bad_meta_shards, batch_size=1), task, tok, 0, 1, seed=0)
    keys = [k for batch in loader for k in batch.keys]
    assert len(keys) == (7 if task == "pretrain" else 8)  # every item slot filled
    assert set(keys) == {f"good{i}" for i in range(4)}
    skips = _skips(loader)
    assert set(skips) == {"bad_metadata"}
    if task == "retrieval":  # listed when the captions are expanded at start-up: each bad sample once
        assert skips["bad_metadata"] == 3
    else:  # found when read; a replacement drawn from the plan may be a bad one again
        assert skips["bad_metadata"] >= 3


def test_evaluation_marks_bad_metadata_invalid(bad_meta_shards, tok):
    for task in ("pretrain", "retrieval", "qa"):
        loader = build_eval_loader(_cfg(bad_meta_shards), task, tok, 0, 1)
        slots = [(k, ok) for b in loader for k, ok in zip(b.keys, b.valid.tolist())]
        if task == "qa":  # no sample holds a question: only the bad ones are kept, as invalid slots
            assert slots and not any(ok for _, ok in slots)
            continue
        assert [k for k, ok in slots if ok] == [f"good{i}" for i in range(4)]
        assert sum(not ok for _, ok in slots) >= 3 and _skips(loader)["bad_metadata"] == 3


def test_inspect_reports_bad_metadata(bad_meta_shards, capsys):
    report = inspect_shards(bad_meta_shards)
    assert report["samples"] == 7 and report["media"] == {"video": 4}
    assert report["bad_samples"] == {"bad_metadata": 3}
    details = {b["key"]: b["detail"] for b in report["bad_sample_list"]}
    assert set(details) == set(BAD_JSON) and "captions is 5" in details["capfive"]
    assert '"many"' in details["many"] and "-5" in details["minusfive"]
    assert inspect_main([str(bad_meta_shards)]) == 0
    assert "3 sample(s) bad_metadata" in capsys.readouterr().out


# -------------------------------------------------------------------------------------- item 6: a cut tar


@pytest.fixture(scope="module")
def cut_shards(tmp_path_factory, clips) -> Path:
    """Two shards of three; the second cut in the middle of its second sample's mp4."""
    out = write_shards(tmp_path_factory.mktemp("cut") / "shards", _good(clips, 6), per_shard=3)
    index = json.loads(zstandard.ZstdDecompressor().decompress((out / INDEX_NAME).read_bytes()))
    entry = index["shards"][1]
    cut_at = entry["offsets"][1] + entry["sizes"][1] - 2000
    os.truncate(out / entry["file"], cut_at)
    return out


def test_cut_tar_is_truncated_at_startup_and_when_read(cut_shards, tok):
    for task in ("retrieval", "pretrain"):
        loader = build_train_loader(_cfg(cut_shards, batch_size=1), task, tok, 0, 1, seed=0)
        keys = {k for batch in loader for k in batch.keys}
        assert keys <= {"good0", "good1", "good2", "good3"} and "good0" in keys
        skips = _skips(loader)
        assert skips.get("truncated", 0) >= 2 and "missing_text" not in skips and "missing_media" not in skips


def test_cut_tar_is_truncated_when_streamed(cut_shards, tok):
    cmd = f"pipe:cat {cut_shards}/shard-{{000000..000001}}.tar"
    cfg = _cfg(cmd, train={"video": cmd, "video_index": str(cut_shards / INDEX_NAME)}, batch_size=1)
    loader = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=0)
    keys = [k for batch in loader for k in batch.keys]
    assert set(keys) <= {"good0", "good1", "good2", "good3"}
    skips = _skips(loader)
    assert skips.get("truncated", 0) >= 1 and "missing_media" not in skips and "truncated_tar" not in skips
    errors: list = []
    assert [k for k, _ in stream_samples(cmd.replace("{000000..000001}", "000001"), errors.append)] == ["good3"]
    assert [e.reason for e in errors] == ["truncated"]


def test_cut_foreign_tar_without_index_counts_truncated(tmp_path, clips, tok, caplog):
    shards = write_foreign(tmp_path / "v2d", clips[:3], per_shard=3)
    tar = shards / "00000.tar"
    with tarfile.open(tar) as t:
        last_clip = [m for m in t.getmembers() if m.name.endswith(".mp4")][-1]
    os.truncate(tar, last_clip.offset_data + last_clip.size // 2)  # in the middle of the last clip
    with caplog.at_level("WARNING", logger="alpro.data"):
        loader = build_eval_loader(_cfg(shards), "retrieval", tok, 0, 1)
    assert "its last sample counts as truncated" in caplog.text
    slots = [(k, ok) for b in loader for k, ok in zip(b.keys, b.valid.tolist())]
    assert [k for k, ok in slots if ok] == ["000000000", "000000001"]
    assert _skips(loader) == {"truncated": 1}  # not missing_media: the cut clip is never half-delivered


def test_inspect_reports_complete_samples_and_where_the_tar_ends(cut_shards, tmp_path):
    report = inspect_shards(cut_shards)
    assert report["samples"] == 4 and report["media"] == {"video": 4}
    [cut] = report["truncated"]
    tar = cut_shards / "shard-000001.tar"
    assert cut["file"] == str(tar) and cut["ends_at"] == tar.stat().st_size
    assert cut["complete_samples"] == 1 and cut["key"] == "good4"
    assert "truncated: " in format_report(report) and f"ends at byte {tar.stat().st_size}" in format_report(report)
    assert [p.name for p in extract_sample(cut_shards, "good3", tmp_path)][0] == "good3.json"
    with pytest.raises(AlproError, match="good4.mp4 of sample 'good4' is cut off"):
        extract_sample(cut_shards, "good4", tmp_path)


# ------------------------------------------------------------------------------------------ item 7: bombs


def _zstd_bomb(path: Path, declare: bool) -> Path:
    """An index.json.zst of ~32 KB that expands to 1 GiB of JSON-looking text (never held in memory here)."""
    body = GIB - 64
    with open(path, "wb") as f:
        writer = zstandard.ZstdCompressor(level=3).stream_writer(f, size=GIB if declare else -1, closefd=False)
        head = b'{"format": "alpro-shards", "shards": [], "pad": "'
        writer.write(head)
        chunk = b" " * (1 << 20)
        left = body - len(head)
        while left > 0:
            writer.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        writer.write(b'"}'.ljust(GIB - body, b" "))
        writer.flush(zstandard.FLUSH_FRAME)
    return path


@pytest.mark.parametrize("declare", [True, False], ids=["declared-size", "streamed"])
def test_index_bomb_is_refused_without_allocating(tmp_path, declare):
    (tmp_path / "set").mkdir()
    bomb = _zstd_bomb(tmp_path / "set" / INDEX_NAME, declare)
    assert bomb.stat().st_size < 64 << 10
    out, rss = _run_measured(f"""
        from alpro.data.shards import resolve
        from alpro.errors import AlproError, ConfigError
        try:
            resolve({str(tmp_path / "set")!r}, "bomb")
        except AlproError as e:
            print("ERROR", e)
    """)
    assert out.startswith("ERROR ") and "decompression bomb" in out and out.count("\n") == 1
    assert rss < 400, f"peak RSS {rss} MB"  # the bomb would be 1024 MB


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    return info.tobuf(format=tarfile.GNU_FORMAT)


def test_streamed_gzip_tar_with_a_1gib_member_is_skipped_from_its_header(tmp_path, clips):
    """good0, then a sample whose mp4 is 1 GiB of zeros (4.6 MB gzipped), then good1, through `pipe:cat`."""
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)
    path = tmp_path / "bomb.tar.gz"
    with open(path, "wb") as f:
        def add(name: str, data: bytes) -> None:
            f.write(gz.compress(_tar_header(name, len(data)) + data + b"\0" * (-len(data) % 512)))

        add("good0.json", json.dumps({"captions": ["a"]}).encode())
        add("good0.mp4", clips[0].read_bytes())
        add("bomb.json", json.dumps({"captions": ["b"]}).encode())
        f.write(gz.compress(_tar_header("bomb.mp4", GIB)))
        zeros = b"\0" * (1 << 20)
        for _ in range(GIB >> 20):
            f.write(gz.compress(zeros))
        add("good1.json", json.dumps({"captions": ["c"]}).encode())
        add("good1.mp4", clips[1].read_bytes())
        f.write(gz.compress(b"\0" * 1024) + gz.flush())
    assert path.stat().st_size < 8 << 20
    out, rss = _run_measured(f"""
        from alpro.data.shards import stream_samples
        errors = []
        keys = [k for k, m in stream_samples("pipe:cat {path}", errors.append)]
        print(keys, [str(e) for e in errors])
    """)
    keys, reasons = out.strip().split("] ", 1)
    assert keys == "['good0', 'good1'" and "too_large: member bomb.mp4 is 1073741824 bytes" in reasons
    assert rss < 400, f"peak RSS {rss} MB"


def _png_bomb(width: int, height: int) -> bytes:
    """A valid grey PNG of width x height zero pixels: a few tens of KB for 64 Mpx."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_image_pixel_cap_is_checked_from_the_header(tmp_path, clips, tok):
    bomb = _png_bomb(8192, 8192)
    assert len(bomb) < 200 << 10
    tracemalloc.start()
    with pytest.raises(SampleError) as err:
        decode_picture(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert err.value.reason == "too_many_pixels" and "8192x8192" in str(err.value)
    assert peak < 16 << 20  # a decode would be 64 MB (grey) / 192 MB (RGB)
    # Through the loader: an image set with the bomb among good images; it is skipped and counted.
    (tmp_path / "bomb.png").write_bytes(bomb)
    images = [mf.make_image(tmp_path / f"i{i}.jpg", seed=i) for i in range(3)]
    samples = [{"key": f"img{i}", "path": p, "media": "image", "captions": [f"image {i}"]}
               for i, p in enumerate(images)]
    samples.insert(1, {"key": "bomb", "path": tmp_path / "bomb.png", "media": "image", "captions": ["bomb"]})
    image_set = write_shards(tmp_path / "img", samples, per_shard=2)
    video_set = write_shards(tmp_path / "vid", _good(clips), per_shard=2)
    cfg = _cfg(video_set, train={"video": str(video_set), "image": str(image_set), "image_fraction": 1.0},
               batch_size=1)
    loader = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=0)
    assert {k for b in loader for k in b.keys} == {"img0", "img1", "img2"}
    assert _skips(loader) == {"too_many_pixels": 1}


def test_member_size_caps_skip_from_the_header_and_index_sizes_cannot_force_a_huge_read(tmp_path, clips, tok):
    samples = _good(clips)
    big = mf.make_video(tmp_path / "big.mp4", seconds=2, width=160, height=120, seed=9)
    samples.insert(2, {"key": "big", "path": big, "media": "video", "captions": ["big clip"]})
    shards = write_shards(tmp_path / "set", samples, per_shard=5)
    cap = (big.stat().st_size + max(c.stat().st_size for c in clips[:4])) // 2
    loader = build_train_loader(_cfg(shards, batch_size=1, limits={"video_bytes": cap}), "pretrain", tok, 0, 1, 0)
    assert "big" not in {k for b in loader for k in b.keys}
    assert _skips(loader) == {"too_large": 1}
    # An index that claims a 100 GB sample: refused from the index and the headers, nothing that size is read.
    index = json.loads(zstandard.ZstdDecompressor().decompress((shards / INDEX_NAME).read_bytes()))
    index["shards"][0]["sizes"][1] = 100 << 30
    (shards / INDEX_NAME).write_bytes(zstandard.ZstdCompressor().compress(json.dumps(index).encode()))
    out, rss = _run_measured(f"""
        from alpro.data.shards import Reader, SampleError, resolve
        shard = resolve({str(shards)!r}, "x").shards[0]
        try:
            Reader().sample(shard, 1)
        except SampleError as e:
            print(e.reason)
    """)
    assert out.strip() == "too_large" and rss < 400


def test_default_caps_are_stated_and_configurable():
    limits = DataConfig().limits
    assert (limits.video_bytes, limits.image_bytes, limits.other_bytes) == (512 << 20, 64 << 20, 16 << 20)
    assert limits.image_pixels == 7680 * 4320
    from alpro.sharding.media import DEFAULT_MAX_PIXELS

    assert limits.image_pixels == DEFAULT_MAX_PIXELS  # what the sharder accepts, the loader accepts
    from alpro.data.shards import member_cap

    assert member_cap(limits, "mp4") == ("video", 512 << 20) and member_cap(limits, "seg.PNG")[0] == "image"
    doc = (REPO / "docs" / "loader.md").read_text()
    for name in ("limits.video_bytes", "limits.image_bytes", "limits.other_bytes", "limits.image_pixels"):
        assert name in doc
    with pytest.raises(ConfigError, match="limits"):
        from_dict(DataConfig, {"limits": {"video_bytes": 0}})


# -------------------------------------------------------------------------- item 8: entries that leave the set


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_entries_outside_the_set_are_refused_unless_allowed(tmp_path, clips, where):
    other = write_shards(tmp_path / "other", _good(clips, 2), per_shard=2)
    mine = tmp_path / "mine"
    mine.mkdir()
    index = json.loads(zstandard.ZstdDecompressor().decompress((other / INDEX_NAME).read_bytes()))
    outside = "../other/shard-000000.tar" if where == "parent" else str(other / "shard-000000.tar")
    index["shards"][0]["file"] = outside
    (mine / INDEX_NAME).write_bytes(zstandard.ZstdCompressor().compress(json.dumps(index).encode()))
    with pytest.raises(AlproError, match="points outside the index's directory.*data.allow_index_outside") as err:
        resolve(str(mine), "data.train.video")
    assert outside in str(err.value) and "\n" not in str(err.value)
    allowed = resolve(str(mine), "data.train.video", allow_outside=True)
    assert [allowed.key(i) for i in range(len(allowed))] == ["good0", "good1"]


def test_url_index_entries_must_stay_under_the_same_prefix(clips):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, data in (("k.json", b"{}"), ("k.txt", b"cap")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    fs.pipe("/bucket/set/shard-000000.tar", tar.getvalue())
    entry = {"file": "shard-000000.tar", "num_samples": 1, "keys": ["k"], "offsets": [0], "sizes": [1536]}
    for name, ok in (("shard-000000.tar", True), ("../other/x.tar", False), ("s3://elsewhere/x.tar", False),
                     ("/bucket/x.tar", False), ("a/../../x.tar", False)):
        index = {"format": "alpro-shards", "shards": [{**entry, "file": name}]}
        fs.pipe("/bucket/set/index.json.zst", zstandard.ZstdCompressor().compress(json.dumps(index).encode()))
        if ok:
            assert len(resolve("memory://bucket/set/index.json.zst", "remote")) == 1
        else:
            with pytest.raises(AlproError, match="points outside"):
                resolve("memory://bucket/set/index.json.zst", "remote")


# ------------------------------------------------------------------------------- item 18: search --sheet


def test_contact_sheet_with_hits_missing_from_the_shards(tmp_path, clips, capsys):
    from safetensors.torch import save_file
    from torch import zeros

    from alpro.apps.search import contact_sheet

    shards = write_shards(tmp_path / "set", _good(clips, 2), per_shard=2)
    index = tmp_path / "index"
    index.mkdir()
    save_file({"video_feat": zeros(3, 4)}, str(index / "index.safetensors"))
    (index / "keys.json").write_text(json.dumps({"keys": ["good0", "ghost", "good1"], "captions": [[], [], []]}))
    (index / "meta.json").write_text(json.dumps({"run": str(tmp_path), "shards": str(shards)}))
    hits = [{"rank": r, "key": k, "score": 1.0, "caption": "c"} for r, k in enumerate(["good1", "ghost"], 1)]
    sheet = contact_sheet(hits, index, tmp_path / "sheet.png", frames=2, size=32)
    from PIL import Image

    assert Image.open(sheet).size == (64, 14 + 46)  # one row: the hit that exists
    assert "1 hit(s) not in" in capsys.readouterr().err
    with pytest.raises(AlproError, match="none of the hits") as err:
        contact_sheet(hits[1:], index, tmp_path / "none.png")
    assert "\n" not in str(err.value) and not (tmp_path / "none.png").exists()
    (index / "index.safetensors").write_bytes(b"not safetensors")  # a damaged index: one line too
    with pytest.raises(AlproError, match="damaged index"):
        contact_sheet(hits, index, tmp_path / "damaged.png")


@pytest.mark.slow
def test_alpro_train_with_a_failing_pipe_source_stops_with_one_line(tiny_shards, tmp_path):
    """The real trainer CLI: no endless re-runs, exit status 2, one line naming the command and its stderr."""
    cmd = "pipe:cat /nonexistent/shard-{000000..000001}.tar"
    args = ["train", "--config", str(REPO / "launch" / "configs" / "debug" / "prompter.yaml"),
            "--train.run_dir", str(tmp_path / "run"), "--data.train.video", cmd,
            "--data.train.video_index", str(tiny_shards["train_video"] / INDEX_NAME), "--data.train.image", "null",
            "--data.test.video", str(tiny_shards["test_video"]), "--data.pipe_retries", "1"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "alpro", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("alpro train: error: data.train.video: ")
    assert "cat /nonexistent/shard-00000" in lines[0] and "exit status 1" in lines[0]
    assert "No such file or directory" in lines[0] and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 240


def test_stream_reader_local_compressed_and_closed_early(tmp_path, clips):
    """The streaming reader on a local tar, gzip / zstd through pipe:, and a consumer that stops early (the
    command is killed, no error, no zombie)."""
    tar = write_shards(tmp_path / "set", _good(clips, 3), per_shard=3) / "shard-000000.tar"
    (tmp_path / "s.tar.gz").write_bytes(zlib.compress(tar.read_bytes(), wbits=31))
    (tmp_path / "s.tar.zst").write_bytes(zstandard.ZstdCompressor().compress(tar.read_bytes()))
    errors: list = []
    for url in (str(tar), f"pipe:cat {tmp_path / 's.tar.gz'}", f"pipe:cat {tmp_path / 's.tar.zst'}"):
        assert [k for k, _ in stream_samples(url, errors.append)] == ["good0", "good1", "good2"]
        first = stream_samples(url, errors.append)
        key, members = next(first)
        assert key == "good0" and set(members) == {"json", "txt", "vinfo", "mp4"}
        first.close()
    assert errors == []


def test_docs_skip_reason_table_matches_the_code():
    """Every reason the loader can count is in docs/loader.md's Bad data table, and the table holds no other."""
    import re

    code = "".join(p.read_text() for p in (REPO / "alpro" / "data").glob("*.py"))
    reasons = set(re.findall(r'SampleError\("([a-z_]+)"', code)) | set(re.findall(r'skips\["([a-z_]+)"\]', code))
    doc = (REPO / "docs" / "loader.md").read_text()
    table = doc[doc.index("| `skipped/<reason>` | cause |"):doc.index("## Untrusted shards")]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M))
    assert reasons == documented
