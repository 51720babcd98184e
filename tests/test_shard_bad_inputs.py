"""Every kind of bad input is rejected with its reason, nothing is lost, and the counts reconcile."""

from __future__ import annotations

import json
from pathlib import Path

import media_factory as mf
import pytest

from alpro.sharding.index import read_index
from alpro.sharding.shard import main, shard_manifest

CAPTIONS = mf.nasty_captions()


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One manifest with every bad kind (and a few good rows between them); returns (out_dir, id -> expected)."""
    d = tmp_path_factory.mktemp("bad")
    good = [mf.make_video(d / f"good{i}.mp4", seed=i) for i in range(4)]
    big = mf.make_video(d / "big.mp4", width=320, height=240, seconds=1, seed=9)
    media = {
        "missing": d / "does_not_exist.mp4",
        "zero": mf.make_zero_byte(d / "zero.mp4"),
        "truncated": mf.make_truncated(d / "truncated.mp4", seconds=2, seed=20),
        "truncated_tail": mf.make_truncated(d / "tail.mp4", seconds=2, seed=21, faststart=True),
        "corrupt": mf.make_corrupt(d / "corrupt.mp4", seconds=2, seed=22),
        "html": mf.make_not_video(d / "html.mp4"),
        "audio_only": mf.make_audio_only(d / "audio.mp4"),
        "ten_hours": mf.make_absurd_duration(d / "long.mp4"),
        "banner": mf.make_absurd_aspect(d / "banner.mp4"),
        "big": big,
        "bad_jpeg": d / "bad.jpg",
        "text_jpeg": d / "text.jpg",
    }
    jpeg = mf.make_image(d / "ok.jpg").read_bytes()
    media["bad_jpeg"].write_bytes(jpeg[: len(jpeg) // 3])
    media["text_jpeg"].write_text("not an image")
    expected = {
        "missing": "missing", "zero": "empty_file", "truncated": "unreadable", "truncated_tail": "decode_error",
        "corrupt": "decode_error", "html": "not_media", "audio_only": "no_video_stream", "ten_hours": "too_long",
        "banner": "bad_dimensions", "big": "too_large", "bad_jpeg": "unreadable", "text_jpeg": "not_media",
    }
    lines = []
    for i, (item_id, path) in enumerate(media.items()):
        kind = "image" if str(path).endswith(".jpg") else "video"
        lines.append(json.dumps({"id": item_id, kind: str(path), "caption": f"caption {item_id}"}).encode())
        lines.append(json.dumps({"id": f"ok{i}", "video": str(good[i % 3]), "caption": "ok"}).encode())
    # Caption problems (JSON strings hold the raw bytes, as a crawl would produce them).
    for name, reason in [("empty", "empty_caption"), ("blank", "empty_caption"), ("non_utf8", "caption_not_utf8"),
                         ("huge", "caption_too_long")]:
        caption = CAPTIONS[name].replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n")
        caption = caption.replace(b"\t", b"\\t")
        lines.append(b'{"id": "cap_' + name.encode() + b'", "video": "' + str(good[0]).encode()
                     + b'", "caption": "' + caption + b'"}')
        expected[f"cap_{name}"] = reason
    lines.append(json.dumps({"id": "no_caption", "video": str(good[1])}).encode())
    expected["no_caption"] = "missing_caption"
    lines.append(json.dumps({"id": "multiline", "video": str(good[3]), "caption": "a\nb"}).encode())
    lines.append(json.dumps({"id": "ok0", "video": str(good[1]), "caption": "duplicate id"}).encode())
    expected["ok0"] = "duplicate_id"  # the second row with id ok0 (the first one is stored)
    manifest = d / "manifest.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    out = d / "out"
    # ok1..ok11 repeat the bytes of good0..2: all but the first three are content duplicates.
    summary = shard_manifest(manifest, out, shard_size=5, max_source_bytes=20_000, progress=False)
    assert summary.inputs == len(lines)
    return out, expected


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def test_each_bad_kind_has_its_reason(bad_build):
    out, expected = bad_build
    got: dict[str, str] = {}
    for r in _rejects(out):
        got.setdefault(r["id"], r["reason"])
        assert set(r) == {"id", "source", "reason", "detail", "row"} and r["detail"]
    for item_id, reason in expected.items():
        assert got.get(item_id) == reason, (item_id, got.get(item_id), reason)
    duplicates = [r for r in _rejects(out) if r["reason"] == "duplicate"]
    assert len(duplicates) == 9  # 12 "ok" rows over 3 distinct files


def test_counts_reconcile_and_nothing_is_lost(bad_build):
    out, _ = bad_build
    index = read_index(out)
    totals = index["totals"]
    rejects = _rejects(out)
    assert totals["inputs"] == totals["samples"] + totals["rejected"] == 31
    assert totals["rejected"] == len(rejects) and sum(totals["rejects_by_reason"].values()) == len(rejects)
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["counts"]["inputs"] for s in stats) == totals["inputs"]
    assert sum(s["counts"]["rejected"] for s in stats) == totals["rejected"]
    assert [s["rows"] for s in stats] == [[a, b] for a, b in zip([0] + [s["rows"][1] for s in stats[:-1]],
                                                                  [s["rows"][1] for s in stats])]
    keys = [k for e in index["shards"] for k in e["keys"]]
    assert keys == ["ok0", "ok1", "ok2", "multiline"]  # first use of each good file, then the multiline caption
    assert sorted(r["row"] for r in rejects) == [r["row"] for r in rejects]


def test_multiline_caption_becomes_one_line(bad_build):
    out, _ = bad_build
    from alpro.sharding.inspect import extract_sample

    paths = extract_sample(out, "multiline", out.parent / "extracted")
    meta = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    assert meta["captions"] == ["a b"]


def test_max_reject_ratio_exit_code_keeps_output(bad_build, tmp_path, capsys):
    out, _ = bad_build
    manifest = out.parent / "manifest.jsonl"
    args = [str(manifest), str(tmp_path / "o"), "--shard-size", "5", "--max-source-bytes", "20000", "--no-progress"]
    assert main(args + ["--max-reject-ratio", "0.5"]) == 1  # 27 of 31 rejected
    assert "--max-reject-ratio 0.5" in capsys.readouterr().err
    assert read_index(tmp_path / "o")["totals"]["samples"] == 4
    assert main(args + ["--max-reject-ratio", "0.9"]) == 0  # a rerun: resumes, then passes with the looser limit
