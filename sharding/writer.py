"""One shard on disk: a byte-reproducible GNU tar, its DALI index and its stats, all renamed into place at the end.

Written with :mod:`tarfile` directly rather than ``webdataset.TarWriter`` because the contract needs three
things TarWriter does not give: GNU format (TarWriter 1.0.2 accepts a ``format`` argument but never passes it
to ``tarfile.open``, so it writes Python's default PAX format, which DALI's reader does not support: DALI issue
#3640), the member order of ``docs/shard_format.md`` (TarWriter sorts extensions: json, mp4, txt, vinfo), and
the byte offset of every member (for the DALI ``.idx`` and the dataset index) without re-reading the tar.

Atomicity: everything is written under hidden temporary names (``.NAME...tmp``) in the output directory,
fsynced, then renamed in the order tar, idx, stats. The stats file is the completion marker: a shard counts as
complete only when its stats exist and name the tar's exact size, so a kill -9 at any moment leaves either
nothing or a complete file under a final name, and an interrupted shard is simply rebuilt (identically) on the
next run.

Object storage (``remote``, an fsspec URL such as ``s3://bucket/prefix``): the shard is made as above in a local
staging directory, then uploaded tar, idx, stats, one PUT each (a PUT is atomic: an object is whole or absent),
and the local copies are removed. The stats object, uploaded last, is the marker there too.

Write errors (a full disk above all) surface as ``OSError`` whose ``filename`` is the final name of the file
being written (the temporary is removed first), so the caller can print one line naming it; ``abort`` never
raises, whatever state a failed write left the tar in.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alpro.fileio import atomic_write, is_url, named_oserror, upload, url_fs, url_join
from alpro.shard_format import DALI_IDX_SUFFIX, stats_name

__all__ = ["MTIME", "SampleRecord", "ShardWriter", "atomic_write", "json_bytes", "shard_is_complete",
           "dali_index_lines"]

MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed member mtime, so tars depend on content only
_MODE = 0o444
_IDX_VERSION = "v1.2"  # the format DALI's wds2idx writes and fn.readers.webdataset(index_paths=...) reads


def json_bytes(obj: Any, indent: int | None = None) -> bytes:
    """Strict UTF-8 JSON; strings holding undecodable bytes (lone surrogates from non-UTF-8 paths) are \\u-escaped.

    ``allow_nan=False``: NaN and Infinity are not JSON, so a value that still holds one raises ``ValueError``
    instead of writing a file strict readers refuse (the sharder stores them as ``null`` before this point).
    """
    separators = None if indent else (",", ":")
    text = json.dumps(obj, ensure_ascii=False, indent=indent, separators=separators, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, indent=indent, separators=separators, allow_nan=False).encode()


@dataclass
class SampleRecord:
    """Where one sample's members landed in the tar."""

    key: str
    offset: int
    """Byte offset of the sample's first header (its ``KEY.json``)."""
    size: int
    """Bytes from ``offset`` to the end of the sample's last member, headers and padding included."""
    members: list[tuple[str, int, int, str]] = field(default_factory=list)
    """``(ext, data_offset, data_size, member_name)`` per member, as the DALI index lists them."""


def dali_index_lines(records: list[SampleRecord]) -> str:
    """The wds2idx v1.2 text: ``v1.2 N`` then per sample ``ext offset size name`` for each member."""
    lines = [f"{_IDX_VERSION} {len(records)}"]
    for rec in records:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in rec.members))
    return "\n".join(lines) + "\n"


class ShardWriter:
    """Append samples to ``OUT_DIR/STEM.tar`` (under a temporary name) and finish it atomically."""

    def __init__(self, out_dir: Path, stem: str, remote: str | None = None) -> None:
        self.out_dir, self.stem, self.remote = out_dir, stem, remote
        self.tar_path = out_dir / f"{stem}.tar"
        self.idx_path = out_dir / f"{stem}{DALI_IDX_SUFFIX}"
        self.stats_path = out_dir / stats_name(stem)
        self._tmp = out_dir / f".{stem}.tar.tmp"
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self.records: list[SampleRecord] = []

    def add(self, key: str, members: list[tuple[str, bytes]]) -> SampleRecord:
        """Append ``KEY.ext`` members in the given order; return their offsets."""
        rec = SampleRecord(key=key, offset=self._tar.offset, size=0)
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), MTIME, _MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            try:
                self._tar.addfile(info, io.BytesIO(data))
            except OSError as e:
                raise named_oserror(e, self.tar_path) from e
            # After addfile, tar.offset is the end of the member's 512-padded data.
            data_offset = self._tar.offset - (len(data) + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
            rec.members.append((ext, data_offset, len(data), info.name))
        rec.size = self._tar.offset - rec.offset
        self.records.append(rec)
        return rec

    @property
    def num_samples(self) -> int:
        return len(self.records)

    @property
    def bytes_written(self) -> int:
        return self._tar.offset

    def finish(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Close the tar, then rename tar, idx and stats into place (stats last: the completion marker)."""
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            size = self._tmp.stat().st_size
            os.replace(self._tmp, self.tar_path)
        except OSError as e:
            raise named_oserror(e, self.tar_path) from e
        atomic_write(self.idx_path, dali_index_lines(self.records).encode())
        stats = {"file": self.tar_path.name, "idx": self.idx_path.name, "bytes": size, **stats}
        atomic_write(self.stats_path, json_bytes(stats) + b"\n")
        if self.remote is not None:
            for path in (self.tar_path, self.idx_path, self.stats_path):  # stats last: the marker
                upload(path, url_join(self.remote, path.name))
            for path in (self.idx_path, self.tar_path):  # the stats stay: the build reads them back
                path.unlink(missing_ok=True)
        return stats

    def abort(self) -> None:
        """Drop the unfinished shard (used when a run stops early, e.g. on a full disk). Never raises.

        Closing may fail again (the buffered tail of the tar cannot be written to a full disk): the file is
        closed anyway and the temporary removed. A tar already renamed into place whose idx or stats could not
        be written stays, as after a kill -9: without stats it is incomplete, and the next run rebuilds it.
        """
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except (OSError, ValueError):
                pass
        self._tmp.unlink(missing_ok=True)


def shard_is_complete(out_dir: Path | str, stem: str) -> dict[str, Any] | None:
    """The stats of a finished shard, or ``None`` if any of tar / idx / stats is missing or disagrees
    (``out_dir`` may be a URL)."""
    if isinstance(out_dir, str) and is_url(out_dir):
        fs, _ = url_fs(out_dir)
        try:
            stats = json.loads(fs.cat_file(url_fs(url_join(out_dir, stats_name(stem)))[1]))
            if fs.size(url_fs(url_join(out_dir, f"{stem}.tar"))[1]) != stats["bytes"]:
                return None
            if not fs.exists(url_fs(url_join(out_dir, f"{stem}{DALI_IDX_SUFFIX}"))[1]):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return stats
    out_dir = Path(out_dir)
    stats_path = out_dir / stats_name(stem)
    tar_path, idx_path = out_dir / f"{stem}.tar", out_dir / f"{stem}{DALI_IDX_SUFFIX}"
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        if tar_path.stat().st_size != stats["bytes"] or not idx_path.is_file():
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stats
