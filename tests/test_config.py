import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from alpro.config import ConfigError, apply_overrides, from_dict, option, parse_overrides, to_dict


@dataclass
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    kind: Literal["linear", "cosine"] = "linear"


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    path: Path | None = None
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_round_trip_and_coercion():
    cfg = from_dict(Outer, {"steps": 3, "path": "a/b", "inner": {"lr": 1, "betas": [0.8, 0.9]}})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.path == Path("a/b") and cfg.inner.betas == (0.8, 0.9)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stepz": 1}, "unknown key 'stepz' (did you mean 'steps'?)"),
        ({"steps": "ten"}, "'steps' must be int, got 'ten'"),
        ({"steps": True}, "'steps' must be int"),
        ({"inner": {"kind": "step"}}, "'inner.kind' must be one of 'linear' | 'cosine'"),
        ({"inner": {"nope": 1}}, "unknown key 'inner.nope'"),
        ({"inner": {"betas": [1.0]}}, "'inner.betas' must have 2 items"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert message in str(e.value)


def test_overrides():
    assert parse_overrides(["--inner.lr", "1e-3", "--steps=5", "--tags", "[a, b]"]) == {
        "inner": {"lr": 1e-3},
        "steps": 5,
        "tags": ["a", "b"],
    }
    merged = apply_overrides({"inner": {"kind": "cosine"}}, ["--inner.lr", "2e-5"])
    assert merged == {"inner": {"kind": "cosine", "lr": 2e-5}}
    with pytest.raises(ConfigError):
        parse_overrides(["--steps"])
    with pytest.raises(ConfigError):
        parse_overrides(["steps", "3"])


def test_command_options_from_a_dataclass_with_docstring_help(capsys):
    """Commands parse their options with alpro.config.parse_command: positionals, flags, switches, types, help."""
    from alpro.config import command_parser, field_docs, parse_command

    @dataclass
    class Opts:
        src: Path
        """where from"""
        out: Path | None = None
        """where to"""
        count: int = 3
        """how many"""
        mode: Literal["a", "b"] = "a"
        dry_run: bool = False
        """only print"""
        progress: bool = True
        tags: list[str] = field(default_factory=list)

    assert field_docs(Opts) == {"src": "where from", "out": "where to", "count": "how many", "dry_run": "only print"}
    o = parse_command(Opts, ["in", "--count", "5", "--mode", "b", "--dry-run", "--no-progress", "--tags", "x",
                          "--tags", "y"],
                      prog="t")
    assert o == Opts(Path("in"), None, 5, "b", True, False, ["x", "y"])
    assert parse_command(Opts, ["in"], prog="t") == Opts(Path("in"))
    with pytest.raises(ConfigError, match="'count' must be int, got 'ten'"):
        parse_command(Opts, ["in", "--count", "ten"], prog="t")
    with pytest.raises(ConfigError, match=re.escape("'mode' must be one of 'a' | 'b', got 'c'")):
        parse_command(Opts, ["in", "--mode", "c"], prog="t")
    help_text = command_parser(Opts, prog="t").format_help()
    assert "where from" in help_text and "how many (default: 3)" in help_text and "--no-progress" in help_text


@dataclass
class Encoder:
    codec: Literal["h264", "vp9"] = "h264"
    """the codec"""
    gop: int = 8
    """keyframe interval"""


@dataclass
class Command:
    out: Path = option(positional=False)
    """where to (a required flag)"""
    src: str | None = option(None, positional=True)
    """where from (may be left out)"""
    size: int = 1
    """how big"""
    # encoding
    video: Encoder = option(default_factory=lambda: Encoder(gop=6), flat=True)
    # checks
    strict: bool = False
    """refuse more"""
    rank: int | None = option(None, aliases=("--the_rank",), hidden=True)
    """for a launcher"""


def test_flat_options_required_flags_optional_positionals_and_groups(capsys):
    """option(): a nested options class whose fields are the command's own flags (over the field's default
    instance, also in from_dict), a required flag, a positional that may be left out, a hidden launcher flag,
    help groups from the section comments."""
    from alpro.cli import guarded
    from alpro.config import command_parser, field_groups, parse_command

    assert parse_command(Command, ["--out", "o"], prog="t") == Command(Path("o"), None, 1, Encoder("h264", 6))
    c = parse_command(Command, ["s", "--out", "o", "--gop", "4", "--codec", "vp9", "--the_rank=3"], prog="t")
    assert c == Command(Path("o"), "s", 1, Encoder("vp9", 4), False, 3)
    # from_dict takes the flat keys at the top level, over the default instance (gop 6, not Encoder's 8) and over
    # a nested mapping; to_dict -> from_dict round-trips
    assert from_dict(Command, {"out": "o", "codec": "vp9"}).video == Encoder("vp9", 6)
    assert from_dict(Command, {"out": "o", "video": {"codec": "vp9"}, "gop": 2}).video == Encoder("vp9", 2)
    assert from_dict(Command, to_dict(c)) == c
    # errors name the flag's own key, and suggest among the flat keys
    with pytest.raises(ConfigError, match="'gop' must be int, got 'x'"):
        parse_command(Command, ["--out", "o", "--gop", "x"], prog="t")
    with pytest.raises(ConfigError, match="did you mean 'gop'"):
        from_dict(Command, {"out": "o", "gopp": 2})
    # a usage mistake under the one wrapper: one line, exit 2
    assert guarded("t", lambda argv: parse_command(Command, argv, prog="t"), ["s"]) == 2
    assert capsys.readouterr().err == "alpro t: error: the following arguments are required: --out\n"
    assert field_groups(Command) == {"video": "encoding", "strict": "checks", "rank": "checks"}
    help_text = command_parser(Command, prog="t").format_help()
    assert "encoding:\n  --codec {h264,vp9}  the codec (default: h264)" in help_text
    assert "keyframe interval (default: 6)" in help_text and "checks:\n  --strict" in help_text
    assert "--out OUT" in help_text and "[src]" in help_text and "rank" not in help_text


def test_list_positionals_and_repeated_list_flags():
    from alpro.config import parse_command, parse_command_overrides

    @dataclass
    class Plot:
        runs: list[Path]
        """run directories"""
        arch: list[int] = field(default_factory=list)
        """architectures"""

    assert parse_command(Plot, ["a", "b", "--arch", "80", "--arch", "90"], prog="t") == \
        Plot([Path("a"), Path("b")], [80, 90])
    with pytest.raises(ConfigError, match=re.escape("'arch[0]' must be int, got 'x'")):
        parse_command(Plot, ["a", "--arch", "x"], prog="t")
    opts, rest = parse_command_overrides(Plot, ["a", "--data.x", "1", "--arch", "80"], prog="t")
    assert opts == Plot([Path("a")], [80]) and rest == ["--data.x", "1"]
