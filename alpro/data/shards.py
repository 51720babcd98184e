"""Shard sets: resolve a user's shard spec, list every sample's byte range, and read samples by offset.

A spec is a directory with ``index.json.zst``, that index file, a ``.tar`` path, a glob, a brace range, a list
of those, an fsspec URL, or a ``pipe:`` command (see ``docs/shard_format.md``). With the sharder's index the
sample table (key, byte offset, byte size, media, frame count) is read from it; local shards without one
(e.g. video2dataset's ``KEY.mp4 + KEY.txt + KEY.json``) get the same table by scanning the tar headers,
which is cheap (one 512-byte read per member). A ``pipe:`` source cannot seek, so it is streamed
(:mod:`alpro.data.stream`) instead.

Reading a sample is one positioned read of its byte range, then a walk over the tar headers inside it;
:func:`read_head` reads only the small members (json, txt) at the front, for building item lists.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from alpro.errors import AlproError

INDEX_NAME = "index.json.zst"
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
MEDIA_VIDEO, MEDIA_IMAGE, MEDIA_UNKNOWN = 0, 1, 2
_BLOCK = 512
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's rule: key = path up to the first dot


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the metrics counter it increments."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Shard:
    """One tar file and its samples (parallel arrays, compact for millions of samples)."""

    url: str  # local path, fsspec URL or pipe: command
    keys: np.ndarray  # (n,) bytes
    offsets: np.ndarray  # (n,) int64 byte offset of the sample's first header
    sizes: np.ndarray  # (n,) int64 bytes up to the end of its last member
    media: np.ndarray  # (n,) uint8 MEDIA_*
    num_frames: np.ndarray  # (n,) int32, -1 = unknown (probed when decoded)
    index_file: str | None = None  # DALI/wds2idx index next to the tar, if any

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class ShardSet:
    """Every shard of one source, with global sample ids 0..n-1 in shard order."""

    name: str
    shards: list[Shard]
    streaming: bool = False  # pipe: sources: read front to back only
    options: dict = field(default_factory=dict)  # the sharder's options (codec, gop, ...) when indexed
    starts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, gid: int) -> tuple[Shard, int]:
        i = int(np.searchsorted(self.starts, gid, side="right")) - 1
        return self.shards[i], int(gid - self.starts[i])

    def key(self, gid: int) -> str:
        shard, j = self.locate(gid)
        return shard.keys[j].decode()


# ------------------------------------------------------------------------------------------------ resolving


def _is_url(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def _expand(spec: str) -> list[str]:
    """Brace ranges then globs (local only); order is kept, duplicates dropped."""
    out: list[str] = []
    for item in braceexpand(spec):
        if _is_url(item) or not any(c in item for c in "*?["):
            out.append(item.removeprefix("file://"))
        else:
            out.extend(sorted(glob.glob(item)))
    return list(dict.fromkeys(out))


def _read_index(path: str) -> dict:
    import zstandard

    try:
        if _is_url(path):
            import fsspec

            with fsspec.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = Path(path).read_bytes()
        data = json.loads(zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 34))
    except (OSError, ValueError) as e:
        raise AlproError(f"{path}: unreadable shard index ({e})") from None
    if data.get("format") != "alpro-shards" or "shards" not in data:
        raise AlproError(f"{path}: not an alpro shard index (format={data.get('format')!r})")
    return data


def _shard_from_entry(entry: dict, base: str) -> Shard:
    n = int(entry["num_samples"])
    media = entry.get("media") or ["unknown"] * n
    codes = {"video": MEDIA_VIDEO, "image": MEDIA_IMAGE}
    url = f"{base.rstrip('/')}/{entry['file']}" if _is_url(base) else str(Path(base) / entry["file"])
    idx = entry.get("idx")
    idx_url = (f"{base.rstrip('/')}/{idx}" if _is_url(base) else str(Path(base) / idx)) if idx else None
    return Shard(
        url=url,
        keys=np.array(entry["keys"], dtype="S"),
        offsets=np.asarray(entry["offsets"], dtype=np.int64),
        sizes=np.asarray(entry["sizes"], dtype=np.int64),
        media=np.array([codes.get(m, MEDIA_UNKNOWN) for m in media], dtype=np.uint8),
        num_frames=np.asarray(entry.get("num_frames") or [-1] * n, dtype=np.int32),
        index_file=idx_url,
    )


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if _is_url(url) else str(Path(url).parent)


def _exists(path: str) -> bool:
    if _is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return os.path.isfile(path)


def resolve(spec: str | list[str], name: str, index: str | None = None) -> ShardSet:
    """The shard set a spec names. ``index`` overrides where ``index.json.zst`` is looked for."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise AlproError(f"{name}: empty shard list")
    if all(s.startswith("pipe:") for s in specs):
        return _resolve_pipe(specs, name, index)
    if any(s.startswith("pipe:") for s in specs):
        raise AlproError(f"{name}: cannot mix pipe: commands with seekable shards in one source")
    urls: list[str] = []
    indexes: dict[str, dict] = {}
    for s in specs:
        if s.endswith(INDEX_NAME) or (not _is_url(s) and os.path.isdir(s)):
            path = s if s.endswith(INDEX_NAME) else os.path.join(s, INDEX_NAME)
            if not _exists(path):
                urls.extend(_expand(os.path.join(s, "*.tar")))  # a directory of foreign shards
                continue
            data = _read_index(path)
            indexes[_dirname(path)] = data
            urls.extend(_shard_from_entry(e, _dirname(path)).url for e in data["shards"])
        else:
            expanded = _expand(s)
            missing = [u for u in expanded if not _is_url(u) and not os.path.isfile(u)]
            if not expanded or missing:
                raise AlproError(f"{name}: no shard matches {s!r}" + (f" ({missing[0]} does not exist)"
                                                                     if missing else ""))
            urls.extend(expanded)
    if not urls:
        raise AlproError(f"{name}: no shards found in {specs}")
    if index is not None:
        indexes[_dirname(urls[0])] = _read_index(index)
    shards, options = [], {}
    for url in dict.fromkeys(urls):
        directory = _dirname(url)
        if directory not in indexes:
            candidate = f"{directory}/{INDEX_NAME}" if _is_url(url) else os.path.join(directory, INDEX_NAME)
            indexes[directory] = _read_index(candidate) if _exists(candidate) else {}
        entries = {e["file"]: e for e in indexes[directory].get("shards", [])}
        entry = entries.get(url.rsplit("/", 1)[-1])
        if entry is not None:
            shards.append(_shard_from_entry(entry, directory))
            options = options or indexes[directory].get("options", {})
        elif _is_url(url):
            raise AlproError(f"{name}: {url} is not listed in an {INDEX_NAME}: remote shards need the index")
        else:
            shards.append(scan_tar(url))
    return ShardSet(name=name, shards=[s for s in shards if len(s)], options=options)


def _resolve_pipe(specs: list[str], name: str, index: str | None) -> ShardSet:
    """pipe: commands, one per shard after brace expansion; sample counts come from an index when given."""
    commands = [c for s in specs for c in braceexpand(s)]
    entries: dict[str, dict] = {}
    if index is not None:
        entries = {e["file"]: e for e in _read_index(index)["shards"]}
    shards = []
    for cmd in commands:
        entry = next((e for f, e in entries.items() if f in cmd), None)
        n = int(entry["num_samples"]) if entry else 0
        keys = np.array(entry["keys"], dtype="S") if entry else np.array([], dtype="S")
        shards.append(Shard(url=cmd, keys=keys, offsets=np.zeros(n, np.int64), sizes=np.zeros(n, np.int64),
                            media=np.full(n, MEDIA_UNKNOWN, np.uint8), num_frames=np.full(n, -1, np.int32)))
    return ShardSet(name=name, shards=shards, streaming=True)


# --------------------------------------------------------------------------------------------- tar headers


def split_name(name: str) -> tuple[str, str] | None:
    """'dir/KEY.ext.more' -> ('dir/KEY', 'ext.more'); None for names without an extension."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _iter_members(get, end: int):
    """Yield (name, data_offset, size) for each regular member of a byte range read through ``get(a, b)``.

    Only headers (and GNU long-name / PAX records) are fetched, so walking past a large member costs nothing.
    Headers are parsed by ``tarfile.TarInfo.frombuf``; the walk stops at an all-zero block or the range end."""
    pos, long_name = 0, None
    while pos + _BLOCK <= end:
        block = get(pos, pos + _BLOCK)
        if len(block) < _BLOCK:
            raise SampleError("truncated", f"tar header at +{pos} is cut short")
        if block == b"\0" * _BLOCK:
            return
        try:
            info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError as e:
            raise SampleError("bad_tar", str(e)) from None
        data = pos + _BLOCK
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = get(data, data + info.size).rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            found = re.search(r"\d+ path=([^\n]*)\n", get(data, data + info.size).decode("utf-8", "replace"))
            long_name = found.group(1) if found else long_name
        else:
            name, long_name = (long_name or info.name), None
            if info.isreg():
                yield name, data, info.size
        pos = data + (info.size + _BLOCK - 1) // _BLOCK * _BLOCK


def parse_sample(buf: bytes) -> tuple[str, dict[str, bytes]]:
    """A sample's byte range -> (key, {ext: bytes}). Raises SampleError for a truncated or mixed-key range."""
    key, members = None, {}
    for name, data, size in _iter_members(lambda a, b: buf[a:b], len(buf)):
        if data + size > len(buf):
            raise SampleError("truncated", f"member {name} ends past the sample's byte range")
        parts = split_name(name)
        if parts is None:
            continue
        if key is None:
            key = parts[0]
        elif parts[0] != key:
            raise SampleError("bad_tar", f"member {name} does not belong to sample {key}")
        members[parts[1]] = buf[data : data + size]
    if key is None:
        raise SampleError("truncated", "no complete member in the sample's byte range")
    return key.rsplit("/", 1)[-1], members


def scan_tar(path: str) -> Shard:
    """Sample table of a local tar without an index, by walking its headers (foreign shards).

    A truncated tail keeps the complete samples before it. Media and frame counts are probed later."""
    keys, offsets, sizes, media = [], [], [], []
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = []
            while True:
                try:
                    m = tar.next()
                except (tarfile.ReadError, EOFError, OSError):
                    break
                if m is None:
                    break
                members.append(m)
    except (tarfile.ReadError, OSError) as e:
        raise AlproError(f"{path}: not a readable tar file ({e})") from None
    size_on_disk = os.path.getsize(path)
    current: str | None = None
    for m in members:
        parts = split_name(m.name) if m.isreg() else None
        if parts is None:
            continue
        end = m.offset_data + (m.size + _BLOCK - 1) // _BLOCK * _BLOCK
        if end > size_on_disk:
            break  # truncated member
        if parts[0] != current:
            current = parts[0]
            keys.append(current.rsplit("/", 1)[-1])
            offsets.append(m.offset)
            sizes.append(end - m.offset)
            media.append(MEDIA_UNKNOWN)
        else:
            sizes[-1] = end - offsets[-1]
        ext = parts[1].split(".")[-1]
        if ext in VIDEO_EXTS:
            media[-1] = MEDIA_VIDEO
        elif ext in IMAGE_EXTS and media[-1] != MEDIA_VIDEO:
            media[-1] = MEDIA_IMAGE
    n = len(keys)
    return Shard(url=path, keys=np.array(keys, dtype="S"), offsets=np.asarray(offsets, np.int64),
                 sizes=np.asarray(sizes, np.int64), media=np.asarray(media, np.uint8),
                 num_frames=np.full(n, -1, np.int32))


# ----------------------------------------------------------------------------------------------- reading


def stream_samples(url: str, on_error) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of a tar read front to back (``pipe:`` commands, any URL webdataset opens). A truncated
    or corrupt tail ends the shard: ``on_error(exception)`` is called and the iteration stops."""
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        on_error(exn)
        return False

    for sample in wds.tarfile_samples([{"url": url}], handler=handler):
        key = sample["__key__"].rsplit("/", 1)[-1]
        yield key, {k: v for k, v in sample.items() if not k.startswith("__")}



class Reader:
    """Positioned reads of sample byte ranges with a few open files kept per process (LRU)."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self._files: OrderedDict[str, object] = OrderedDict()

    def _handle(self, url: str):
        handle = self._files.get(url)
        if handle is None:
            if _is_url(url):
                import fsspec

                handle = fsspec.open(url, "rb").open()
            else:
                handle = os.open(url, os.O_RDONLY)
            self._files[url] = handle
            while len(self._files) > self.max_open:
                self._close(self._files.popitem(last=False)[1])
        self._files.move_to_end(url)
        return handle

    @staticmethod
    def _close(handle) -> None:
        if isinstance(handle, int):
            os.close(handle)
        else:
            handle.close()

    def read(self, url: str, offset: int, size: int) -> bytes:
        try:
            handle = self._handle(url)
            if isinstance(handle, int):
                data = os.pread(handle, size, offset)
            else:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as e:
            raise SampleError("read_error", f"{url}@{offset}: {e}") from None
        if len(data) < size:
            raise SampleError("truncated", f"{url} ends at {offset + len(data)}, sample needs {offset + size}")
        return data

    def sample(self, shard: Shard, j: int) -> tuple[str, dict[str, bytes]]:
        key, members = parse_sample(self.read(shard.url, int(shard.offsets[j]), int(shard.sizes[j])))
        expected = shard.keys[j].decode()
        if key != expected:
            raise SampleError("bad_tar", f"{shard.url}@{shard.offsets[j]}: found sample {key}, index says {expected}")
        return key, members

    def head(self, shard: Shard, j: int, exts: tuple[str, ...] = ("json", "txt"),
             probe: int = 8192) -> dict[str, bytes]:
        """Only the small members ``exts`` of sample j, without reading its media: one read of the first
        ``probe`` bytes (where this project's shards keep json and txt), then only headers and wanted data."""
        url, offset, size = shard.url, int(shard.offsets[j]), int(shard.sizes[j])
        prefix = self.read(url, offset, min(size, probe))

        def get(a: int, b: int) -> bytes:
            b = min(b, size)
            return prefix[a:b] if b <= len(prefix) else self.read(url, offset + a, b - a)

        out: dict[str, bytes] = {}
        for name, data, length in _iter_members(get, size):
            parts = split_name(name)
            if parts and parts[1] in exts:
                out[parts[1]] = get(data, data + length)
                if len(out) == len(exts):
                    break
        return out

    def close(self) -> None:
        while self._files:
            self._close(self._files.popitem()[1])
