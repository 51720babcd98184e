"""File I/O every part of ALPRO shares: atomic writes and strict JSON reads, one copy each.

Atomic: a file appears under its final name only complete (unique temporary in the same directory, fsync,
``os.replace``), so a reader, a resume or a kill never sees half a file; the temporary is removed when the
write fails, and an ``OSError`` names the final path (a failed ``write``/``fsync`` carries no file name).

Named ``fileio`` rather than ``io``: ``alpro/io.py`` would shadow the standard library's ``io`` for any script
run from inside ``alpro/`` (``python alpro/cli.py`` puts ``alpro/`` first on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alpro.errors import AlproError

__all__ = ["atomic_path", "atomic_write", "named_oserror", "read_json", "loads_json"]

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
