"""``alpro.fileio``: atomic writes (complete or absent, temporary removed, errors name the final path) and
strict JSON reads (one-line AlproError, NaN refused)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from alpro.errors import AlproError
from alpro.fileio import atomic_path, atomic_write, loads_json, read_json


def test_atomic_write_bytes_and_text_replace_the_file_with_shared_permissions(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    assert atomic_write(path, b"\x00\x01") == path
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, "caf\u00e9\n")
    assert path.read_bytes() == "caf\u00e9\n".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("previous")

    class Boom(Exception):
        pass

    with pytest.raises(TypeError):
        atomic_write(path, 42)  # type: ignore[arg-type] -- not bytes: nothing written
    with pytest.raises(Boom), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise Boom
    assert path.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_an_os_error_names_the_final_path(tmp_path):
    missing = tmp_path / "no-such-dir" / "file.bin"
    with pytest.raises(OSError) as info:
        atomic_write(missing, b"x")
    assert info.value.filename == str(missing) and info.value.errno == errno.ENOENT
    target = tmp_path / "a-directory"
    target.mkdir()
    (target / "inside").write_text("keep")
    with pytest.raises(OSError) as info:  # os.replace onto a non-empty directory fails after the write
        atomic_write(target, b"x")
    assert info.value.filename == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory"]


def test_atomic_path_gives_a_writer_a_unique_temporary_that_becomes_the_file(tmp_path):
    path = tmp_path / "clip.mp4"
    with atomic_path(path) as a, atomic_path(path) as b:
        assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".clip.mp4.")
        assert not path.exists()
        a.write_bytes(b"first")
        b.write_bytes(b"second")
    assert path.read_bytes() == b"first"  # the outer context closed last: its bytes win, as with two writers
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_read_json_is_strict_and_fails_in_one_line(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2.5, null]}')
    assert read_json(good) == {"a": [1, 2.5, None]}
    for text, detail in (('{"loss": NaN}', "NaN is not JSON"), ('{"x": -Infinity}', "-Infinity is not JSON"),
                         ('{"a": 1,\n oops}', "Expecting property name"), ("", "Expecting value"),
                         (b"\xff\xfe{", "")):
        bad = tmp_path / "bad.json"
        bad.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(AlproError, match=rf"^{bad}: not valid JSON \(.*{detail}") as info:
            read_json(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(AlproError, match=r"missing.json: cannot read \(No such file"):
        read_json(tmp_path / "missing.json")
    with pytest.raises(AlproError, match=r"^rank_0: not valid JSON"):
        loads_json("[1, Infinity]", "rank_0")
