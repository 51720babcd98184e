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
           "field_docs", "field_groups", "option", "command_parser", "parse_command", "parse_command_overrides"]


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
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = _gather_flat(cls, dict(data or {}), where)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            known = sorted(_flat_names(cls)) if len(_flat_names(cls)) > len(fields) else list(fields)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"unknown key '{path}'{hint}")
        if _cli(fields[key]).get("flat"):  # its keys are the command's own: errors name 'gop', not 'video.gop'
            kwargs[key] = value if isinstance(value, hints[key]) else from_dict(hints[key], value, where)
        else:
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


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           positional: bool | None = None, flat: bool = False, metavar: str | None = None,
           aliases: tuple[str, ...] = (), hidden: bool = False) -> Any:
    """A dataclass field with command-line details for :func:`command_parser` (use it like ``field``).

    - ``positional``: given by position; with a default it may be left out. By default a field without a default
      is positional and every other field a ``--flag``; ``positional=False`` without a default is a required flag.
    - ``flat``: a nested options dataclass whose fields are options of the command itself (``--gop``, not
      ``--video.gop``); :func:`from_dict` also takes those fields at the top level (``{"gop": 4}``), over the
      field's default instance.
    - ``metavar``: the placeholder shown in ``--help`` (default: the field name in capitals).
    - ``aliases``: other spellings of the flag (``("--local_rank",)``, which launchers pass).
    - ``hidden``: left out of ``--help`` (a flag for launchers, not for people).
    """
    cli = {"positional": positional, "flat": flat, "metavar": metavar, "aliases": tuple(aliases), "hidden": hidden}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"cli": cli})


def _cli(f: dataclasses.Field) -> dict[str, Any]:
    return f.metadata.get("cli", {})


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _flat_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """The ``flat`` fields of dataclass ``cls`` with their (nested dataclass) types."""
    hints = get_type_hints(cls)
    out = [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init and _cli(f).get("flat")]
    for f, tp in out:
        if not dataclasses.is_dataclass(tp):
            raise TypeError(f"{cls.__name__}.{f.name}: only a dataclass field can be flat")
    return out


def _flat_names(cls: type) -> set[str]:
    """Every key :func:`from_dict` takes at the top level of ``cls``: its fields and those of its flat fields."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for _, tp in _flat_fields(cls):
        names |= _flat_names(tp)
    return names


def _gather_flat(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Move the top-level keys of ``data`` that belong to a flat field of ``cls`` into that field's mapping,
    on top of the field's default instance (so ``{"gop": 4}`` keeps the other defaults the field chose)."""
    own = {f.name for f in dataclasses.fields(cls) if f.init}
    for f, tp in _flat_fields(cls):
        names = _flat_names(tp)
        picked = {k: data.pop(k) for k in list(data) if k not in own and k in names}
        if not picked and f.name not in data:
            continue
        given = data.get(f.name)  # None (``video: null`` in YAML) is the default instance too
        default = _default(f)
        base = to_dict(default) if default is not dataclasses.MISSING else {}
        if dataclasses.is_dataclass(given) and not isinstance(given, type):
            given = to_dict(given)
        elif given is not None and not isinstance(given, dict):
            raise ConfigError(f"'{where + '.' if where else ''}{f.name}' must be a mapping of {tp.__name__} fields, "
                              f"got {given!r}")
        data[f.name] = {**base, **(given or {}), **picked}
    return data


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` (and its dataclass bases): the string literal written right
    under a field. Read from the source with ``ast``, not from ``field(metadata=...)``: every config here already
    documents its fields that way, so ``--help`` and a reader of the source see the same one text."""
    return {name: doc for name, (doc, _) in _field_source(cls).items() if doc is not None}


def field_groups(cls: type) -> dict[str, str]:
    """The section of each field of dataclass ``cls``: the comment line standing alone right above a field
    (``# inputs``) opens a section that the following fields belong to. ``--help`` shows one group per section."""
    return {name: group for name, (_, group) in _field_source(cls).items() if group is not None}


def _field_source(cls: type) -> dict[str, tuple[str | None, str | None]]:
    """name -> (docstring, section comment) of the fields of ``cls``, read from the source."""
    import ast
    import inspect
    import textwrap

    out: dict[str, tuple[str | None, str | None]] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (a frozen or generated class): no help text
            continue
        tree = ast.parse(source)
        lines = source.splitlines()
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        group = None
        for i, node in enumerate(body):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            start = node.lineno - 1  # 0-based line of the field; a block of comment lines right above opens a
            while start > 0 and lines[start - 1].strip().startswith("#"):  # section titled by its first line
                start -= 1
            if start < node.lineno - 1:
                group = lines[start].strip().lstrip("#").strip()
            after = body[i + 1] if i + 1 < len(body) else None
            doc = None
            if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                doc = " ".join(after.value.value.split())
            out[node.target.id] = (doc, group)
    return out


@dataclasses.dataclass
class _Arg:
    """One command-line argument: a field of the options class or of one of its flat fields."""

    name: str
    tp: Any
    field: dataclasses.Field
    default: Any
    doc: str
    group: str | None


def _arguments(cls: type, default: Any = dataclasses.MISSING, group: str | None = None) -> list[_Arg]:
    """The arguments of ``cls``, flat fields expanded in place (their defaults read from ``default``, the
    parent's default instance of them)."""
    hints = get_type_hints(cls)
    docs, groups = field_docs(cls), field_groups(cls)
    out: list[_Arg] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(default, f.name) if default is not dataclasses.MISSING else _default(f)
        section = groups.get(f.name, group)
        if _cli(f).get("flat"):
            out += _arguments(hints[f.name], value, section)
        else:
            out.append(_Arg(f.name, hints[f.name], f, value, docs.get(f.name, ""), section))
    return out


def _is_list(tp: Any) -> bool:
    return get_origin(tp) in (list, tuple) or any(
        get_origin(a) in (list, tuple) for a in get_args(tp) if a is not type(None))


def _choices(tp: Any) -> tuple | None:
    """The values of a ``Literal`` type (also inside ``Optional`` or a list), for the help's placeholder."""
    for t in (tp, *get_args(tp)):
        if get_origin(t) is Literal:
            return get_args(t)
        if get_origin(t) in (list, tuple) and get_args(t) and get_origin(get_args(t)[0]) is Literal:
            return get_args(get_args(t)[0])
    return None


def command_parser(cls: type, prog: str, description: str | None = None, epilog: str | None = None):
    """An ``argparse`` parser for the options dataclass ``cls``.

    A field without a default is a positional argument and every other field a ``--dashed-name`` flag (see
    :func:`option` for positionals with a default, required flags and flat nested options): a bool defaulting to
    false is a switch, one defaulting to true is ``--no-name``; a list is one value per flag, repeatable
    (``--qa a.jsonl --qa b.jsonl``), and a list positional takes one or more values. The help is the field's docstring, and the fields under a ``# section``
    comment form a group. Values are checked by :func:`from_dict` (see :func:`parse_command`), so a bad value
    is the same one-line ``ConfigError`` as in a YAML file."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    groups: dict[str | None, Any] = {None: p}
    for a in _arguments(cls):
        target = groups.get(a.group) or groups.setdefault(a.group, p.add_argument_group(a.group))
        cli = _cli(a.field)
        help_text = argparse.SUPPRESS if cli.get("hidden") else a.doc.replace("%", "%%")
        choices = _choices(a.tp)
        metavar = cli.get("metavar") or ("{" + ",".join(str(c) for c in choices) + "}" if choices else None)
        required = a.default is dataclasses.MISSING
        if cli.get("positional") or (required and cli.get("positional") is None):
            nargs = ("+" if required else "*") if _is_list(a.tp) else (None if required else "?")
            target.add_argument(a.name, nargs=nargs, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
            continue
        flags = ["--" + a.name.replace("_", "-"), *cli.get("aliases", ())]
        if a.tp is bool:
            if a.default is True:
                target.add_argument("--no-" + a.name.replace("_", "-"), *cli.get("aliases", ()), dest=a.name,
                                    action="store_false", default=argparse.SUPPRESS, help=help_text)
            else:
                target.add_argument(*flags, dest=a.name, action="store_true", default=argparse.SUPPRESS,
                                    help=help_text)
            continue
        # the default is shown unless there is none, or the docstring says it in words
        quiet = required or a.default is None or a.default in ([], ()) or "default" in a.doc.lower()
        shown = "" if quiet else f" (default: {a.default})"
        target.add_argument(*flags, dest=a.name, action="append" if _is_list(a.tp) else "store", required=required,
                            default=argparse.SUPPRESS, metavar=metavar or a.name.upper(),
                            help=help_text if cli.get("hidden") else f"{help_text}{shown}".strip())
    return p


def parse_command(cls: type[T], argv: list[str] | None, prog: str, description: str | None = None,
                  epilog: str | None = None) -> T:
    """``argv`` (``None``: ``sys.argv[1:]``) -> an instance of ``cls`` through :func:`command_parser` and
    :func:`from_dict` (string values are read as YAML scalars, as ``--section.key value`` overrides are, then
    checked against the field types)."""
    parser = command_parser(cls, prog, description, epilog)
    return _from_args(cls, vars(parser.parse_args(_argv(argv))))


def parse_command_overrides(cls: type[T], argv: list[str] | None, prog: str, description: str | None = None,
                            epilog: str | None = None) -> tuple[T, list[str]]:
    """:func:`parse_command` for a command that also takes ``--section.key VALUE`` config overrides: returns the
    options and the arguments that are not options of ``cls`` (for :func:`apply_overrides`)."""
    parser = command_parser(cls, prog, description, epilog)
    known, rest = parser.parse_known_args(_argv(argv))
    return _from_args(cls, vars(known)), rest


def _argv(argv: list[str] | None) -> list[str]:
    import sys

    return list(sys.argv[1:] if argv is None else argv)


def _from_args(cls: type[T], args: dict[str, Any]) -> T:
    types_ = {a.name: a.tp for a in _arguments(cls)}
    data: dict[str, Any] = {}
    for name, value in args.items():
        tp = types_[name]
        plain = tp in (str, Path) or (get_origin(tp) in (Union, types.UnionType)
                                      and all(a in (str, Path, type(None)) for a in get_args(tp)))
        if _is_list(tp):
            item = next((get_args(a)[0] for a in (tp, *get_args(tp)) if get_origin(a) in (list, tuple)), Any)
            plain = item in (str, Path)
            value = [v if plain or not isinstance(v, str) else _scalar(v) for v in value]
        elif isinstance(value, str) and not plain:
            value = _scalar(value)
        data[name] = value
    return from_dict(cls, data)


def _scalar(raw: str) -> Any:
    try:
        return parse_overrides(["--x", raw])["x"]
    except ConfigError:
        return raw
