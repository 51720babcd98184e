"""``alpro.shard_format``: the one definition the sharder and the loader share (names, format tag, ``.vinfo``).

tests/test_shard.py checks the bytes the sharder writes against the documented layout independently
(``struct.unpack("<4i", ...)``); here: the codec itself, and that writer and reader sides use this module's
values rather than copies of their own."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from alpro import shard_format as fmt
from alpro.data import shards as reader
from alpro.errors import AlproError
from alpro.sharding import index as writer_index
from alpro.sharding import writer


def test_vinfo_round_trips_the_documented_layout():
    data = fmt.encode_vinfo(48, 320, 240, 29.97)
    assert len(data) == fmt.VINFO_SIZE == 16
    assert struct.unpack("<4i", data) == (48, 320, 240, 29970)  # docs/shard_format.md: little-endian int32 x4
    assert fmt.decode_vinfo(data) == fmt.VideoInfo(num_frames=48, width=320, height=240, fps_milli=29970)
    assert fmt.vinfo_frames(data) == 48


@pytest.mark.parametrize("data", [b"", b"\x01\x00\x00\x00", bytes(15)])
def test_a_short_vinfo_is_unknown_not_an_exception(data):
    assert fmt.decode_vinfo(data) is None and fmt.vinfo_frames(data) == -1


def test_the_dali_reader_reads_frame_counts_through_the_codec():
    from alpro.data.dali_reader import _vlen  # imports DALI only inside its functions

    assert _vlen(np.frombuffer(fmt.encode_vinfo(7, 1, 1, 1.0), np.uint8)) == 7
    assert _vlen(np.zeros(0, np.uint8)) == -1


def test_writer_and_reader_share_the_names():
    assert reader.INDEX_NAME is fmt.INDEX_NAME and writer_index.INDEX_NAME is fmt.INDEX_NAME
    assert reader.VIDEO_EXTS is fmt.VIDEO_EXTS and reader.IMAGE_EXTS is fmt.IMAGE_EXTS
    assert writer_index.part_name(2, 10) == "index.part-00002-of-00010.json.zst"


def test_an_index_the_writer_writes_is_one_the_reader_accepts(tmp_path):
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    writer_index.write_json_zst(tmp_path / fmt.INDEX_NAME, {"format": fmt.FORMAT_TAG, "version": fmt.FORMAT_VERSION,
                                                            "options": {}, "shards": []})
    assert reader._read_index(str(tmp_path / fmt.INDEX_NAME))["format"] == fmt.FORMAT_TAG
    assert writer_index.read_index(tmp_path)["version"] == fmt.FORMAT_VERSION
    writer_index.write_json_zst(tmp_path / fmt.INDEX_NAME, {"format": "other-shards", "shards": []})
    with pytest.raises(AlproError, match=r"not an alpro shard index \(format='other-shards'\)"):
        reader._read_index(str(tmp_path / fmt.INDEX_NAME))


def test_a_shard_the_writer_finishes_is_named_as_the_contract_says(tmp_path):
    """The writer's files carry the contract's names, and its own completeness check finds them by those names."""
    w = writer.ShardWriter(tmp_path, "shard-000003")
    w.add("k0", [("json", b"{}"), ("vinfo", fmt.encode_vinfo(2, 4, 4, 24.0))])
    w.finish({"num_samples": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["shard-000003.tar", "shard-000003" + fmt.DALI_IDX_SUFFIX, fmt.stats_name("shard-000003")])
    assert fmt.stats_name("shard-000003") == "shard-000003_stats.json"
    assert writer.shard_is_complete(tmp_path, "shard-000003")["num_samples"] == 1
    (tmp_path / fmt.stats_name("shard-000003")).unlink()
    assert writer.shard_is_complete(tmp_path, "shard-000003") is None
