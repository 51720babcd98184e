"""File I/O every part of ALPRO shares: atomic writes and strict JSON reads, one copy each.

Atomic: a file appears under its final name only complete (unique temporary in the same directory, fsync,
``os.replace``), so a reader, a resume or a kill never sees half a file; the temporary is removed when the
write fails, and an ``OSError`` names the final path (a failed ``write``/``fsync`` carries no file name).

URLs (``s3://bucket/prefix``, any fsspec protocol): :func:`is_url`, :func:`url_fs`, :func:`upload`,
:func:`url_write`. An object store has no rename, but one PUT is atomic (a multipart upload appears whole when
it completes), so the rule there is: write under the final name only what is complete, in one request. The
endpoint of an S3-compatible server comes from botocore's own settings (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or a profile).

Named ``fileio`` rather than ``io``: ``alpro/io.py`` would shadow the standard library's ``io`` for any script
run from inside ``alpro/`` (``python alpro/cli.py`` puts ``alpro/`` first on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alpro.errors import AlproError

__all__ = ["atomic_path", "atomic_write", "named_oserror", "read_json", "loads_json", "is_url", "url_fs", "upload",
           "url_write", "url_join"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MODE = 0o644  # mkstemp creates 0600; checkpoints and shard sets are usually shared


def named_oserror(e: OSError, path: Path) -> OSError:
    """``e`` naming ``path`` (a failed ``write`` or ``fsync`` carries no file name of its own)."""
    return OSError(e.errno, e.strerror or str(e), str(path))


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int = _MODE) -> Iterator[Path]:
    """A unique temporary path next to ``path`` (``.NAME.XXXX.tmp``) for a writer that wants a file name (a
    muxer, an image encoder); on success it is fsynced, given ``mode`` and renamed to ``path``, on any failure
    removed. Unique, so nodes writing the same file at once never write into each other's temporary."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise named_oserror(e, path) from e
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise named_oserror(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, mode: int = _MODE) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise named_oserror(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise named_oserror(e, path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_json(text: str | bytes, where: str) -> Any:
    """Strict JSON of ``text``: ``NaN`` / ``Infinity`` refused (Python's ``json`` accepts them; no file of ours
    means them); a bad document raises a one-line :class:`AlproError` naming ``where``."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise AlproError(f"{where}: not valid JSON ({detail})") from None


def read_json(path: str | os.PathLike) -> Any:
    """Strict JSON of the file at ``path`` (see :func:`loads_json`); an unreadable file is an AlproError too."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise AlproError(f"{path}: cannot read ({e.strerror or e})") from None
    return loads_json(raw, str(path))


def is_url(path: str | os.PathLike) -> bool:
    """True for ``PROTOCOL://...`` strings (``s3://``, ``gs://``, ``file://``); a local path is never one."""
    return isinstance(path, str) and _URL.match(path) is not None


def url_join(url: str, *names: str) -> str:
    """``url_join("s3://b/p/", "x.tar") == "s3://b/p/x.tar"``."""
    return "/".join([url.rstrip("/"), *names])


def url_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of ``url``; a missing fsspec back-end is one clear line."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise AlproError(f"{url}: no fsspec back-end for this URL ({e}); for s3:// install s3fs") from None


def _url_error(e: Exception, url: str) -> OSError:
    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, e.strerror or str(e), url)
    return OSError(None, " ".join(str(e).split())[:300] or type(e).__name__, url)


def upload(local: str | os.PathLike, url: str) -> str:
    """Copy the complete local file ``local`` to ``url`` in one upload (atomic on an object store: the object
    appears whole or not at all); an error is an ``OSError`` naming ``url``."""
    fs, path = url_fs(url)
    try:
        fs.put_file(os.fspath(local), path)
    except Exception as e:  # noqa: BLE001 -- botocore / aiohttp errors are not OSErrors
        raise _url_error(e, url) from e
    return url


def url_write(url: str, data: bytes | str) -> str:
    """Write ``data`` (text is UTF-8) to ``url`` in one request (atomic on an object store)."""
    fs, path = url_fs(url)
    try:
        fs.pipe_file(path, data.encode("utf-8") if isinstance(data, str) else data)
    except Exception as e:  # noqa: BLE001
        raise _url_error(e, url) from e
    return url
