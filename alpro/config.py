"""Typed configs: one dataclass per component, loaded from YAML with dotted CLI overrides.

Every component owns a ``@dataclass`` config (``ModelConfig``, ``DataConfig``, ...). This module turns plain
dicts (from YAML files and ``--section.key value`` overrides) into those dataclasses, checking every key and
type so that a typo or a wrong type fails at start with one clear line, e.g.::

    config error: unknown key 'optim.lrr' (did you mean 'lr'?)
    config error: 'train.steps' must be int, got 'ten'

Supported field types: bool, int, float, str, Path, Literal[...], Optional[...], list[...], tuple[...],
dict[str, ...] and nested dataclasses. A float must be finite: no field has a meaning for NaN or infinity (an
"unbounded" value is spelled ``null`` or 0 where a field allows it), and ``.nan`` / ``.inf`` / ``1e999`` in a
YAML file would otherwise surface steps later as a torch error. A YAML mapping that repeats a key is an error
with both line numbers (PyYAML silently keeps the last one).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from alpro.errors import ConfigError

T = TypeVar("T")

__all__ = ["from_dict", "to_dict", "load_yaml", "apply_overrides", "parse_overrides", "merge", "ConfigError",
           "field_docs", "command_parser", "parse_command"]


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` and convert where lossless (int -> float, str -> Path)."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # Optional[X]: X's own message (e.g. "must be a finite number")
            raise errors[0]
        raise ConfigError(f"'{where}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"'{where}' must be one of {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"'{where}' must have {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, where): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{where}' must be int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"'{where}' must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"'{where}' must be float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{where}' must be a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"'{where}' must be a path, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"'{where}' must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and missing fields raise ConfigError."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"unknown key '{path}'{hint}")
        kwargs[key] = _convert(value, hints[key], path)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{where + '.' if where else ''}{name}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # __post_init__ validation
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML-safe structures (Paths become strings, tuples lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key (``data:`` twice would silently replace
    the first section). Merge keys (``<<: *anchor``) may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first != key_node.start_mark.line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first + 1})", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` with :class:`UniqueKeyLoader`."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a parse error or a repeated key is one ConfigError line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = safe_load_unique(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}{loc}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``update`` wins; nested mappings merge key by key."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``['--optim.lr', '1e-4', '--train.steps=10']`` -> ``{'optim': {'lr': 1e-4}, 'train': {'steps': 10}}``.

    Values are parsed as YAML scalars/lists (``1e-4`` -> float, ``true`` -> bool, ``[a, b]`` -> list).
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"expected an override like --section.key VALUE, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            raw = args[i + 1]
            i += 2
        try:
            value = safe_load_unique(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # YAML 1.1 reads '1e-4' as a string; accept numbers written that way.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with another override")
        node[parts[-1]] = value
    return out


def apply_overrides(data: dict[str, Any], args: list[str]) -> dict[str, Any]:
    return merge(data, parse_overrides(args))


# ------------------------------------------------------------------------------------------ command lines


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` (and its dataclass bases): the string literal written right
    under a field. Read from the source with ``ast``, not from ``field(metadata=...)``: every config here already
    documents its fields that way, so ``--help`` and a reader of the source see the same one text."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a frozen or generated class): no help text
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def command_parser(cls: type, prog: str, description: str | None = None):
    """An ``argparse`` parser for the options dataclass ``cls``: a field without a default is a positional
    argument, every other field a ``--dashed-name`` flag (a bool defaulting to false is a switch, one defaulting
    to true is ``--no-name``), with the field's docstring as help. Values are checked by :func:`from_dict`, so a
    bad value is the same one-line ``ConfigError`` as in a YAML file."""
    import argparse

    hints = get_type_hints(cls)
    docs = field_docs(cls)
    p = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(cls):
        tp, help_text = hints[f.name], docs.get(f.name, "")
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            p.add_argument(f.name, help=help_text)
        elif tp is bool:
            if f.default:
                p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=help_text)
            else:
                p.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            is_list = get_origin(tp) in (list, tuple) or any(
                get_origin(a) in (list, tuple) for a in get_args(tp) if a is not type(None))
            p.add_argument(flag, dest=f.name, nargs="+" if is_list else None, default=argparse.SUPPRESS,
                           metavar=f.name.upper(), help=f"{help_text} (default: {default})".strip())
    return p


def parse_command(cls: type[T], argv: list[str], prog: str, description: str | None = None) -> T:
    """``argv`` -> an instance of ``cls`` through :func:`command_parser` and :func:`from_dict` (string values are
    read as YAML scalars, as ``--section.key value`` overrides are, then checked against the field types)."""
    hints = get_type_hints(cls)
    args = vars(command_parser(cls, prog, description).parse_args(argv))
    data: dict[str, Any] = {}
    for name, value in args.items():
        tp = hints[name]
        plain = tp in (str, Path) or (get_origin(tp) in (Union, types.UnionType)
                                      and all(a in (str, Path, type(None)) for a in get_args(tp)))
        if isinstance(value, str) and not plain:
            value = _scalar(value)
        elif isinstance(value, list):
            value = [v if plain else _scalar(v) for v in value]
        data[name] = value
    return from_dict(cls, data)


def _scalar(raw: str) -> Any:
    try:
        return parse_overrides(["--x", raw])["x"]
    except ConfigError:
        return raw
