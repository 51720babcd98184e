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
