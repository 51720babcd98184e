"""The streamed manifest (issue 16.3): the same rows, hash and errors as reading the whole file, and the node's
plan (row count, duplicate ids decided over the whole manifest) without keeping rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from alpro.errors import AlproError
from alpro.sharding import shard as shard_mod
from alpro.sharding.manifest import (
    _csv_text,
    _decode,
    _Resolver,
    _table_rows,
    read_manifest,
    sanitize_key,
    select_rows,
    stream_manifest,
)
from alpro.sharding.shard import ShardOptions, _items, _plan


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


CASES = {
    # BOM, CRLF, a quoted caption across lines, a caption with bytes that are not UTF-8, extra columns
    "m.csv": b"\xef\xbb\xbfvideoid,page_dir,name,split\r\n1,p,\"two\r\nlines\",train\r\n2,p,bad \xff\xfe bytes,test\r\n"
             b"3,p,plain,train\n",
    "h.tsv": "caption\timage\nhello\ta.jpg\n\nworld\tb.png\n",
    "cc3m.tsv": b"a cap\t00000/1.jpg\r\nbad \xc3 cap\t00000/2.jpg\n\nthird\t00000/3.jpg\textra\n",
    "s.jsonl": "".join(json.dumps({"video": f"v/{i}.mp4", "caption": f"c{i}", "id": f"x{i % 4}",
                                  "split": "train" if i % 3 else "test"}) + "\n" for i in range(12)),
    # sample rows, then annotation rows that merge by clip (the stream switches to the whole read)
    "g.jsonl": "".join(json.dumps({"video": f"v/{i}.mp4", "caption": f"c{i}"}) + "\n" for i in range(3))
               + json.dumps({"clip_name": "k1", "caption": "a"}) + "\n" + json.dumps({"clip_name": "k1", "caption": "b"})
               + "\n" + json.dumps({"video": "v/9.mp4", "caption": "c9"}) + "\n",
    "l.json": json.dumps([{"video": "a.mp4", "caption": "x"}, {"image": "b.jpg", "caption": "y"}]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_rows_equal_the_whole_read(tmp_path, name):
    m = _write(tmp_path / name, CASES[name])
    whole = read_manifest(m)
    stream = stream_manifest(m)
    for _ in range(2):  # every pass gives the same rows
        assert list(stream.rows()) == whole.rows
    assert (stream.sha256, stream.format, stream.root) == (whole.sha256, whole.format, whole.root)


def test_streamed_csv_equals_decoding_the_whole_text(tmp_path):
    """The incremental decoder gives the text ``_decode(bytes)`` gave when the whole file was read at once."""
    m = _write(tmp_path / "m.csv", CASES["m.csv"])
    res = _Resolver(tmp_path, ".mp4")
    old = list(_table_rows(m, io.StringIO(_decode(m.read_bytes()), newline=""), ",", res))
    with _csv_text(m) as f:
        assert list(_table_rows(m, f, ",", res)) == old
    assert old[0].captions == ["two\r\nlines"] and "\udcff" in old[1].captions[0]


def test_a_bad_line_is_still_one_line_naming_it(tmp_path):
    m = _write(tmp_path / "bad.jsonl", '{"video": "a.mp4", "caption": "c"}\n{"video": \n')
    with pytest.raises(AlproError, match=r"bad.jsonl:2: invalid JSON"):
        _plan(stream_manifest(m), ShardOptions())


def _old_pre_rejects(rows) -> list:
    """What the sharder decided before streaming (whole list, one dict of keys)."""
    first, out = {}, []
    for row in rows:
        key = sanitize_key(row.id)
        if key in first:
            out.append(("duplicate_id", f"key {key!r} already used by id {first[key].id!r} at row {first[key].line}"))
        else:
            first[key] = row
            out.append(None)
    return out


@pytest.mark.parametrize("collide", [False, True], ids=["hash", "every-hash-equal"])
@pytest.mark.parametrize("split", [None, "train"])
def test_plan_and_items_decide_duplicate_ids_like_the_whole_list(tmp_path, monkeypatch, collide, split):
    rows = [{"video": f"v/{i}.mp4", "caption": "c", "id": ["a", "b", "a.x", "a_x", "c", "b"][i % 6] + str(i // 6 % 2),
             "split": "train" if i % 4 else "test"} for i in range(40)]
    m = _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    if collide:  # every key in one hash group: the keys themselves must decide
        monkeypatch.setattr(shard_mod, "hash", lambda s: 7, raising=False)
    opts = ShardOptions(split=split, limit=30)
    selected = select_rows(read_manifest(m).rows, split=split, limit=30)
    plan = _plan(stream_manifest(m), opts)
    assert plan.rows == len(selected)
    want = _old_pre_rejects(selected)
    for lo, hi in ((0, plan.rows), (5, 17), (plan.rows - 3, plan.rows)):
        items = list(_items(plan, opts, lo, hi))
        assert [i.index for i in items] == list(range(lo, hi))
        assert [i.row for i in items] == selected[lo:hi]
        assert [i.pre_reject for i in items] == want[lo:hi]
    for rank in range(3):  # a node's plan holds its own rows' hashes only, and decides as the whole list does
        node = ShardOptions(split=split, limit=30, num_nodes=3, node_rank=rank)
        plan = _plan(stream_manifest(m), node)
        lo, hi = plan.rows * rank // 3, plan.rows * (rank + 1) // 3
        assert [i.pre_reject for i in _items(plan, node, lo, hi)] == want[lo:hi]
