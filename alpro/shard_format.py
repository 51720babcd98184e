"""The shard-format contract (docs/shard_format.md) in code: the one owner of the names, tags and layouts that
the writer (``alpro.sharding``) and the readers (``alpro.data``, ``alpro shard inspect``) must agree on.

Why here and not in ``alpro/sharding/``: the sharder already imports the reader (``alpro.sharding.inspect``
reads tars with ``alpro.data.shards``), so a contract inside ``alpro.sharding`` would make ``alpro.data``
depend on the offline tools and the two packages on each other. A leaf module at the package root, importing
nothing from ``alpro``, keeps the dependency one-way: sharding -> data -> shard_format.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "FORMAT_TAG", "FORMAT_VERSION", "INDEX_NAME", "BUILD_NAME", "SIZES_NAME", "REJECTS_NAME", "STATS_SUFFIX",
    "DALI_IDX_SUFFIX", "VIDEO_EXTS", "IMAGE_EXTS", "VINFO_SIZE", "VideoInfo", "encode_vinfo", "decode_vinfo",
    "vinfo_frames", "stats_name", "part_name", "COLUMNS_DIR", "COLUMNS_META", "COLUMNS_TAG", "COLUMNS_VERSION",
    "SHARD_COLUMNS", "SAMPLE_COLUMNS", "MEDIA_CODES",
]

FORMAT_TAG = "alpro-shards"  # index.json.zst's "format": what tells an alpro index from any other JSON
FORMAT_VERSION = 1
INDEX_NAME = "index.json.zst"  # written last: when it exists, every shard it lists is complete
BUILD_NAME = "build.json"
SIZES_NAME = "sizes.json"  # {"NAME-000000.tar": n_samples, ...} (open_clip convention)
REJECTS_NAME = "rejects.jsonl"
STATS_SUFFIX = "_stats.json"  # NAME-000000_stats.json next to NAME-000000.tar
DALI_IDX_SUFFIX = ".idx"

# The columnar index (docs/shard_format.md, "The columnar index"): a directory of numpy ``.npy`` files next to
# index.json.zst, written just before it, that a loader memory-maps instead of parsing the JSON.
COLUMNS_DIR = "index.cols"
COLUMNS_META = "meta.json"  # {"format": COLUMNS_TAG, "version", "shards", "samples", "index_bytes", ...}
COLUMNS_TAG = "alpro-shards-columns"
COLUMNS_VERSION = 1
# column -> (file name, dtype); "S" = fixed-width bytes whose width is the longest value (UTF-8, NUL-padded).
SHARD_COLUMNS = {
    "file": ("shard_file.npy", "S"),  # (S,) tar name relative to the directory
    "idx": ("shard_idx.npy", "S"),  # (S,) DALI index name, b"" = none
    "start": ("shard_start.npy", "<i8"),  # (S + 1,) first sample of each shard in the sample columns; last = N
    "media": ("shard_media.npy", "<i8"),  # (S, 3) samples per media code (video, image, unknown)
}
SAMPLE_COLUMNS = {
    "key": ("key.npy", "S"),  # (N,)
    "offset": ("offset.npy", "<i8"),  # (N,) byte offset of the sample's first header in its tar
    "size": ("size.npy", "<i8"),  # (N,) bytes up to the end of its last member
    "media": ("media.npy", "u1"),  # (N,) MEDIA_CODES
    "num_frames": ("num_frames.npy", "<i4"),  # (N,) -1 = unknown
}
MEDIA_CODES = {"video": 0, "image": 1}  # anything else: 2 (unknown)

# Member extensions (without the dot) the readers treat as media, in the order they are looked for.
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")

_VINFO = struct.Struct("<4i")  # little-endian int32 x4: a fixed-width field DALI can load without parsing JSON
VINFO_SIZE = _VINFO.size


class VideoInfo(NamedTuple):
    """The ``KEY.vinfo`` member: ``num_frames, width, height, round(fps * 1000)``."""

    num_frames: int
    width: int
    height: int
    fps_milli: int


def encode_vinfo(num_frames: int, width: int, height: int, fps: float) -> bytes:
    """The 16 bytes of a ``.vinfo`` member (fps stored as ``round(fps * 1000)``)."""
    return _VINFO.pack(num_frames, width, height, round(fps * 1000))


def decode_vinfo(data: bytes) -> VideoInfo | None:
    """The fields of a ``.vinfo`` member; None when it is not exactly 16 bytes (a malformed member fails one
    sample, never the reader)."""
    return VideoInfo(*_VINFO.unpack(data)) if len(data) == VINFO_SIZE else None


def vinfo_frames(data: bytes) -> int:
    """Frame count of a ``.vinfo`` member; -1 when it is absent or malformed. Reads only the first field, so
    it accepts what DALI hands over (a member of at least 16 bytes)."""
    return _VINFO.unpack_from(data)[0] if len(data) >= VINFO_SIZE else -1


def stats_name(stem: str) -> str:
    return f"{stem}{STATS_SUFFIX}"


def part_name(rank: int, num_nodes: int) -> str:
    """A node's share of the index in a multi-node build (merged into :data:`INDEX_NAME`)."""
    return f"index.part-{rank:05d}-of-{num_nodes:05d}.json.zst"
