"""Issue 10, the sharder's part: hostile or unlucky inputs are refused one by one, the rest is built.

Pixel bombs are refused from the image header (7), a symlink loop is one reject (9), one bad caption is dropped
rather than the sample (10), NaN/Infinity never reach ``KEY.json`` (11), sources are stored relative to the media
root so the same corpus gives the same bytes wherever it sits (12), and a full disk is one line with nothing
half-written left behind and a byte-identical resume (13).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import media_factory as mf
import pytest

from alpro.errors import AlproError
from alpro.sharding.index import read_index
from alpro.sharding.media import DEFAULT_MAX_PIXELS, MediaLimits, Reject, encode_image
from alpro.sharding.shard import ShardOptions, main, shard_manifest
from alpro.sharding.writer import json_bytes

FAST = {"progress": False}
OUTPUTS = (".tar", ".idx")
SET_FILES = ("index.json.zst", "sizes.json", "rejects.jsonl", "build.json")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file of a set that must be reproducible (stats hold timings, so they are compared field-wise)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in OUTPUTS or p.name in SET_FILES}


def _metas(out: Path) -> dict[str, dict]:
    metas = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    metas[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    return metas


def _rejects(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def _stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]


def _png(width: int, height: int, *, decodable: bool) -> bytes:
    """An RGB PNG declaring ``width`` x ``height``; all black and fully decodable, or with only a few bytes of
    pixel data (its header is valid, its pixels are not there). Built row by row: never ``width*height`` bytes
    in memory, as a hostile file costs its author nothing either."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    if decodable:
        z = zlib.compressobj(9)
        row = bytes(1 + 3 * width)  # filter byte 0 + black pixels
        idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    else:
        idat = zlib.compress(bytes(64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ 7: pixel cap


def test_image_pixel_cap_is_checked_from_the_header_before_decoding():
    """A header declaring more than --max-pixels is ``bad_dimensions`` although its pixel data is garbage: the
    reject comes before any decoding (the same bytes under a higher cap get as far as decoding, and fail there)."""
    assert DEFAULT_MAX_PIXELS == ShardOptions().max_pixels == 7680 * 4320  # 8K UHD (docs/sharding.md says why)
    bomb = _png(8000, 8000, decodable=False)
    with pytest.raises(Reject) as e:
        encode_image(bomb, 256, 90, MediaLimits())
    assert e.value.reason == "bad_dimensions"
    assert e.value.detail == "8000x8000 = 64000000 pixels > --max-pixels 33177600 (from the header, not decoded)"
    with pytest.raises(Reject) as e:
        encode_image(bomb, 256, 90, MediaLimits(max_pixels=10**8))
    assert e.value.reason == "unreadable"  # it passed the cap, so PIL tried to decode the missing pixels
    # The default admits exactly an 8K UHD frame.
    with pytest.raises(Reject) as e:
        encode_image(_png(7680, 4320, decodable=False), 256, 90, MediaLimits())
    assert e.value.reason == "unreadable"
    with pytest.raises(Reject) as e:
        encode_image(_png(7680, 4321, decodable=False), 256, 90, MediaLimits())
    assert e.value.reason == "bad_dimensions"


_PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _shard_peak_kb(manifest: Path, out: Path) -> tuple[int, int]:
    """Exit status and peak RSS (KB) of a real ``alpro shard`` run (measured by a parent that has no other child)."""
    cmd = [sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "alpro", "shard", str(manifest), str(out),
           "--no-progress", "--max-reject-ratio", "1"]
    rc, peak = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout.split()
    return int(rc), int(peak)


@pytest.mark.slow
def test_a_64_megapixel_png_bomb_is_refused_with_default_options_without_the_memory(tmp_path):
    """The issue's case: a ~200 KB PNG that decodes to 64 MP (0.8 GB at peak) with the default options."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(8000, 8000, decodable=True))
    assert bomb.stat().st_size < 300_000
    mf.make_image(tmp_path / "small.png", width=64, height=48)
    rc, peak_bomb = _shard_peak_kb(_jsonl(tmp_path / "b.jsonl", [{"image": "bomb.png", "caption": "c"}]),
                                   tmp_path / "out_bomb")
    assert rc == 0
    reject = _rejects(tmp_path / "out_bomb")["bomb"]
    assert reject["reason"] == "bad_dimensions" and "> --max-pixels 33177600" in reject["detail"]
    rc, peak_small = _shard_peak_kb(_jsonl(tmp_path / "s.jsonl", [{"image": "small.png", "caption": "c"}]),
                                    tmp_path / "out_small")
    assert rc == 0 and len(_metas(tmp_path / "out_small")) == 1
    # Decoding the bomb would need 192 MB for its RGB pixels alone; refusing it costs what a 64x48 image does.
    assert peak_bomb - peak_small < 48 * 1024, (peak_bomb, peak_small)


# ------------------------------------------------------------------------------------------------ 9, 10, 11


@pytest.fixture(scope="module")
def odd_rows(tmp_path_factory) -> tuple[Path, Path]:
    """Symlink loops (relative and absolute), captions with non-UTF-8 bytes, NaN/Infinity in extra fields."""
    d = tmp_path_factory.mktemp("odd")
    for i in range(3):
        mf.make_video(d / f"clip{i}.mp4", seed=i)
    os.symlink("loop_b.mp4", d / "loop_a.mp4")
    os.symlink("loop_a.mp4", d / "loop_b.mp4")
    lines = [
        json.dumps({"id": "loop_rel", "video": "loop_a.mp4", "caption": "a relative symlink loop"}),
        json.dumps({"id": "good", "video": "clip0.mp4", "caption": "good"}),
        json.dumps({"id": "loop_abs", "video": str(d / "loop_b.mp4"), "caption": "an absolute symlink loop"}),
        # JSON strings carrying raw Latin-1 bytes, as a crawl produces them.
        '{"id": "mixed", "video": "clip1.mp4", "captions": ["caf\xe9 au lait", "a cup of coffee", ""]}',
        '{"id": "all_bad", "video": "clip2.mp4", "captions": ["cr\xe8me", "br\xfbl\xe9e"]}',
        '{"id": "nan", "video": "clip2.mp4", "caption": "numbers", "score": NaN, '
        '"boxes": [[0.1, Infinity], [-Infinity, 0.5]], "meta": {"ok": 1.5, "bad": NaN}}',
    ]
    manifest = d / "manifest.jsonl"
    manifest.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    out = d / "out"
    summary = shard_manifest(manifest, out, shard_size=2, **FAST)
    assert (summary.inputs, summary.written, summary.rejected) == (6, 3, 3)
    assert (summary.captions_dropped, summary.nonfinite_nulled) == (2, 4)
    assert "2 caption(s) dropped" in summary.table() and "4 NaN/Infinity value(s)" in summary.table()
    return d, out


def test_a_relative_symlink_loop_is_a_reject_and_the_other_rows_are_built(odd_rows):
    d, out = odd_rows
    rejects = _rejects(out)
    for item_id, stored in (("loop_rel", "loop_a.mp4"), ("loop_abs", "loop_b.mp4")):
        assert rejects[item_id]["reason"] == "missing"
        assert rejects[item_id]["detail"] == os.strerror(errno.ELOOP)  # "Too many levels of symbolic links"
        assert rejects[item_id]["source"] == stored
    assert set(_metas(out)) == {"good", "mixed", "nan"}


def test_the_cli_builds_past_a_relative_symlink_loop(odd_rows, tmp_path, capsys):
    d, _ = odd_rows
    assert main([str(d / "manifest.jsonl"), str(tmp_path / "o"), "--no-progress", "--max-reject-ratio", "1"]) == 0
    assert "missing" in capsys.readouterr().out
    assert set(_metas(tmp_path / "o")) == {"good", "mixed", "nan"}


def test_a_non_utf8_caption_is_dropped_and_counted_not_the_sample(odd_rows):
    _, out = odd_rows
    metas = _metas(out)
    assert metas["mixed"]["captions"] == ["a cup of coffee"]  # the Latin-1 and the empty caption dropped
    txt = {}
    for tar_path in out.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            txt.update({m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".txt")})
    assert txt["mixed"] == b"a cup of coffee"
    assert sum(s["counts"]["captions_dropped"] for s in _stats(out)) == 2
    # With no good caption left the sample is still refused, naming the bytes.
    all_bad = _rejects(out)["all_bad"]
    assert all_bad["reason"] == "caption_not_utf8" and all_bad["detail"] == "caption 0: b'cr\\xe8me'"


def test_nan_and_infinity_in_extra_fields_are_stored_as_null(odd_rows):
    _, out = odd_rows

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in KEY.json is not JSON")

    for tar_path in out.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    json.loads(tar.extractfile(m).read(), parse_constant=refuse)  # strict JSON
    extra = _metas(out)["nan"]["extra"]
    assert extra == {"score": None, "boxes": [[0.1, None], [None, 0.5]], "meta": {"ok": 1.5, "bad": None}}
    assert sum(s["counts"]["nonfinite_nulled"] for s in _stats(out)) == 4
    with pytest.raises(ValueError):  # the writer refuses rather than writing NaN, should one get through
        json_bytes({"x": math.nan})


# ------------------------------------------------------------------------------------------------ 12: paths


def _corpus(d: Path) -> Path:
    """Clips and an image under subfolders, a row whose file is missing, relative paths (a portable corpus)."""
    for i in range(3):
        mf.make_video(d / "videos" / f"clip{i}.mp4", seed=10 + i)
    (d / "images").mkdir()
    mf.make_image(d / "images" / "pic.jpg", seed=3)
    rows = [{"id": f"clip{i}", "video": f"videos/clip{i}.mp4", "caption": f"clip {i}"} for i in range(3)]
    rows.insert(1, {"id": "gone", "video": "videos/gone.mp4", "caption": "not there"})
    rows.append({"id": "pic", "image": "images/pic.jpg", "caption": "a picture"})
    return _jsonl(d / "manifest.jsonl", rows)


def test_sources_are_relative_and_a_copied_corpus_builds_byte_identical_shards(tmp_path):
    here = _corpus(tmp_path / "site_a" / "corpus")
    out_a = tmp_path / "site_a" / "shards"
    shard_manifest(here, out_a, shard_size=2, **FAST)
    metas = _metas(out_a)
    assert {k: m["source"] for k, m in metas.items()} == {
        "clip0": "videos/clip0.mp4", "clip1": "videos/clip1.mp4", "clip2": "videos/clip2.mp4", "pic": "images/pic.jpg"}
    assert _rejects(out_a)["gone"]["source"] == "videos/gone.mp4"
    # Nothing in the set names the directory it was built in (the index is compressed: read it).
    for p in (p for p in out_a.rglob("*") if p.is_file()):  # index.cols/ is a directory
        assert str(tmp_path).encode() not in p.read_bytes(), p.name
    assert str(tmp_path) not in json.dumps(read_index(out_a))
    assert json.loads((out_a / "build.json").read_text())["manifest"]["path"] == "manifest.jsonl"

    # The same corpus copied to another directory (and built with 2 workers) gives the same bytes.
    there = tmp_path / "elsewhere" / "deeper" / "copy"
    shutil.copytree(here.parent, there)
    out_b = tmp_path / "elsewhere" / "shards"
    shard_manifest(there / "manifest.jsonl", out_b, shard_size=2, workers=2, **FAST)
    assert _outputs(out_b) == _outputs(out_a)
    assert len([n for n in _outputs(out_a) if n.endswith(".tar")]) == 2
    strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}  # noqa: E731 -- wall time differs
    assert [strip(s) for s in _stats(out_b)] == [strip(s) for s in _stats(out_a)]


def test_media_root_and_absolute_paths_option(tmp_path):
    corpus = tmp_path / "corpus"
    manifest = _corpus(corpus)
    # With --media-root, sources are stored relative to it (here: the manifest names clips under videos/).
    rows = [{"id": "c0", "video": "clip0.mp4", "caption": "c"}, {"id": "p", "image": "../images/pic.jpg", "caption": "p"}]
    by_root = _jsonl(tmp_path / "other.jsonl", rows)
    shard_manifest(by_root, tmp_path / "rooted", media_root=corpus / "videos", **FAST)
    assert {k: m["source"] for k, m in _metas(tmp_path / "rooted").items()} == {"c0": "clip0.mp4",
                                                                               "p": "../images/pic.jpg"}
    # --absolute-paths: the old behaviour, on request.
    assert main([str(manifest), str(tmp_path / "abs"), "--absolute-paths", "--no-progress"]) == 0
    metas = _metas(tmp_path / "abs")
    assert metas["clip0"]["source"] == str(corpus / "videos" / "clip0.mp4")
    assert _rejects(tmp_path / "abs")["gone"]["source"] == str(corpus / "videos" / "gone.mp4")
    build = json.loads((tmp_path / "abs" / "build.json").read_text())
    assert build["manifest"]["path"] == str(manifest.resolve()) and build["options"]["absolute_paths"] is True
    # The shards differ only by the stored path: same media bytes.
    rel = _metas_media(tmp_path / "rooted")["c0"]
    assert _metas_media(tmp_path / "abs")["clip0"] == rel


def _metas_media(out: Path) -> dict[str, bytes]:
    media = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            media.update({m.name.rsplit(".", 1)[0]: tar.extractfile(m).read() for m in tar
                          if m.name.endswith((".mp4", ".jpg"))})
    return media


# ------------------------------------------------------------------------------------------------ 13: full disk


def _mount_tmpfs(path: Path, size_kb: int, *, remount: bool = False) -> None:
    opts = f"{'remount,' if remount else ''}size={size_kb}k"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True, capture_output=True)


@pytest.mark.slow
def test_disk_full_is_one_line_leaves_no_temporaries_and_resumes_byte_identical(tmp_path):
    """A real full file system (a small tmpfs; the tests run as root, as in CI): the build stops with one line
    naming the file, exit 2, no ``.tmp`` left; after the file system grows, a rerun resumes to the same bytes
    as a clean build."""
    assert os.geteuid() == 0, "mounting a small tmpfs needs root (the test machines run tests as root)"
    clips = mf.corpus(tmp_path / "media", 8, seconds=1.0)
    manifest = _jsonl(tmp_path / "m.jsonl", [{"id": p.stem, "video": f"media/{p.name}", "caption": f"c {i}"}
                                             for i, p in enumerate(clips)])
    reference = tmp_path / "reference"
    shard_manifest(manifest, reference, shard_size=2, **FAST)
    pages = sum(-(-p.stat().st_size // 4096) for p in reference.iterdir())
    assert pages >= 12, pages

    out = tmp_path / "small_disk"
    out.mkdir()
    _mount_tmpfs(out, 4 * pages // 2)  # room for about half of the set
    try:
        cmd = [sys.executable, "-m", "alpro", "shard", str(manifest), str(out), "--shard-size", "2", "--workers", "2",
               "--no-progress"]
        full = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert full.returncode == 2, (full.returncode, full.stdout, full.stderr)
        line = full.stderr.strip()
        assert "\n" not in line and "Traceback" not in full.stderr, full.stderr
        assert line.startswith(f"alpro shard: error: no space left on device: {out}/"), line
        assert "rerun to resume" in line
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        assert not (out / "index.json.zst").exists()
        completed = sorted(p.name for p in out.glob("*_stats.json"))
        assert 1 <= len(completed) < 4, completed

        _mount_tmpfs(out, 4 * pages * 4, remount=True)  # free space: the same file system, four times larger
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{len(completed)} shard(s) resumed" in rerun.stdout
        assert _outputs(out) == _outputs(reference)
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(out)], check=False, capture_output=True)


def test_a_read_only_out_dir_is_one_line_naming_the_file(tmp_path):
    assert os.geteuid() == 0, "mounting a read-only tmpfs needs root (the test machines run tests as root)"
    manifest = _jsonl(tmp_path / "m.jsonl", [{"video": "a.mp4", "caption": "c"}])
    mf.make_video(tmp_path / "a.mp4")
    out = tmp_path / "ro"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(out)], check=True, capture_output=True)
    try:
        with pytest.raises(AlproError) as e:
            shard_manifest(manifest, out, **FAST)
        assert str(e.value) == f"{out / 'build.json'}: {os.strerror(errno.EROFS)}"
    finally:
        subprocess.run(["umount", str(out)], check=False, capture_output=True)
