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
import io
import json
import logging
import lzma
import os
import posixpath
import re
import subprocess
import tarfile
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard
from braceexpand import braceexpand

from alpro.data.config import LimitsConfig
from alpro.errors import AlproError
from alpro.shard_format import (
    COLUMNS_DIR,
    COLUMNS_META,
    COLUMNS_TAG,
    COLUMNS_VERSION,
    FORMAT_TAG,
    IMAGE_EXTS,
    INDEX_NAME,
    SAMPLE_COLUMNS,
    SHARD_COLUMNS,
    VIDEO_EXTS,
)

LOG = logging.getLogger("alpro.data")
MEDIA_VIDEO, MEDIA_IMAGE, MEDIA_UNKNOWN = 0, 1, 2
_BLOCK = 512
_MAX_RECORD = 1 << 16  # a GNU long name or PAX header record; real ones are a few hundred bytes
_META_RE = re.compile(r"__[^/]*__($|/)")
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


class ShardList(Sequence):
    """The shards of a set as a sequence of *segments*, each a selection of the shards of one table: a
    columnar index (:class:`ColumnIndex`, memory-mapped), or a list of :class:`Shard` (the JSON index, scanned
    tars). ``shards[i]`` is built on access (views of the mapped columns), so a set of 100k shards costs its
    per-shard selection (8 bytes a shard), not 100k objects."""

    def __init__(self, segments: list[tuple[object, np.ndarray]]):
        self.segments = [(table, np.asarray(sel, dtype=np.int64)) for table, sel in segments if len(sel)]
        self._first = np.cumsum([0] + [len(sel) for _, sel in self.segments]).astype(np.int64)
        # The shards built last: a loader reads runs of samples from the same few shards (block order), and
        # building a Shard checks its paths (~0.2 ms, as much as reading a small sample). Never pickled.
        self._recent: dict[int, Shard] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_recent": {}}

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"shard {i} of {len(self)}")
        shard = self._recent.get(i)
        if shard is None:
            k = int(np.searchsorted(self._first, i, side="right")) - 1
            table, sel = self.segments[k]
            shard = table.shard(int(sel[i - self._first[k]]))
            if len(self._recent) >= 64:
                self._recent.clear()
            self._recent[i] = shard
        return shard

    def __iter__(self) -> Iterator[Shard]:
        for table, sel in self.segments:
            for s in sel:
                yield table.shard(int(s))

    def counts(self) -> np.ndarray:
        """(n_shards,) samples per shard, from the per-shard tables only."""
        if not self.segments:
            return np.zeros(0, np.int64)
        return np.concatenate([table.counts()[sel] for table, sel in self.segments]).astype(np.int64)

    def media_counts(self) -> np.ndarray:
        """(n_shards, 3) samples per media code (video, image, unknown) of each shard."""
        if not self.segments:
            return np.zeros((0, 3), np.int64)
        return np.concatenate([table.media_counts()[sel] for table, sel in self.segments]).astype(np.int64)


class ShardTable:
    """Shards held as :class:`Shard` objects (a JSON index, scanned tars): one segment kind of a ShardList."""

    def __init__(self, shards: list[Shard], options: dict | None = None):
        self.shards, self.options = list(shards), options or {}
        self._by_url: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.shards)

    def shard(self, i: int) -> Shard:
        return self.shards[i]

    def counts(self) -> np.ndarray:
        return np.array([len(s) for s in self.shards], dtype=np.int64)

    def media_counts(self) -> np.ndarray:
        out = np.zeros((len(self.shards), 3), np.int64)
        for i, s in enumerate(self.shards):
            out[i] = np.bincount(s.media, minlength=3)[:3]
        return out

    def find(self, url: str) -> int | None:
        if self._by_url is None:
            self._by_url = {}
            for i, s in enumerate(self.shards):
                self._by_url.setdefault(_norm(s.url), i)
        return self._by_url.get(_norm(url))


class ColumnIndex:
    """A columnar index (``index.cols/``) mapped read-only: the per-shard table and the per-sample columns are
    ``np.load(mmap_mode="r")`` views, so a process holds only the pages it touches and DataLoader workers share
    them. Pickled as its path and re-mapped on arrival (a forkserver or spawn worker never receives the columns)."""

    def __init__(self, directory: str, base: str, allow_outside: bool = False):
        self.directory, self.base, self.allow_outside = directory, base, allow_outside
        self._map()

    def _map(self) -> None:
        try:
            meta = json.loads(Path(self.directory, COLUMNS_META).read_bytes())
            load = lambda spec: np.load(os.path.join(self.directory, spec[0]), mmap_mode="r")  # noqa: E731
            self.shard_cols = {name: load(spec) for name, spec in SHARD_COLUMNS.items()}
            self.cols = {name: load(spec) for name, spec in SAMPLE_COLUMNS.items()}
        except (OSError, ValueError) as e:
            raise AlproError(f"{self.directory}: unreadable columnar index ({e})") from None
        self.meta, self.options = meta, meta.get("options") or {}
        self.start = self.shard_cols["start"]
        n, s = int(meta.get("samples", -1)), int(meta.get("shards", -1))
        shapes_ok = (len(self.start) == s + 1 and all(len(c) == s for k, c in self.shard_cols.items() if k != "start")
                     and all(len(c) == n for c in self.cols.values()) and (s == 0 or int(self.start[-1]) == n))
        if meta.get("format") != COLUMNS_TAG or meta.get("version") != COLUMNS_VERSION or not shapes_ok:
            raise AlproError(f"{self.directory}: not a columnar index of format {COLUMNS_TAG} v{COLUMNS_VERSION} "
                             "with consistent columns (rebuild it with alpro shard --merge-index)")
        self._check_names()
        self._by_url: dict[str, int] | None = None

    def _check_names(self) -> None:
        """Every file / idx name must stay inside the directory (as for the JSON index): a vectorised test
        passes plain names; only names with a separator or a dot-dot are checked one by one."""
        for col, what in ((self.shard_cols["file"], "file"), (self.shard_cols["idx"], "idx")):
            if not len(col):
                continue
            odd = ((np.char.find(col, b"/") >= 0) | (np.char.find(col, b"\\") >= 0)
                   | (np.char.find(col, b"..") >= 0) | (np.char.find(col, b":") >= 0))
            if what == "file":
                odd |= col == b""
            for name in col[odd]:
                if what == "idx" and not name:
                    continue
                _inside(self.base, name.decode("utf-8", "surrogateescape"), what, self.allow_outside)

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "base": self.base, "allow_outside": self.allow_outside}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._map()

    def __len__(self) -> int:
        return len(self.start) - 1

    def counts(self) -> np.ndarray:
        return np.diff(self.start)

    def media_counts(self) -> np.ndarray:
        return self.shard_cols["media"]

    def url(self, i: int) -> str:
        return _inside(self.base, self.shard_cols["file"][i].decode("utf-8", "surrogateescape"), "file",
                       self.allow_outside)

    def shard(self, i: int) -> Shard:
        a, b = int(self.start[i]), int(self.start[i + 1])
        idx = self.shard_cols["idx"][i].decode("utf-8", "surrogateescape")
        c = self.cols
        return Shard(url=self.url(i), keys=c["key"][a:b], offsets=c["offset"][a:b], sizes=c["size"][a:b],
                     media=c["media"][a:b], num_frames=c["num_frames"][a:b],
                     index_file=_inside(self.base, idx, "idx", self.allow_outside) if idx else None)

    def find(self, url: str) -> int | None:
        if self._by_url is None:
            self._by_url = {}
            for i in range(len(self)):
                self._by_url.setdefault(_norm(self.url(i)), i)
        return self._by_url.get(_norm(url))


@dataclass
class ShardSet:
    """Every shard of one source, with global sample ids 0..n-1 in shard order. ``shards`` is a list or a
    :class:`ShardList` (what :func:`resolve` returns: segments of indexes, shards built on access)."""

    name: str
    shards: Sequence[Shard]
    streaming: bool = False  # pipe: sources: read front to back only
    options: dict = field(default_factory=dict)  # the sharder's options (codec, gop, ...) when indexed
    starts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        counts = self.shards.counts() if isinstance(self.shards, ShardList) else [len(s) for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def media_ids(self, codes: tuple[int, ...]) -> np.ndarray | None:
        """Global ids of the samples whose media code is in ``codes``; None when that is every sample (read
        from the per-shard media counts, so a set of one media never touches its per-sample column)."""
        if isinstance(self.shards, ShardList):
            per_shard = self.shards.media_counts()
            if per_shard[:, list(codes)].sum() == len(self):
                return None
        media = np.concatenate([np.asarray(s.media) for s in self.shards]) if len(self.shards) else np.zeros(0, np.uint8)
        keep = np.isin(media, codes)
        return None if keep.all() else np.flatnonzero(keep).astype(np.int64)

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


# zstd JSON of an index: a sample costs 40-100 bytes of JSON (key, offset, size, media, frame count), which
# compresses 3-6x (measured on the sharder's indexes); 64x plus a 64 MiB floor leaves a wide margin for real
# indexes while a bomb (a 32 KB file declaring 1 GiB) is refused before anything is allocated.
INDEX_MIN_LIMIT = 64 << 20
INDEX_RATIO_LIMIT = 64


def index_output_limit(compressed: int) -> int:
    """Most bytes an index of ``compressed`` bytes may decompress to."""
    return max(INDEX_MIN_LIMIT, INDEX_RATIO_LIMIT * compressed)


def decompress_index(raw: bytes, path: str) -> bytes:
    """Zstandard-decompress an index with its output bounded by :func:`index_output_limit`.

    A frame that declares its content size (the sharder's do) is checked from its header, before any output
    buffer exists; one that does not is decompressed in 1 MiB steps and stopped at the limit."""
    import zstandard

    limit = index_output_limit(len(raw))
    try:
        declared = zstandard.frame_content_size(raw)
    except zstandard.ZstdError as e:
        raise AlproError(f"{path}: unreadable shard index (not zstandard: {e})") from None
    if declared > limit:
        raise AlproError(f"{path}: index declares {declared} bytes of JSON in {len(raw)} compressed bytes, over the "
                         f"{limit}-byte limit for an index of this size (a decompression bomb?)")
    out, total = [], 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        while chunk := reader.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise AlproError(f"{path}: index expands past {limit} bytes from {len(raw)} compressed bytes "
                                 "(a decompression bomb?)")
            out.append(chunk)
    except zstandard.ZstdError as e:
        raise AlproError(f"{path}: unreadable shard index ({e})") from None
    return b"".join(out)


def _read_index(path: str) -> dict:
    try:
        if _is_url(path):
            import fsspec

            with fsspec.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = Path(path).read_bytes()
        data = json.loads(decompress_index(raw, path))
    except (OSError, ValueError) as e:
        raise AlproError(f"{path}: unreadable shard index ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_TAG or not isinstance(data.get("shards"), list):
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise AlproError(f"{path}: not an alpro shard index (format={found!r})")
    return data


def _inside(base: str, name: object, what: str, allow_outside: bool) -> str:
    """``base/name`` after checking that ``name`` (an index entry's ``file`` / ``idx``) stays inside ``base``.

    Refused unless ``allow_outside``: absolute paths, ``..`` that climbs out, a URL (another bucket or host)
    and, under a URL base, anything that leaves its prefix."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise AlproError(f"{base}/{INDEX_NAME}: shard entry has {what}={name!r}, not a file name")
    if _is_url(base):
        joined = f"{base.rstrip('/')}/{name}"
        escapes = "://" in name or name.startswith("/") or posixpath.normpath(name).split("/")[0] == ".."
    else:
        joined = str(Path(base) / name)
        escapes = os.path.isabs(name) or "://" in name or os.path.normpath(name).split(os.sep)[0] == ".."
    if escapes and not allow_outside:
        raise AlproError(f"{base}/{INDEX_NAME}: shard entry {what}={name!r} points outside the index's directory; "
                         "refused (set data.allow_index_outside: true if you trust this index)")
    return name if escapes and ("://" in name or os.path.isabs(name)) else joined


def _shard_from_entry(entry: dict, base: str, allow_outside: bool = False) -> Shard:
    if not isinstance(entry, dict):
        raise AlproError(f"{base}/{INDEX_NAME}: a shard entry is a {type(entry).__name__}, not an object")
    url = _inside(base, entry.get("file"), "file", allow_outside)
    idx = entry.get("idx")
    idx_url = _inside(base, idx, "idx", allow_outside) if idx else None
    try:
        n = int(entry["num_samples"])
        media = entry.get("media") or ["unknown"] * n
        codes = {"video": MEDIA_VIDEO, "image": MEDIA_IMAGE}
        shard = Shard(
            url=url,
            keys=np.array([str(k).encode() for k in entry["keys"]], dtype="S"),
            offsets=np.asarray(entry["offsets"], dtype=np.int64),
            sizes=np.asarray(entry["sizes"], dtype=np.int64),
            media=np.array([codes.get(m, MEDIA_UNKNOWN) if isinstance(m, str) else MEDIA_UNKNOWN for m in media],
                           dtype=np.uint8),
            num_frames=np.asarray(entry.get("num_frames") or [-1] * n, dtype=np.int32),
            index_file=idx_url,
        )
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise AlproError(f"{base}/{INDEX_NAME}: shard entry {entry.get('file')!r} is malformed ({e!r})") from None
    lengths = {len(shard.keys), len(shard.offsets), len(shard.sizes), len(shard.media), len(shard.num_frames)}
    if lengths != {n} or (n and (shard.offsets.min() < 0 or shard.sizes.min() < 0)):
        raise AlproError(f"{base}/{INDEX_NAME}: shard entry {entry.get('file')!r} is malformed (per-sample lists "
                         f"of lengths {sorted(lengths)} for num_samples={n}, or negative offsets / sizes)")
    return shard


def _norm(url: str) -> str:
    """One spelling per local path (``./d/x.tar`` = ``d/x.tar``), to match tars named by a spec to index entries."""
    return url if _is_url(url) else os.path.normpath(url)


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if _is_url(url) else str(Path(url).parent)


def _exists(path: str) -> bool:
    if _is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return os.path.isfile(path)


def _columns_of(index_path: str, allow_outside: bool) -> ColumnIndex | None:
    """The columnar index next to a local ``index.json.zst``, if there is one that belongs to it (its recorded
    size of the JSON index matches the file): else None, and the JSON is parsed as before."""
    if _is_url(index_path):
        return None
    directory = os.path.join(os.path.dirname(index_path) or ".", COLUMNS_DIR)
    try:
        meta = json.loads(Path(directory, COLUMNS_META).read_bytes())
        size = os.path.getsize(index_path)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("index_bytes") != size:
        LOG.warning(f"{directory} does not belong to {index_path} (another build?): reading the JSON index")
        return None
    return ColumnIndex(directory, _dirname(index_path), allow_outside)


def _open_index(path: str, allow_outside: bool) -> ColumnIndex | ShardTable:
    """The shards an index lists: mapped from its columnar index when there is one, else parsed from the JSON."""
    cols = _columns_of(path, allow_outside)
    if cols is not None:
        return cols
    data = _read_index(path)
    base = _dirname(path)
    return ShardTable([_shard_from_entry(e, base, allow_outside) for e in data["shards"]], data.get("options") or {})


def resolve(spec: str | list[str], name: str, index: str | None = None, allow_outside: bool = False) -> ShardSet:
    """The shard set a spec names. ``index`` overrides where ``index.json.zst`` is looked for. An index whose
    entries leave its directory is refused unless ``allow_outside`` (``data.allow_index_outside``).

    Linear in the number of shards: each index is read once (mapped when it has a columnar index); a tar named
    by the spec is matched to an index entry through one dict per index, built only when a tar is named."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise AlproError(f"{name}: empty shard list")
    if all(s.startswith("pipe:") for s in specs):
        return _resolve_pipe(specs, name, index)
    if any(s.startswith("pipe:") for s in specs):
        raise AlproError(f"{name}: cannot mix pipe: commands with seekable shards in one source")
    named: list[ColumnIndex | ShardTable | str] = []  # in spec order: a whole index, or a tar's url
    spec_tables: list[ColumnIndex | ShardTable] = []
    by_dir: dict[str, ColumnIndex | ShardTable | None] = {}  # directory -> its index (None: it has none)
    for s in specs:
        if s.endswith(INDEX_NAME) or (not _is_url(s) and os.path.isdir(s)):
            path = s if s.endswith(INDEX_NAME) else os.path.join(s, INDEX_NAME)
            if not _exists(path):
                named.extend(_expand(os.path.join(s, "*.tar")))  # a directory of foreign shards
                continue
            directory = _dirname(path)
            table = by_dir.get(directory) or _open_index(path, allow_outside)
            by_dir[directory] = table
            if table not in spec_tables:
                spec_tables.append(table)
            named.append(table)
        else:
            expanded = _expand(s)
            missing = [u for u in expanded if not _is_url(u) and not os.path.isfile(u)]
            if not expanded or missing:
                raise AlproError(f"{name}: no shard matches {s!r}" + (f" ({missing[0]} does not exist)"
                                                                     if missing else ""))
            named.extend(expanded)
    if not any(len(x) for x in named if not isinstance(x, str)) and not any(isinstance(x, str) for x in named):
        raise AlproError(f"{name}: no shards found in {specs}")
    override = None
    if index is not None:
        first = next((x for x in named if isinstance(x, str)), None)
        base = _dirname(first) if first is not None else _dirname(index)
        cols = _columns_of(index, allow_outside)
        if cols is not None:
            override = ColumnIndex(cols.directory, base, allow_outside)  # entries resolve against the tars' dir
        else:
            data = _read_index(index)
            override = ShardTable([_shard_from_entry(e, base, allow_outside) for e in data["shards"]],
                                  data.get("options") or {})

    def lookup(url: str) -> tuple[ColumnIndex | ShardTable, int] | None:
        directory = _dirname(url)
        if directory not in by_dir:
            candidate = f"{directory}/{INDEX_NAME}" if _is_url(url) else os.path.join(directory, INDEX_NAME)
            by_dir[directory] = _open_index(candidate, allow_outside) if _exists(candidate) else None
        for table in [*spec_tables, override, by_dir[directory]]:
            i = table.find(url) if table is not None else None
            if i is not None:
                return table, i
        return None

    segments: list[tuple[ColumnIndex | ShardTable, list[int] | None]] = []
    taken: dict[int, set[int]] = {}  # id(table) -> shard numbers already in the set
    whole: set[int] = set()
    scanned = ShardTable([])
    scanned_urls: set[str] = set()
    options: dict = {}
    for item in named:
        if isinstance(item, str):
            found = lookup(item)
            if found is None:
                if _is_url(item):
                    raise AlproError(f"{name}: {item} is not listed in an {INDEX_NAME}: remote shards need the index")
                if _norm(item) in scanned_urls:
                    continue
                scanned_urls.add(_norm(item))
                scanned.shards.append(scan_tar(item))
                found = (scanned, len(scanned.shards) - 1)
            table, i = found
            if id(table) in whole or i in taken.setdefault(id(table), set()):
                continue
            taken[id(table)].add(i)
            if segments and segments[-1][0] is table and segments[-1][1] is not None:
                segments[-1][1].append(i)
            else:
                segments.append((table, [i]))
        else:
            if id(item) in whole:
                continue
            done = taken.get(id(item))
            segments.append((item, [i for i in range(len(item)) if i not in done] if done else None))
            whole.add(id(item))
        options = options or segments[-1][0].options if segments else options
    parts = []
    for table, sel in segments:
        counts = table.counts()
        sel = np.arange(len(table), dtype=np.int64) if sel is None else np.asarray(sel, dtype=np.int64)
        parts.append((table, sel[counts[sel] > 0]))  # empty shards are left out, as always
    return ShardSet(name=name, shards=ShardList(parts), options=options)


_TOKEN_SPLIT = re.compile(r"[\s'\"<>|;&=]+")


def _named_in(cmd: str, names: dict[str, int]) -> int | None:
    """The index entry whose file name a ``pipe:`` command names: each word of the command and each of its
    ``/``-tails is looked up in ``names`` (O(words)); only a command that names none is scanned for a substring."""
    for token in _TOKEN_SPLIT.split(cmd):
        parts = token.split("/")
        for k in range(len(parts)):
            hit = names.get("/".join(parts[k:]))
            if hit is not None:
                return hit
    return next((i for f, i in names.items() if f and f in cmd), None)


def _resolve_pipe(specs: list[str], name: str, index: str | None) -> ShardSet:
    """pipe: commands, one per shard after brace expansion; sample counts come from an index when given."""
    commands = [c for s in specs for c in braceexpand(s)]
    names: dict[str, int] = {}
    cols = _columns_of(index, True) if index is not None else None
    entries: list = []
    if cols is not None:
        for i, f in enumerate(cols.shard_cols["file"].tolist()):
            names.setdefault(f.decode("utf-8", "surrogateescape"), i)
    elif index is not None:
        entries = [e for e in _read_index(index)["shards"] if isinstance(e, dict)]
        for i, e in enumerate(entries):
            names.setdefault(str(e.get("file")), i)
    shards = []
    for cmd in commands:
        i = _named_in(cmd, names) if names else None
        if i is not None and cols is not None:
            a, b = int(cols.start[i]), int(cols.start[i + 1])
            n, keys = b - a, cols.cols["key"][a:b]
        else:
            entry = entries[i] if i is not None else None
            try:
                n = int(entry["num_samples"]) if entry else 0
                keys = np.array([str(k).encode() for k in entry["keys"]], dtype="S") if entry else np.array([], "S")
            except (KeyError, TypeError, ValueError) as e:
                raise AlproError(f"{index}: shard entry {entry.get('file')!r} is malformed ({e!r})") from None
        shards.append(Shard(url=cmd, keys=keys, offsets=np.zeros(n, np.int64), sizes=np.zeros(n, np.int64),
                            media=np.full(n, MEDIA_UNKNOWN, np.uint8), num_frames=np.full(n, -1, np.int32)))
    return ShardSet(name=name, shards=shards, streaming=True)


# --------------------------------------------------------------------------------------------- tar headers


def split_name(name: str) -> tuple[str, str] | None:
    """'dir/KEY.ext.more' -> ('dir/KEY', 'ext.more'); None for names without an extension."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _iter_members(get, end: int, whole_tar: bool = False, starts: bool = False):
    """Yield (name, data_offset, size) for each regular member of a byte range read through ``get(a, b)``;
    with ``starts``, (header_offset, name, data_offset, size), where the header offset is that of the member's
    first record (a GNU long name or PAX record before its header, if any).

    Only headers (and GNU long-name / PAX records) are fetched, so walking past a large member costs nothing.
    Headers are parsed by ``tarfile.TarInfo.frombuf``; the walk stops at an all-zero block or the range end.
    ``whole_tar``: the range is a whole tar file, so ending without the all-zero end-of-archive block, or
    with a header cut short, raises SampleError('truncated') naming the byte where the file ends."""
    pos, long_name, first = 0, None, None
    while pos + _BLOCK <= end:
        first = pos if first is None else first
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
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE) and info.size > _MAX_RECORD:
            raise SampleError("bad_tar", f"tar header at +{pos}: a {info.size}-byte name / PAX record")
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = get(data, data + info.size).rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            found = re.search(r"\d+ path=([^\n]*)\n", get(data, data + info.size).decode("utf-8", "replace"))
            long_name = found.group(1) if found else long_name
        else:
            name, long_name = (long_name or info.name), None
            if info.isreg():
                yield (first, name, data, info.size) if starts else (name, data, info.size)
            first = None
        pos = data + (info.size + _BLOCK - 1) // _BLOCK * _BLOCK
    if whole_tar:
        where = ("without its end-of-archive block" if pos == end else f"inside the header at byte {pos}"
                 if pos < end else f"inside the member whose data starts at byte {data}")
        raise SampleError("truncated", f"the tar ends at byte {end}, {where}")


def member_cap(limits: LimitsConfig, ext: str) -> tuple[str, int]:
    """(kind, cap) of a member by its extension (the last dotted part decides: ``seg.mp4`` is a video). Here and
    not on :class:`LimitsConfig`: the member kinds are the shard format's, and the config must not import it."""
    last = ext.rsplit(".", 1)[-1].lower()
    if last in VIDEO_EXTS:
        return "video", limits.video_bytes
    if last in IMAGE_EXTS:
        return "image", limits.image_bytes
    return "other", limits.other_bytes


def _check_size(name: str, ext: str, size: int, limits: LimitsConfig) -> None:
    """SampleError('too_large') for a member over its kind's cap (decided from the tar header alone)."""
    kind, cap = member_cap(limits, ext)
    if size > cap:
        raise SampleError("too_large", f"member {name} is {size} bytes, over the {kind} cap of {cap} "
                          f"(data.limits.{kind}_bytes)")


def parse_sample(buf: bytes, limits: LimitsConfig | None = None) -> tuple[str, dict[str, bytes]]:
    """A sample's byte range -> (key, {ext: bytes}). Raises SampleError for a truncated or mixed-key range, or
    a member over its size cap."""
    listing = list(_iter_members(lambda a, b: buf[a:b], len(buf)))
    return _sample_members(buf, listing, limits or LimitsConfig())


def _sample_members(buf: bytes, listing: list[tuple[str, int, int]],
                    limits: LimitsConfig) -> tuple[str, dict[str, bytes]]:
    """(key, {ext: bytes}) from a sample's bytes and its member listing (name, data offset, size)."""
    key, members = None, {}
    for name, data, size in listing:
        parts = split_name(name)
        if parts is not None:
            _check_size(name, parts[1], size, limits)
        if data + size > len(buf):
            raise SampleError("truncated", f"member {name} ends past the sample's byte range")
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


@contextmanager
def open_local_tar(path: str | os.PathLike) -> Iterator[tuple[Callable[[int, int], bytes], int]]:
    """A local tar for positioned reads (what :func:`_iter_members` walks): ``(get, size)``, ``get(a, b)`` the
    bytes ``[a, min(b, size))``; a file that cannot be opened is a one-line AlproError."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise AlproError(f"{path}: not a readable tar file ({e})") from None
    try:
        size = os.fstat(fd).st_size
        yield (lambda a, b: os.pread(fd, max(0, min(b, size) - a), a)), size
    finally:
        os.close(fd)


def scan_tar(path: str) -> Shard:
    """Sample table of a local tar without an index, by walking its headers (foreign shards).

    A tar that ends early keeps the complete samples before the cut; the sample the cut falls in (or, for a
    tar without its end-of-archive block, the last one) stays listed with a byte range past the end of the
    file, so reading it counts ``truncated`` exactly as with an index. Media and frame counts are probed
    later."""
    keys, offsets, sizes, media = [], [], [], []
    with open_local_tar(path) as (get, size_on_disk):
        current: str | None = None
        try:
            for start, name, data, length in _iter_members(get, size_on_disk, whole_tar=True, starts=True):
                parts = split_name(name)
                if parts is None:
                    continue
                end = data + (length + _BLOCK - 1) // _BLOCK * _BLOCK
                if parts[0] != current:
                    current = parts[0]
                    keys.append(current.rsplit("/", 1)[-1])
                    offsets.append(start)
                    media.append(MEDIA_UNKNOWN)
                    sizes.append(0)
                sizes[-1] = end - offsets[-1]
                ext = parts[1].split(".")[-1]
                if ext in VIDEO_EXTS:
                    media[-1] = MEDIA_VIDEO
                elif ext in IMAGE_EXTS and media[-1] != MEDIA_VIDEO:
                    media[-1] = MEDIA_IMAGE
        except SampleError as e:
            if not keys and e.reason != "truncated":
                raise AlproError(f"{path}: not a readable tar file ({e})") from None
            detail = str(e).split(": ", 1)[-1]
            LOG.warning(f"{path}: {detail}" + ("; its last sample counts as truncated" if keys else ""))
            if keys and e.reason == "truncated":
                sizes[-1] = max(sizes[-1], size_on_disk + _BLOCK - offsets[-1])
    n = len(keys)
    return Shard(url=path, keys=np.array(keys, dtype="S"), offsets=np.asarray(offsets, np.int64),
                 sizes=np.asarray(sizes, np.int64), media=np.asarray(media, np.uint8),
                 num_frames=np.full(n, -1, np.int32))


# ----------------------------------------------------------------------------------------------- reading


class PipeFailed(Exception):
    """A ``pipe:`` command exited with a non-zero status (``status``, last stderr line ``last``)."""

    def __init__(self, status: int, last: str):
        super().__init__(f"exit status {status}")
        self.status, self.last = status, last


def _open_stream(url: str):
    """(file object, finish) of a tar read front to back; ``finish()`` waits for a ``pipe:`` command and
    raises :class:`PipeFailed` when it failed. Its stderr goes to a temporary file (no pipe to fill up)."""
    if not url.startswith("pipe:"):
        if _is_url(url):
            import fsspec

            f = fsspec.open(url, "rb").open()
        else:
            f = open(url, "rb")  # noqa: SIM115 -- closed by finish()
        return f, lambda kill=False: f.close()
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=err,
                            stdin=subprocess.DEVNULL)

    def finish(kill: bool = False) -> None:
        if kill and proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        status = proc.wait()
        err.seek(0, os.SEEK_END)
        err.seek(max(0, err.tell() - 4096))
        lines = [ln for ln in err.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        err.close()
        if status != 0 and not kill:
            raise PipeFailed(status, lines[-1].strip() if lines else "(no stderr)")

    return proc.stdout, finish


def _stream_once(url: str, on_error, limits: LimitsConfig, skip: int, done: list[int]):
    """One pass over a streamed tar: (key, members) of each complete sample after the first ``skip`` events.

    An event is a delivered sample or a reported bad one; ``done[0]`` counts them so that a retry resumes
    after the last one. Members over their cap are skipped from their header size (tarfile's stream mode
    reads past them in small blocks); compressed tars are decompressed on the fly (:func:`_decompressed`)."""
    f, finish = _open_stream(url)
    finished = False
    try:
        key, members, bad = None, {}, None

        def flush():
            if key is None:
                return None
            done[0] += 1
            if done[0] <= skip:
                return None
            if bad is not None:
                on_error(bad)
                return None
            if not members:
                return None
            return key.rsplit("/", 1)[-1], members

        try:
            with tarfile.open(fileobj=_decompressed(f), mode="r|", bufsize=1 << 16) as tar:
                for info in tar:
                    parts = split_name(info.name) if info.isreg() else None
                    if parts is None or _META_RE.match(info.name):  # webdataset's __meta__ members
                        continue
                    if parts[0] != key:
                        out = flush()
                        if out is not None:
                            yield out
                        key, members, bad = parts[0], {}, None
                    if bad is not None or done[0] < skip:
                        continue
                    try:
                        _check_size(info.name, parts[1], info.size, limits)
                    except SampleError as e:
                        bad = e
                        continue
                    data = tar.extractfile(info).read()
                    if len(data) < info.size:
                        raise EOFError(f"member {info.name} is cut short")
                    members[parts[1]] = data
                # tarfile's stream mode ends quietly at a cut header or a cut member it skipped: the end of
                # archive is only proven by a whole (zero) block read where the next header should be.
                if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:
                    raise EOFError(f"the tar stream ends at byte {tar.fileobj.pos}, before its end-of-archive "
                                   "block (inside a member or a header)")
        except (tarfile.ReadError, EOFError, OSError, lzma.LZMAError, zstandard.ZstdError) as e:
            # The stream ends inside a member (a cut shard) or is not a tar at all: the sample being read is
            # lost, the complete ones before it were delivered. A failed command is reported by finish().
            finish_error = _finish_quietly(finish)
            finished = True
            if finish_error is not None:
                raise finish_error from None
            done[0] += 1
            if done[0] > skip:
                on_error(SampleError("truncated", f"{url}: {e}"))
            return
        out = flush()
        if out is not None:
            yield out
        finished = True
        finish()
    finally:
        if not finished:
            finish(kill=True)


class _Prefixed(io.RawIOBase):
    """``head`` (bytes already read to sniff the format), then the rest of ``f``."""

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)


def _decompressed(f):
    """A plain tar stream from ``f``: gzip, bzip2, xz and zstd are recognised by their magic bytes.

    The stdlib / zstandard readers return at most what is asked for, so skipping a huge member costs CPU
    only; tarfile's own ``r|*`` decompresses a whole input block at once and re-copies its remainder on every
    read, which is quadratic on a highly compressed member (a 1 GiB run of zeros)."""
    import bz2
    import gzip

    head = f.read(6)
    stream = io.BufferedReader(_Prefixed(head, f), 1 << 20)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(stream)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    return stream


def _finish_quietly(finish) -> PipeFailed | None:
    try:
        finish()
    except PipeFailed as e:
        return e
    return None


def stream_samples(url: str, on_error, limits: LimitsConfig | None = None,
                   retries: int = 2) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, members) of a tar read front to back (``pipe:`` commands, local paths, fsspec URLs), grouped by
    key as webdataset does. A truncated or corrupt tail ends the shard: ``on_error(SampleError('truncated'))``
    is called and the iteration stops; a sample with a member over its cap is reported the same way
    (``too_large``) and left out. A ``pipe:`` command that exits with a non-zero status is run again up to
    ``retries`` times (after 1 s, 2 s, ...), continuing after the samples already delivered; then one
    :class:`AlproError` names the command, its status and the last line of its stderr."""
    limits = limits or LimitsConfig()
    done = [0]
    for attempt in range(retries + 1):
        skip, done[0] = done[0], 0
        try:
            yield from _stream_once(url, on_error, limits, skip, done)
            return
        except PipeFailed as e:
            done[0] = max(done[0], skip)
            if attempt == retries:
                raise AlproError(f"{url[len('pipe:'):]!r} failed with exit status {e.status} "
                                 f"({attempt + 1} attempt(s)): {e.last}") from None
            time.sleep(min(2 ** attempt, 8))


class Reader:
    """Positioned reads of sample byte ranges with a few open files kept per process (LRU)."""

    def __init__(self, max_open: int = 16, limits: LimitsConfig | None = None):
        self.max_open, self.limits = max_open, limits or LimitsConfig()
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
                end = os.fstat(handle).st_size
                if end < offset + size:  # known before reading: no buffer for bytes that are not there
                    raise SampleError("truncated", f"{url} ends at {end}, sample needs {offset + size}")
                data = os.pread(handle, size, offset)
            else:
                handle.seek(offset)
                data = handle.read(size)
        except OSError as e:
            raise SampleError("read_error", f"{url}@{offset}: {e}") from None
        if len(data) < size:
            raise SampleError("truncated", f"{url} ends at {offset + len(data)}, sample needs {offset + size}")
        return data

    def sample(self, shard: Shard, j: int, probe: int = 16384) -> tuple[str, dict[str, bytes]]:
        """Key and members of sample j. Every member's size is checked against ``limits`` from its tar header
        before its bytes are read: one read of the first ``probe`` bytes holds the headers of json, txt, vinfo
        and the media member of this project's shards (other layouts cost one small read per header), then one
        read of the whole byte range."""
        url, offset, size = shard.url, int(shard.offsets[j]), int(shard.sizes[j])
        head = self.read(url, offset, min(size, probe))

        def get(a: int, b: int) -> bytes:
            b = min(b, size)
            return head[a:b] if b <= len(head) else self.read(url, offset + a, b - a)

        listing = []
        for name, data, length in _iter_members(get, size):
            parts = split_name(name)
            if parts is not None:
                _check_size(name, parts[1], length, self.limits)
            listing.append((name, data, length))
        if size > self.limits.sample_bytes:
            raise SampleError("too_large", f"{url}@{offset}: sample of {size} bytes, over the "
                              f"{self.limits.sample_bytes}-byte bound of one media member and four small ones")
        buf = head if size <= len(head) else self.read(url, offset, size)
        key, members = _sample_members(buf, listing, self.limits)
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
                _check_size(name, parts[1], length, self.limits)
                out[parts[1]] = get(data, data + length)
                if len(out) == len(exts):
                    break
        return out

    def close(self) -> None:
        while self._files:
            self._close(self._files.popitem()[1])
