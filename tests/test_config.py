import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from alpro.config import ConfigError, apply_overrides, from_dict, parse_overrides, to_dict


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
