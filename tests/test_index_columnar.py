"""The columnar index (``index.cols/``): written by the sharder next to ``index.json.zst`` (whose bytes do not
change), equal to the JSON index entry by entry, read by the loader through memory maps; a set with only the
JSON (or with columns of another build) keeps the JSON path; the streaming --merge-index writes the bytes the
one-piece writer wrote."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from alpro.data.shards import ColumnIndex, ShardList, ShardTable, resolve
from alpro.shard_format import COLUMNS_DIR, COLUMNS_META, FORMAT_TAG, FORMAT_VERSION, INDEX_NAME
from alpro.sharding.index import merge_index, read_index, shard_entry, write_json_zst, write_part
from alpro.sharding.writer import json_bytes


def _fields(shardset):
    out = []
    for s in shardset.shards:
        out.append((s.url, s.index_file, [bytes(k) for k in s.keys], np.asarray(s.offsets).tolist(),
                    np.asarray(s.sizes).tolist(), np.asarray(s.media).tolist(), np.asarray(s.num_frames).tolist()))
    return out


def _json_only(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / COLUMNS_DIR)
    return dst


@pytest.mark.parametrize("kind", ["video", "image"])
def test_sharder_writes_columns_equal_to_the_json_index(loader_shards, tmp_path, kind):
    out = loader_shards[kind]
    assert (out / COLUMNS_DIR / COLUMNS_META).is_file()
    meta = json.loads((out / COLUMNS_DIR / COLUMNS_META).read_text())
    assert meta["index_bytes"] == (out / INDEX_NAME).stat().st_size
    index = read_index(out)
    cols = ColumnIndex(str(out / COLUMNS_DIR), str(out))
    assert len(cols) == len(index["shards"]) == meta["shards"]
    for i, entry in enumerate(index["shards"]):
        shard = cols.shard(i)
        assert shard.url == str(out / entry["file"])
        assert shard.index_file == (str(out / entry["idx"]) if entry["idx"] else None)
        assert [k.decode() for k in shard.keys] == entry["keys"]
        assert shard.offsets.tolist() == entry["offsets"] and shard.sizes.tolist() == entry["sizes"]
        assert shard.num_frames.tolist() == entry["num_frames"]
        assert shard.media.tolist() == [{"video": 0, "image": 1}[m] for m in entry["media"]]
        assert cols.media_counts()[i].tolist() == [entry["media"].count("video"), entry["media"].count("image"), 0]
    # resolve maps the columns; a copy without them parses the JSON: the same shard set either way
    mapped = resolve(str(out), "x")
    assert isinstance(mapped.shards, ShardList) and isinstance(mapped.shards.segments[0][0], ColumnIndex)
    plain = resolve(str(_json_only(out, tmp_path / "plain")), "x")
    assert isinstance(plain.shards.segments[0][0], ShardTable)
    strip = lambda f: [(Path(u).name, i and Path(i).name, *rest) for u, i, *rest in f]  # noqa: E731
    assert strip(_fields(mapped)) == strip(_fields(plain))
    assert mapped.starts.tolist() == plain.starts.tolist() and mapped.options == plain.options
    # tars named one by one are matched to the columns' entries too
    tars = sorted(str(p) for p in out.glob("*.tar"))
    named = resolve(tars[::-1], "x")
    assert [s.url for s in named.shards] == tars[::-1] and named.options == mapped.options
    # pickled as its path (a forkserver worker re-maps it), equal after the trip
    blob = pickle.dumps(mapped)
    assert len(blob) < 4096 and _fields(pickle.loads(blob)) == _fields(mapped)


def test_loader_reads_through_the_columns_and_json_only_sets_still_work(loader_shards, tmp_path):
    from alpro.config import from_dict
    from alpro.data import DataConfig, build_tokenizer, build_train_loader, corpus_texts

    def cfg_for(video):
        return from_dict(DataConfig, {"train": {"video": str(video)}, "frame_size": 32, "num_frames": 4,
                                      "batch_size": 2, "num_workers": 0, "max_text_len": 16})

    video = loader_shards["video"]
    plain = _json_only(video, tmp_path / "plain")
    tok = build_tokenizer(train_texts=corpus_texts(cfg_for(video), "pretrain"))
    mapped = build_train_loader(cfg_for(video), "pretrain", tok, 0, 1, seed=3)
    parsed = build_train_loader(cfg_for(plain), "pretrain", tok, 0, 1, seed=3)
    assert isinstance(mapped.source.shardsets[0].shards.segments[0][0], ColumnIndex)
    a, b = next(iter(mapped)), next(iter(parsed))
    assert a.keys == b.keys and a.video.shape == b.video.shape
    assert float((a.video - b.video).abs().max()) == 0.0


def test_columns_of_another_build_are_ignored(loader_shards, tmp_path, caplog):
    out = tmp_path / "stale"
    shutil.copytree(loader_shards["video"], out)
    meta_path = out / COLUMNS_DIR / COLUMNS_META
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "index_bytes": meta["index_bytes"] + 1}))
    with caplog.at_level("WARNING", logger="alpro.data"):
        got = resolve(str(out), "x")
    assert isinstance(got.shards.segments[0][0], ShardTable) and "does not belong" in caplog.text


# ------------------------------------------------------------------------------------- streaming merge


def _part(rank: int, num_nodes: int, shards: int, per: int, build: dict) -> dict:
    g = np.random.default_rng(rank)
    stats = []
    for s in range(shards):
        n = per - (s % 3)
        keys = [f"n{rank}-{s:04d}-{j:05d}" + ("é" if j % 7 == 0 else "") for j in range(n)]
        media = ["video" if j % 4 else "image" for j in range(n)]
        sha = [f"{g.integers(1 << 62):064x}" for _ in range(n)]
        if s == 1:
            sha[0] = f"{7:064x}"  # the same source bytes on every node: cross-node duplicates
        stats.append({"file": f"shard-n{rank:03d}-{s:06d}.tar", "idx": f"shard-n{rank:03d}-{s:06d}.idx",
                      "num_samples": n, "bytes": int(g.integers(1 << 30)), "keys": keys, "media": media,
                      "num_frames": [int(g.integers(1, 300)) if m == "video" else 1 for m in media],
                      "offsets": [512 * 40 * j for j in range(n)], "sizes": [512 * 39] * n,
                      "rows": [rank * 100000 + s * per + j for j in range(n)], "sha256": sha,
                      "duration": float(g.random() * 100), "rejects": [{"row": rank * 100000 + s, "reason": "decode"}]})
    return {"build": build, "rank": rank, "num_nodes": num_nodes, "rows": [0, 1], "inputs": shards * per,
            "shards": stats, "rejects": [{"row": rank, "reason": "missing"}]}


def _one_piece(parts: list[dict]) -> bytes:
    """The index as the sharder wrote it before streaming: one dict, json_bytes, one zstd call."""
    build = parts[0]["build"]
    shards = [s for p in sorted(parts, key=lambda p: p["rank"]) for s in p["shards"]]
    rejects = sorted([r for s in shards for r in s["rejects"]] + [r for p in parts for r in p["rejects"]],
                     key=lambda r: r["row"])
    hashes = [h for s in shards for h in s["sha256"]]
    media = Counter(m for s in shards for m in s["media"])
    totals = {"shards": len(shards), "samples": sum(s["num_samples"] for s in shards), "videos": media["video"],
              "images": media["image"],
              "frames": sum(n for s in shards for n, m in zip(s["num_frames"], s["media"]) if m == "video"),
              "bytes": sum(s["bytes"] for s in shards), "duration": round(sum(s["duration"] for s in shards), 3),
              "inputs": sum(p["inputs"] for p in parts), "rejected": len(rejects),
              "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
              "cross_node_duplicates": len(hashes) - len(set(hashes))}
    index = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "name": build["name"], "options": build["options"],
             "manifest": build["manifest"], "shards": [shard_entry(s) for s in shards], "totals": totals}
    return json_bytes(index)


@pytest.mark.parametrize("odd_key", [None, "bad\udcff"])  # a lone surrogate: the whole index is \u-escaped
def test_streaming_merge_writes_the_bytes_of_the_one_piece_writer(tmp_path, odd_key):
    import zstandard

    build = {"name": "shard", "options": {"keep_duplicates": False, "codec": "h264"}, "manifest": {"rows": 1}}
    parts = [_part(r, 3, shards=100, per=400, build=build) for r in range(3)]
    if odd_key:
        parts[1]["shards"][2]["keys"][0] = odd_key
    out = tmp_path / "merged"
    out.mkdir()
    for p in parts:
        write_part(out, p["rank"], 3, p)
    head = merge_index(out)
    want = _one_piece(parts)
    assert len(want) > 5 << 20  # more than a zstd window at level 10 (4 MiB): a zstd stream would differ
    expected = tmp_path / "expected.json.zst"
    write_json_zst(expected, json.loads(want))
    assert (out / INDEX_NAME).read_bytes() == expected.read_bytes()
    assert zstandard.ZstdDecompressor().decompress((out / INDEX_NAME).read_bytes()) == want
    assert head["totals"]["cross_node_duplicates"] == 2 and "shards" not in head
    # the in-memory parts (a single-node build) give the same files
    again = tmp_path / "again"
    again.mkdir()
    merge_index(again, parts)
    assert (again / INDEX_NAME).read_bytes() == expected.read_bytes()
    if odd_key is None:
        mapped, parsed = resolve(str(out), "x"), resolve(str(_json_only(out, tmp_path / "plain")), "x")
        strip = lambda f: [(Path(u).name, *rest) for u, _, *rest in f]  # noqa: E731
        assert strip(_fields(mapped)) == strip(_fields(parsed))
    # merging again replaces the columns (idempotent), leaving no temporaries
    merge_index(out)
    assert (out / INDEX_NAME).read_bytes() == expected.read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
