"""Manifests -> one list of rows: WebVid CSV, CC3M TSV, JSONL, MSRVTT/DiDeMo annotation JSON, plain folders.

Every reader yields :class:`ManifestRow` in manifest order. A row that cannot be understood at all (bad JSON,
wrong number of CSV fields, no media column) is a user error: :class:`~alpro.errors.AlproError` naming the file
and line, raised before any work starts. Rows that parse but carry bad *content* (empty or non-UTF-8 captions,
missing files, duplicate ids) are not errors here: the sharder rejects them one by one, with a reason.

Text is decoded as UTF-8 with ``surrogateescape`` so that one non-UTF-8 caption does not stop the whole manifest:
its undecodable bytes survive as lone surrogates, and the sharder drops that caption (counted as
``captions_dropped``), rejecting the row as ``caption_not_utf8`` only when no good caption is left.

Media paths are joined to the media root (the manifest's directory, ``--media-root``, or the folder) without
resolving symlinks: resolving here would make a symlink loop in one row stop the whole manifest (it is rejected
when the file is read instead), and would turn a symlinked media directory into a machine-specific path.
:func:`relative_source` gives the root-relative form that ``KEY.json`` stores.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alpro.errors import AlproError
from alpro.fileio import is_url

__all__ = [
    "ManifestRow",
    "Manifest",
    "FORMATS",
    "VIDEO_EXTS",
    "IMAGE_EXTS",
    "read_manifest",
    "stream_manifest",
    "ManifestStream",
    "relative_source",
    "select_rows",
    "sanitize_key",
]

FORMATS = ("csv", "tsv", "jsonl", "json", "folder")
VIDEO_EXTS = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ts", ".gif"})
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})

# Column names recognised in CSV/TSV headers and JSON rows, in order of preference.
_ID_COLS = ("id", "videoid", "video_id", "key", "image_id")
_CAPTION_COLS = ("caption", "captions", "name", "text", "title", "sentence")
_PATH_COLS = ("path", "video", "image", "filepath", "file", "filename", "video_path", "image_path")
_MAX_KEY_LEN = 90  # KEY + ".vinfo" stays within the 100-byte name field of a plain tar header


@dataclass
class ManifestRow:
    """One input sample as the manifest describes it (content not checked yet)."""

    line: int
    """1-based line of the row in the manifest (item number for JSON lists and folders); used in errors/rejects."""
    id: str
    media: Literal["video", "image"]
    source: str
    """Absolute path of the media file: the manifest's path joined to the media root (symlinks not resolved)."""
    captions: list[str] | None
    """Raw captions (may hold lone surrogates from non-UTF-8 bytes); ``None`` when the row has no caption field."""
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """Rows plus what the sharder records about where they came from."""

    path: Path
    format: str
    rows: list[ManifestRow]
    sha256: str
    """Hash of the manifest bytes (and QA files): a rerun into the same OUT_DIR must use the same inputs."""
    warnings: list[str] = field(default_factory=list)
    root: Path | None = None
    """Absolute directory that relative media paths resolve against (the manifest's directory, ``media_root``,
    or the folder itself); ``KEY.json`` stores sources relative to it (:func:`relative_source`)."""


def relative_source(source: str, root: Path | None) -> str:
    """``source`` relative to ``root`` as a POSIX path (``videos/a.mp4``; ``../other/b.mp4`` outside it).

    Lexical (``os.path.relpath``), so it is the same on every machine that lays the corpus out the same way,
    whatever directory the corpus sits in; ``root=None`` keeps the absolute path.
    """
    if root is None:
        return source
    return Path(os.path.relpath(source, root)).as_posix()


def sanitize_key(item_id: str) -> str:
    """The tar KEY for an id: ``[A-Za-z0-9_-]`` only (webdataset splits keys at the first dot), at most 90 chars.

    Long ids keep a readable prefix plus 16 hex digits of their SHA-1, so distinct long ids stay distinct.
    """
    key = re.sub(r"[^A-Za-z0-9_-]", "_", item_id) or "_"
    if len(key) > _MAX_KEY_LEN:
        digest = hashlib.sha1(item_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        key = f"{key[: _MAX_KEY_LEN - 17]}_{digest}"
    return key


def _suffix(path: str) -> str:
    """``Path(path).suffix`` without building a Path (a manifest has millions of rows); the same string."""
    if not path or path == "." or path.endswith(("/", "/.")):
        return Path(path).suffix  # pathlib drops trailing "/" and "." parts first
    name = path.rsplit("/", 1)[-1]
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _media_of(path: str, default: Literal["video", "image"] = "video") -> Literal["video", "image"]:
    suffix = _suffix(path).lower()
    if suffix in IMAGE_EXTS:
        return "image"
    if suffix in VIDEO_EXTS:
        return "video"
    return default


def _captions(value: Any, where: str) -> list[str]:
    """A caption field (str, list of str, or null) -> list of raw strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return list(value)
    raise AlproError(f"{where}: caption must be a string or a list of strings, got {type(value).__name__}")


def _first(row: dict[str, Any], names: Iterable[str]) -> tuple[str | None, Any]:
    for name in names:
        if name in row and row[name] not in (None, ""):
            return name, row[name]
    return None, None


def _id_from_path(rel: str) -> str:
    """``00000/000000012.jpg`` -> ``00000/000000012``: unique as long as paths are, unlike bare stems."""
    rel = rel.replace("\\", "/").lstrip("./")
    return str(Path(rel).with_suffix("")) if Path(rel).suffix else rel


class _Resolver:
    """Turns manifest paths and clip names into absolute source paths."""

    def __init__(self, base: Path | str, video_ext: str) -> None:
        self.base = base
        self._url = isinstance(base, str)  # an fsspec URL (s3://bucket/media): joined as a string
        self._prefix = str(base).rstrip("/") + "/"
        self.video_ext = video_ext if video_ext.startswith(".") else f".{video_ext}"

    def path(self, rel: str) -> str:
        """Joined, not resolved: a symlink loop is a reject when the file is read, not an error here."""
        if is_url(rel):
            return rel
        if self._url and not rel.startswith(("/", "~")):
            return self._prefix + rel.removeprefix("./")
        if (rel and rel[0] not in "/~" and not rel.startswith("./") and "//" not in rel and "/./" not in rel
                and not rel.endswith(("/", "/.")) and rel != "."):
            return self._prefix + rel  # what pathlib gives for a plain relative path, ~10x faster
        p = Path(rel).expanduser()
        return str(p if p.is_absolute() else self.base / p)

    def clip(self, name: str) -> str:
        """A clip name (``video123`` or ``video123.mp4``) -> path under the media root."""
        return self.path(name if _suffix(name).lower() in VIDEO_EXTS | IMAGE_EXTS else name + self.video_ext)


def _decode(data: bytes) -> str:
    return data.decode("utf-8-sig", "surrogateescape")


# ---------------------------------------------------------------------------------------------- CSV / TSV


def _text_lines(path: Path) -> Iterator[str]:
    """The manifest's lines without their ``\n``, decoded one by one (the file is never whole in memory).

    Equal to ``_decode(path.read_bytes()).split("\n")`` minus a final empty piece: UTF-8 never uses the byte
    0x0A inside a character, so decoding line by line (BOM dropped from the first) gives the same text."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            yield raw.decode("utf-8-sig" if i == 0 else "utf-8", "surrogateescape").removesuffix("\n")


def _csv_text(path: Path) -> io.TextIOWrapper:
    """The manifest as a text stream for :mod:`csv` (decoded incrementally, same text as :func:`_decode`)."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _table_rows(path: Path, stream: Iterable[str], delimiter: str, res: _Resolver) -> Iterator[ManifestRow]:
    """Header-driven CSV/TSV (WebVid: ``videoid,name,page_dir``; or any ``path``/``caption`` columns);
    ``stream`` is the text as :mod:`csv` reads it (a file opened with ``newline=""``)."""
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # CC3M captions contain bare quotes
    reader = csv.reader(stream, delimiter=delimiter, quoting=quoting)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    lower = [h.lower() for h in header]
    cols = dict(zip(lower, range(len(lower))))
    id_col = next((c for c in _ID_COLS if c in cols), None)
    cap_col = next((c for c in _CAPTION_COLS if c in cols), None)
    path_col = next((c for c in _PATH_COLS if c in cols), None)
    if path_col is None and id_col is None:
        raise AlproError(
            f"{path}:1: header has no media column (expected one of {', '.join(_PATH_COLS)}, or videoid [+ page_dir])"
        )
    if cap_col is None:
        raise AlproError(f"{path}:1: header has no caption column (expected one of {', '.join(_CAPTION_COLS)})")
    known = {c for c in (id_col, cap_col, path_col, "split") if c}
    for fields in reader:
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise AlproError(f"{path}:{line}: expected {len(header)} fields ({delimiter!r}-separated), got {len(fields)}")
        row = dict(zip(lower, fields))
        if path_col and row[path_col]:
            source = res.path(row[path_col])
            item_id = row[id_col] if id_col and row[id_col] else _id_from_path(row[path_col])
        elif id_col and row[id_col]:
            item_id = row[id_col]
            # WebVid as downloaded by video2dataset/webvid scripts: {page_dir}/{videoid}.mp4
            sub = f"{row['page_dir']}/{item_id}" if row.get("page_dir") else item_id
            source = res.clip(sub)
        else:
            raise AlproError(f"{path}:{line}: row has neither a path nor an id")
        yield ManifestRow(
            line=line,
            id=item_id,
            media="image" if path_col == "image" else _media_of(source),
            source=source,
            captions=[row[cap_col]],
            split=row.get("split") or None,
            extra={header[i]: fields[i] for i, c in enumerate(lower) if c not in known},
        )


def _cc3m_rows(path: Path, res: _Resolver) -> Iterator[ManifestRow]:
    """CC3M TSV: headerless ``caption<TAB>image_path`` lines, or a header naming a caption column."""
    first = next(iter(_text_lines(path)), "").lower().split("\t")
    if any(c.strip() in _CAPTION_COLS for c in first):
        with _csv_text(path) as stream:
            yield from _table_rows(path, stream, "\t", res)
        return
    for line, raw in enumerate(_text_lines(path), start=1):
        raw = raw.rstrip("\r")
        if not raw.strip():
            continue
        fields = raw.split("\t")
        if len(fields) < 2 or not fields[1].strip():
            raise AlproError(f"{path}:{line}: expected 'caption<TAB>path', got {len(fields)} field(s)")
        rel = fields[1].strip()
        yield ManifestRow(line=line, id=_id_from_path(rel), media=_media_of(rel, "image"), source=res.path(rel),
                          captions=[fields[0]], extra={f"col{i}": v for i, v in enumerate(fields[2:], start=2)})


# ---------------------------------------------------------------------------------------------- JSON / JSONL


class _Grouper:
    """Collects JSON(L) rows of three kinds into samples, merging annotation and QA rows by clip.

    * sample rows: ``{"video"|"image": path, "caption"|"captions": ..., "id": ..., ...extra}``
    * retrieval annotations (ALPRO/MSRVTT/DiDeMo): ``{"clip_name": ..., "caption": ...}``, one or many per clip
    * QA rows (MSRVTT-QA, MSVD-QA): ``{"question", "answer", "video_id", "answer_type"}`` -> ``extra["qa"]``
    """

    def __init__(self, path: Path, res: _Resolver) -> None:
        self.path, self.res = path, res
        self.rows: list[ManifestRow] = []
        self.clips: dict[str, ManifestRow] = {}

    def add(self, obj: Any, line: int) -> None:
        where = f"{self.path}:{line}"
        if not isinstance(obj, dict):
            raise AlproError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        media_key, media_path = _first(obj, ("video", "image", "path", "filepath", "video_path", "image_path"))
        if media_path is not None:
            self._sample(obj, line, where, media_key, media_path)
        elif "clip_name" in obj or ("video_id" in obj and any(c in obj for c in _CAPTION_COLS)):
            clip = str(obj.get("clip_name") or obj["video_id"])
            row = self._clip(clip, line)
            caps = next((obj[c] for c in _CAPTION_COLS if c in obj), None)
            row.captions = (row.captions or []) + _captions(caps, where)
            if obj.get("split") and row.split is None:
                row.split = str(obj["split"])
        elif "question" in obj and "video_id" in obj:
            row = self._clip(str(obj["video_id"]), line)
            row.extra.setdefault("qa", []).append({k: v for k, v in obj.items() if k != "video_id"})
        else:
            raise AlproError(
                f"{where}: row has none of 'video', 'image', 'path', 'clip_name', or 'question' + 'video_id'"
            )

    def _sample(self, obj: dict[str, Any], line: int, where: str, media_key: str, media_path: Any) -> None:
        if not isinstance(media_path, str):
            raise AlproError(f"{where}: '{media_key}' must be a path string, got {type(media_path).__name__}")
        cap_key = next((c for c in _CAPTION_COLS if c in obj), None)  # present but empty -> empty_caption
        caps = obj.get(cap_key) if cap_key else None
        item_id = obj.get("id", obj.get("video_id", obj.get("image_id")))
        item_id = _id_from_path(media_path) if item_id in (None, "") else str(item_id)
        used = {media_key, cap_key, "id", "split"}
        if "id" not in obj:
            used |= {"video_id", "image_id"}
        split = obj.get("split")
        self.rows.append(ManifestRow(
            line=line,
            id=item_id,
            media="image" if media_key == "image" else _media_of(media_path),
            source=self.res.path(media_path),
            captions=_captions(caps, where) if cap_key else None,
            split=None if split is None else str(split),
            extra={k: v for k, v in obj.items() if k not in used},
        ))

    def _clip(self, clip: str, line: int) -> ManifestRow:
        """The row of an annotation clip, created at its first mention (so samples keep first-mention order)."""
        if clip not in self.clips:
            row = ManifestRow(line=line, id=_id_from_path(clip) if Path(clip).suffix.lower() in VIDEO_EXTS else clip,
                              media="video", source=self.res.clip(clip), captions=None)
            self.clips[clip] = row
            self.rows.append(row)
        return self.clips[clip]


def _json_lines(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(1-based line, parsed value) of each non-blank JSONL line; a bad line is a one-line error naming it."""
    for line, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            raise AlproError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno})") from None


def _jsonl_rows(path: Path, res: _Resolver) -> list[ManifestRow]:
    grouper = _Grouper(path, res)
    for line, obj in _json_lines(path, _text_lines(path)):
        grouper.add(obj, line)
    return grouper.rows


class _Grouped(Exception):
    """A JSONL line that merges into another row (annotation or QA row): the file cannot be streamed row by row."""


def _jsonl_stream(path: Path, res: _Resolver) -> Iterator[ManifestRow]:
    """Rows of a JSONL manifest of sample rows, one line at a time; :class:`_Grouped` at the first line that is
    an annotation or QA row (those merge by clip, which needs the whole file)."""
    grouper = _Grouper(path, res)
    for line, obj in _json_lines(path, _text_lines(path)):
        grouper.add(obj, line)
        if grouper.clips:
            raise _Grouped
        yield grouper.rows.pop()


def _json_rows(path: Path, text: str, res: _Resolver) -> list[ManifestRow]:
    """A JSON list of rows, MSRVTT's ``{"videos": [...], "sentences": [...]}``, or ``{clip: captions}``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AlproError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    grouper = _Grouper(path, res)
    if isinstance(data, list):
        for i, obj in enumerate(data, start=1):
            grouper.add(obj, i)
    elif isinstance(data, dict) and "sentences" in data:
        for i, video in enumerate(data.get("videos", []), start=1):
            if not isinstance(video, dict) or "video_id" not in video:
                raise AlproError(f"{path}: videos[{i - 1}] has no 'video_id'")
            row = grouper._clip(str(video["video_id"]), i)
            row.split = None if video.get("split") is None else str(video["split"])
            row.extra.update({k: v for k, v in video.items() if k not in ("video_id", "split")})
        for i, sent in enumerate(data["sentences"], start=1):
            if not isinstance(sent, dict) or "video_id" not in sent or "caption" not in sent:
                raise AlproError(f"{path}: sentences[{i - 1}] needs 'video_id' and 'caption'")
            row = grouper._clip(str(sent["video_id"]), len(grouper.rows) + 1)
            row.captions = (row.captions or []) + _captions(sent["caption"], f"{path}: sentences[{i - 1}]")
    elif isinstance(data, dict):
        for i, (clip, caps) in enumerate(data.items(), start=1):
            row = grouper._clip(str(clip), i)
            row.captions = (row.captions or []) + _captions(caps, f"{path}: [{clip!r}]")
    else:
        raise AlproError(f"{path}: expected a JSON list or object at top level, got {type(data).__name__}")
    return grouper.rows


# ---------------------------------------------------------------------------------------------- folders


def _folder_rows(root: Path) -> list[ManifestRow]:
    """Media files under ``root`` (recursive, sorted) with captions from a same-stem ``.txt`` sidecar (one per
    line) and extra fields from an optional same-stem ``.json`` sidecar."""
    rows = []
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTS | IMAGE_EXTS)
    for i, p in enumerate(files, start=1):
        sidecar, meta = p.with_suffix(".txt"), p.with_suffix(".json")
        captions = None
        if sidecar.is_file():
            captions = [c for c in _decode(sidecar.read_bytes()).splitlines() if c.strip()]
        extra: dict[str, Any] = {}
        if meta.is_file():
            try:
                extra = json.loads(meta.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AlproError(f"{meta}: invalid JSON sidecar ({e})") from None
            if not isinstance(extra, dict):
                raise AlproError(f"{meta}: JSON sidecar must be an object")
        rel = p.relative_to(root).as_posix()
        split = extra.pop("split", None)
        rows.append(ManifestRow(line=i, id=str(extra.pop("id", _id_from_path(rel))), media=_media_of(rel),
                                source=str(p), captions=captions,
                                split=None if split is None else str(split), extra=extra))
    return rows


# ---------------------------------------------------------------------------------------------- entry points


def _detect_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".gz":
        raise AlproError(f"{path}: compressed manifests are not supported; decompress it first")
    fmt = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}.get(suffix)
    if fmt is None:
        raise AlproError(f"{path}: cannot tell the manifest format from '{suffix}'; pass --format {{{','.join(FORMATS)}}}")
    return fmt


def _checked(path: str | Path, fmt: str | None, media_root: str | Path | None) -> tuple[Path, str, Path]:
    """(path, format, media root) of a manifest, or the one-line error that stops the run before any work."""
    path = Path(path)
    if not path.exists():
        raise AlproError(f"manifest not found: {path}")
    fmt = fmt or _detect_format(path)
    if fmt not in FORMATS:
        raise AlproError(f"unknown manifest format {fmt!r} (choose from {', '.join(FORMATS)})")
    if (fmt == "folder") != path.is_dir():
        raise AlproError(f"{path}: format '{fmt}' needs a {'folder' if fmt == 'folder' else 'file'}")
    if media_root is not None and is_url(str(media_root)):
        if fmt == "folder":
            raise AlproError(f"{path}: a folder manifest takes no --media-root")
        return path, fmt, str(media_root).rstrip("/")  # type: ignore[return-value]
    # Absolute but not resolved (see the module docstring); a folder is its own root.
    root = (path if fmt == "folder" else Path(media_root).expanduser() if media_root else path.parent).absolute()
    return path, fmt, root


def _hash_file(path: Path, digest: Any) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)


def _line_rows(path: Path, fmt: str, res: _Resolver) -> Iterator[ManifestRow]:
    """Rows of a CSV or TSV manifest, read as a stream."""
    if fmt == "csv":
        with _csv_text(path) as stream:
            yield from _table_rows(path, stream, ",", res)
    else:
        yield from _cc3m_rows(path, res)


@dataclass
class ManifestStream:
    """A manifest whose rows are read again on each :meth:`rows` call, never held whole (``alpro shard`` reads
    it twice: once to count rows and find repeated ids, once for the rows a node owns).

    CSV, TSV and JSONL of sample rows are streamed line by line. What needs the whole file is read whole on each
    pass: a JSON document, a folder, ``--qa`` attachments, and JSONL with annotation or QA rows (they merge by
    clip); a streamed JSONL meeting its first such line switches to the whole read from that row on. The rows
    are those of :func:`read_manifest`, in the same order."""

    path: Path
    format: str
    sha256: str
    root: Path | None
    warnings: list[str]
    _rows: Callable[[], Iterator[ManifestRow]]

    def rows(self) -> Iterator[ManifestRow]:
        return self._rows()

    @classmethod
    def of(cls, manifest: Manifest) -> ManifestStream:
        """A manifest already in memory, as a stream."""
        return cls(manifest.path, manifest.format, manifest.sha256, manifest.root, list(manifest.warnings),
                   lambda: iter(manifest.rows))


def stream_manifest(
    path: str | Path,
    fmt: str | None = None,
    *,
    media_root: str | Path | None = None,
    video_ext: str = ".mp4",
    qa: Iterable[str | Path] = (),
) -> ManifestStream:
    """Like :func:`read_manifest` (same arguments, rows and hash), without holding the rows: see
    :class:`ManifestStream`. Parse errors surface on the first pass over :meth:`ManifestStream.rows`."""
    qa = list(qa)
    path, fmt, root = _checked(path, fmt, media_root)
    if fmt in ("json", "folder") or qa:
        whole = read_manifest(path, fmt, media_root=media_root, video_ext=video_ext, qa=qa)
        return ManifestStream.of(whole)
    digest = hashlib.sha256()
    _hash_file(path, digest)
    res = _Resolver(root, video_ext)
    if fmt == "jsonl":
        def rows() -> Iterator[ManifestRow]:
            n = 0
            try:
                for row in _jsonl_stream(path, res):
                    n += 1
                    yield row
            except _Grouped:
                yield from _jsonl_rows(path, res)[n:]  # the rows before the first grouped line are the same
    else:
        def rows() -> Iterator[ManifestRow]:
            return _line_rows(path, fmt, res)
    return ManifestStream(path, fmt, digest.hexdigest(), root, [], rows)


def read_manifest(
    path: str | Path,
    fmt: str | None = None,
    *,
    media_root: str | Path | None = None,
    video_ext: str = ".mp4",
    qa: Iterable[str | Path] = (),
) -> Manifest:
    """Read any supported manifest into rows, in manifest order.

    Args:
        path: a manifest file, or a folder of media with ``.txt`` caption sidecars.
        fmt: one of :data:`FORMATS`; by default from the extension (``.csv .tsv .jsonl .json``, or a folder).
        media_root: directory that relative paths and clip names resolve against (default: the manifest's).
        video_ext: extension added to clip names that have none (``video123`` -> ``video123.mp4``).
        qa: QA JSONL files (``{"question", "answer", "video_id", "answer_type"}``) attached to clips as
            ``extra["qa"]``, matched by id.
    """
    path, fmt, root = _checked(path, fmt, media_root)
    digest = hashlib.sha256()
    if fmt == "folder":
        rows = _folder_rows(root)
        for row in rows:
            # relative paths: the same folder hashes the same wherever it sits
            digest.update(f"{row.id}\0{relative_source(row.source, root)}\0{row.captions}\0".encode(
                "utf-8", "surrogateescape"))
    else:
        res = _Resolver(root, video_ext)
        if fmt == "json":
            data = path.read_bytes()
            digest.update(data)
            rows = _json_rows(path, _decode(data), res)
        else:
            _hash_file(path, digest)
            rows = _jsonl_rows(path, res) if fmt == "jsonl" else list(_line_rows(path, fmt, res))
    manifest = Manifest(path=path, format=fmt, rows=rows, sha256="", root=root)
    for qa_path in qa:
        qa_path = Path(qa_path)
        if not qa_path.is_file():
            raise AlproError(f"QA file not found: {qa_path}")
        qa_bytes = qa_path.read_bytes()
        digest.update(qa_bytes)
        _attach_qa(manifest, qa_path, _decode(qa_bytes))
    manifest.sha256 = digest.hexdigest()
    return manifest


def _attach_qa(manifest: Manifest, path: Path, text: str) -> None:
    """Append QA rows to ``extra["qa"]`` of the clip whose id (or source stem) equals their ``video_id``."""
    by_id: dict[str, ManifestRow] = {}
    for row in manifest.rows:
        by_id.setdefault(row.id, row)
        by_id.setdefault(Path(row.source).stem, row)
    unmatched = 0
    for line, obj in _json_lines(path, text.split("\n")):
        if not isinstance(obj, dict) or "question" not in obj or "video_id" not in obj:
            raise AlproError(f"{path}:{line}: a QA row needs 'question' and 'video_id'")
        row = by_id.get(str(obj["video_id"]))
        if row is None:
            unmatched += 1
            continue
        row.extra.setdefault("qa", []).append({k: v for k, v in obj.items() if k != "video_id"})
    if unmatched:
        manifest.warnings.append(f"{path}: {unmatched} QA row(s) name a video_id that is not in the manifest")


def select_rows(
    rows: list[ManifestRow], *, split: str | None = None, media: str = "all", limit: int | None = None
) -> list[ManifestRow]:
    """Keep rows of one split and/or media kind, then the first ``limit``."""
    out = [r for r in rows if (split is None or r.split == split) and (media == "all" or r.media == media)]
    return out if limit is None else out[:limit]
