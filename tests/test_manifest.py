"""Manifest readers: every supported format, path resolution, grouping, QA attachment, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from alpro.errors import AlproError
from alpro.sharding.manifest import read_manifest, relative_source, sanitize_key, select_rows


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_webvid_csv_page_dir_and_extra_columns(tmp_path):
    m = _write(tmp_path / "webvid" / "results_2M_train.csv",
               'videoid,contentUrl,duration,page_dir,name\n'
               '1001,http://x/1001.mp4,PT00H00M10S,045_001,"A dog, running"\n'
               '1002,http://x/1002.mp4,PT00H00M07S,045_001,Sunset over sea\n')
    man = read_manifest(m)
    assert man.format == "csv" and [r.id for r in man.rows] == ["1001", "1002"]
    r = man.rows[0]
    assert r.source == str((tmp_path / "webvid" / "045_001" / "1001.mp4").resolve())
    assert r.captions == ["A dog, running"] and r.media == "video" and r.line == 2
    assert r.extra == {"contentUrl": "http://x/1001.mp4", "duration": "PT00H00M10S", "page_dir": "045_001"}


def test_csv_path_column_media_root_and_split(tmp_path):
    m = _write(tmp_path / "m.csv", "path,caption,split\nclips/a.mp4,a clip,train\npics/b.jpg,a picture,test\n")
    man = read_manifest(m, media_root=tmp_path / "data")
    assert [r.source for r in man.rows] == [str(tmp_path / "data" / "clips/a.mp4"), str(tmp_path / "data" / "pics/b.jpg")]
    assert [r.media for r in man.rows] == ["video", "image"] and [r.id for r in man.rows] == ["clips/a", "pics/b"]
    assert [r.id for r in select_rows(man.rows, split="test")] == ["pics/b"]
    assert [r.id for r in select_rows(man.rows, media="video")] == ["clips/a"]
    assert len(select_rows(man.rows, limit=1)) == 1


def test_csv_malformed_row_names_the_line(tmp_path):
    m = _write(tmp_path / "m.csv", "path,caption\na.mp4,ok\nb.mp4,too,many\n")
    with pytest.raises(AlproError, match=r"m\.csv:3: expected 2 fields"):
        read_manifest(m)
    with pytest.raises(AlproError, match=r"m2\.csv:1: header has no media column"):
        read_manifest(_write(tmp_path / "m2.csv", "foo,caption\n1,x\n"))


def test_cc3m_tsv_headerless_and_with_header(tmp_path):
    m = _write(tmp_path / "cc3m" / "train.tsv", 'a "quoted" caption\t00000/000000012.jpg\nsecond\t00000/000000013.jpg\n')
    man = read_manifest(m)
    assert [r.id for r in man.rows] == ["00000/000000012", "00000/000000013"]
    assert man.rows[0].captions == ['a "quoted" caption'] and man.rows[0].media == "image"
    assert man.rows[1].source == str((tmp_path / "cc3m" / "00000/000000013.jpg").resolve())
    h = read_manifest(_write(tmp_path / "h.tsv", "caption\timage\nhello\tx.jpg\n"))
    assert h.rows[0].captions == ["hello"] and h.rows[0].media == "image"
    with pytest.raises(AlproError, match=r"bad\.tsv:2: expected 'caption<TAB>path'"):
        read_manifest(_write(tmp_path / "bad.tsv", "ok\ta.jpg\nno tab here\n"))


def test_jsonl_synth_style_rows_keep_extra_fields(tmp_path):
    rows = [
        {"id": "v0", "video": "videos/v0.mp4", "caption": "a red circle", "split": "train",
         "qa": [{"question": "what colour?", "answer": "red"}], "objects": ["circle"], "background": "grey",
         "duration": 2.0},
        {"id": "i0", "image": "images/i0.jpg", "captions": ["c1", "c2"], "split": "train"},
    ]
    m = _write(tmp_path / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    man = read_manifest(m)
    v, i = man.rows
    assert v.extra == {"qa": [{"question": "what colour?", "answer": "red"}], "objects": ["circle"],
                       "background": "grey", "duration": 2.0}
    assert v.split == "train" and v.captions == ["a red circle"]
    assert i.media == "image" and i.captions == ["c1", "c2"] and i.extra == {}


def test_jsonl_errors_name_file_and_line(tmp_path):
    with pytest.raises(AlproError, match=r"a\.jsonl:2: invalid JSON"):
        read_manifest(_write(tmp_path / "a.jsonl", '{"video": "x.mp4", "caption": "c"}\n{"video": \n'))
    with pytest.raises(AlproError, match=r"b\.jsonl:1: row has none of"):
        read_manifest(_write(tmp_path / "b.jsonl", '{"caption": "no media"}\n'))
    with pytest.raises(AlproError, match=r"c\.jsonl:1: caption must be a string"):
        read_manifest(_write(tmp_path / "c.jsonl", '{"video": "x.mp4", "caption": 3}\n'))
    with pytest.raises(AlproError, match="cannot tell the manifest format"):
        read_manifest(_write(tmp_path / "m.txt", "x"))
    with pytest.raises(AlproError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_alpro_retrieval_jsonl_groups_captions_by_clip(tmp_path):
    lines = [{"caption": "a man sings", "clip_name": "video7"}, {"caption": "a song", "clip_name": "video7"},
             {"caption": "a cat", "clip_name": "video9"}]
    m = _write(tmp_path / "ann" / "train.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    man = read_manifest(m, media_root=tmp_path / "videos")
    assert [r.id for r in man.rows] == ["video7", "video9"]
    assert man.rows[0].captions == ["a man sings", "a song"]
    assert man.rows[0].source == str(tmp_path / "videos" / "video7.mp4")


def test_msrvtt_official_json_and_clip_dict(tmp_path):
    data = {"videos": [{"video_id": "video0", "split": "train", "category": 9},
                       {"video_id": "video1", "split": "test", "category": 3}],
            "sentences": [{"caption": "s0", "video_id": "video0"}, {"caption": "s1", "video_id": "video1"},
                          {"caption": "s2", "video_id": "video0"}]}
    man = read_manifest(_write(tmp_path / "msrvtt.json", json.dumps(data)), video_ext="mp4")
    assert [(r.id, r.split, r.captions, r.extra) for r in man.rows] == [
        ("video0", "train", ["s0", "s2"], {"category": 9}), ("video1", "test", ["s1"], {"category": 3})]
    didemo = read_manifest(_write(tmp_path / "didemo.json", json.dumps({"v_a.mp4": ["x", "y"], "v_b": "z"})))
    assert [(r.id, r.captions) for r in didemo.rows] == [("v_a", ["x", "y"]), ("v_b", ["z"])]
    assert didemo.rows[0].source.endswith("v_a.mp4") and didemo.rows[1].source.endswith("v_b.mp4")
    with pytest.raises(AlproError, match=r"bad\.json:1: invalid JSON"):
        read_manifest(_write(tmp_path / "bad.json", "{oops"))


def test_qa_rows_attach_to_their_clip(tmp_path):
    qa = [{"question": "what is sung?", "answer": "song", "video_id": "video7", "answer_type": "what"},
          {"question": "who?", "answer": "man", "video_id": "video7", "answer_type": "who"},
          {"question": "where?", "answer": "x", "video_id": "video404", "answer_type": "where"}]
    qa_file = _write(tmp_path / "qa.jsonl", "".join(json.dumps(x) + "\n" for x in qa))
    ann = _write(tmp_path / "ann.jsonl", json.dumps({"caption": "a man sings", "clip_name": "video7"}) + "\n")
    man = read_manifest(ann, qa=[qa_file])
    assert man.rows[0].extra["qa"] == [
        {"question": "what is sung?", "answer": "song", "answer_type": "what"},
        {"question": "who?", "answer": "man", "answer_type": "who"}]
    assert len(man.warnings) == 1 and "1 QA row" in man.warnings[0]
    # A QA file used directly as the manifest: one caption-less sample per clip, with its questions.
    direct = read_manifest(qa_file)
    assert [(r.id, r.captions, len(r.extra["qa"])) for r in direct.rows] == [("video7", None, 2), ("video404", None, 1)]


def test_folder_with_sidecars(tmp_path):
    root = tmp_path / "folder"
    _write(root / "b" / "clip.mp4", b"x")
    _write(root / "b" / "clip.txt", "first caption\n\nsecond caption\n")
    _write(root / "b" / "clip.json", json.dumps({"split": "val", "source_url": "u"}))
    _write(root / "a.jpg", b"y")
    _write(root / "notes.md", "ignored")
    man = read_manifest(root)
    assert man.format == "folder" and [r.id for r in man.rows] == ["a", "b/clip"]
    assert man.rows[0].captions is None and man.rows[0].media == "image"
    clip = man.rows[1]
    assert clip.captions == ["first caption", "second caption"] and clip.split == "val"
    assert clip.extra == {"source_url": "u"}


def test_non_utf8_bytes_survive_to_the_row(tmp_path):
    m = _write(tmp_path / "m.tsv", b"caf\xe9 au lait\ta.jpg\nfine\tb.jpg\n")
    rows = read_manifest(m).rows
    assert len(rows) == 2 and "\udce9" in rows[0].captions[0]


def test_sanitize_key():
    assert sanitize_key("a.b/c d") == "a_b_c_d"
    assert sanitize_key("") == "_"
    long_a, long_b = "x" * 200, "x" * 199 + "y"
    assert len(sanitize_key(long_a)) == 90 and sanitize_key(long_a) != sanitize_key(long_b)


def test_symlink_loops_are_left_for_the_sharder_and_roots_give_relative_sources(tmp_path):
    """A relative path that is a symlink loop used to abort reading the whole manifest (Path.resolve); paths are
    now joined to the root without resolving, and the row is the sharder's to reject. Every format records its
    root, which the sharder stores sources relative to."""
    os.symlink("b.mp4", tmp_path / "a.mp4")
    os.symlink("a.mp4", tmp_path / "b.mp4")
    m = _write(tmp_path / "m.jsonl", '{"video": "a.mp4", "caption": "loop"}\n{"video": "sub/c.mp4", "caption": "c"}\n')
    man = read_manifest(m)
    assert [r.source for r in man.rows] == [str(tmp_path / "a.mp4"), str(tmp_path / "sub" / "c.mp4")]
    assert man.root == tmp_path
    assert [relative_source(r.source, man.root) for r in man.rows] == ["a.mp4", "sub/c.mp4"]
    assert relative_source(str(tmp_path / "x.mp4"), tmp_path / "deep" / "root") == "../../x.mp4"
    assert relative_source("/abs/x.mp4", None) == "/abs/x.mp4"
    assert read_manifest(m, media_root=tmp_path / "media").root == tmp_path / "media"
    _write(tmp_path / "folder" / "clip.txt", "a caption\n")
    _write(tmp_path / "folder" / "clip.mp4", b"")
    folder = read_manifest(tmp_path / "folder")
    assert folder.root == tmp_path / "folder" and relative_source(folder.rows[0].source, folder.root) == "clip.mp4"
    shutil.copytree(tmp_path / "folder", tmp_path / "elsewhere" / "folder")
    assert read_manifest(tmp_path / "elsewhere" / "folder").sha256 == folder.sha256  # the hash has no directory
