"""The layer rules docs/architecture.md states, checked with ``ast`` over the source so the page cannot drift.

Every ``import`` / ``from ... import`` is collected, at module level and inside functions, relative imports
resolved; ``from a.b import c`` counts as importing both ``a.b`` and ``a.b.c`` (``c`` may be a submodule).
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"alpro": "alpro", "kernels": "alpro.kernels", "sharding": "alpro.sharding"}
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "broadcast", "broadcast_object_list", "barrier", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv",
               "isend", "irecv"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[rel[0]], *rel[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    assert {"alpro.data", "alpro.models", "alpro.train", "alpro.kernels", "alpro.sharding"} <= set(out)
    return out


@cache
def imports(module: str) -> frozenset[str]:
    path, tree = modules()[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(found)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _in_package(package: str) -> list[str]:
    return [m for m in modules() if _under(m, package)]


def _alpro_imports(module: str) -> set[str]:
    return {name for name in imports(module) if _under(name, "alpro")}


def test_import_collector_sees_function_level_and_relative_imports():
    # alpro.train.runtime imports deepspeed inside functions; alpro.kernels.attention imports its siblings
    assert "deepspeed" in imports("alpro.train.runtime")
    assert any(_under(n, "alpro.kernels") for n in imports("alpro.kernels.attention"))


@pytest.mark.parametrize("module, allowed", [
    ("alpro.errors", set()), ("alpro.tasks", set()), ("alpro.shard_format", set()), ("alpro.dist", set()),
    ("alpro.config", {"alpro.errors"}), ("alpro.fileio", {"alpro.errors"}),
])
def test_foundation_modules_import_at_most_errors(module, allowed):
    bad = {n for n in _alpro_imports(module) if not any(_under(n, a) for a in allowed)}
    assert not bad, f"{module} imports {sorted(bad)}"


def test_cli_reaches_jobs_by_name_and_imports_no_layer():
    bad = {n for n in _alpro_imports("alpro.cli") if n not in {"alpro", "alpro.__version__"}
           and not _under(n, "alpro.errors")}
    assert not bad, f"alpro.cli imports {sorted(bad)}"


def test_kernels_import_nothing_from_alpro_but_alpro_kernels():
    for module in _in_package("alpro.kernels"):
        command = module == "alpro.kernels.compile_check"  # a command: the error wrapper and the options parser
        allowed = ("alpro.kernels", "alpro.cli", "alpro.config") if command else ("alpro.kernels",)
        bad = {n for n in _alpro_imports(module) if not any(_under(n, a) for a in allowed)}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_data_never_imports_model_train_kernels_or_sharding():
    allowed = ("alpro.data", "alpro.errors", "alpro.tasks", "alpro.dist", "alpro.shard_format")
    for module in _in_package("alpro.data"):
        bad = {n for n in _alpro_imports(module) if not any(_under(n, a) for a in allowed)}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_model_never_imports_train_and_sees_kernels_only_through_the_dispatch():
    for module in _in_package("alpro.models"):
        names = _alpro_imports(module)
        assert not {n for n in names if _under(n, "alpro.train")}, module
        kernel = {n for n in names if _under(n, "alpro.kernels")}
        # `from alpro.kernels import contrastive_loss` records alpro.kernels and alpro.kernels.contrastive_loss:
        # allowed are the package itself and the four public ops it exports, never a submodule
        ops = {"temporal_attention", "spatial_attention", "contrastive_loss", "local_similarity"}
        assert kernel <= {"alpro.kernels"} | {f"alpro.kernels.{op}" for op in ops}, f"{module} imports {kernel}"


def test_model_network_takes_only_batch_from_the_data_package():
    for module in _in_package("alpro.models"):
        data = {n for n in _alpro_imports(module) if _under(n, "alpro.data")}
        assert all(_under(n, "alpro.data.batch") for n in data), f"{module} imports {sorted(data)}"


def test_sharding_never_imports_model_train_or_kernels():
    for module in _in_package("alpro.sharding"):
        bad = {n for n in _alpro_imports(module)
               if any(_under(n, p) for p in ("alpro.models", "alpro.train", "alpro.kernels"))}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_corpus_tools_never_import_model_train_kernels_or_apps():
    assert _in_package("alpro.corpus")
    for module in _in_package("alpro.corpus"):
        bad = {n for n in _alpro_imports(module)
               if any(_under(n, p) for p in ("alpro.models", "alpro.train", "alpro.kernels", "alpro.apps"))}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_nothing_but_train_and_apps_imports_train():
    for module in modules():
        if _under(module, "alpro.train") or _under(module, "alpro.apps"):
            continue
        bad = {n for n in _alpro_imports(module) if _under(n, "alpro.train")}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_apps_are_the_top_nothing_imports_them():
    assert _in_package("alpro.apps")
    for module in modules():
        if _under(module, "alpro.apps"):
            continue
        bad = {n for n in _alpro_imports(module) if _under(n, "alpro.apps")}
        assert not bad, f"{module} imports {sorted(bad)}"


def _attribute_chain(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_collectives_only_in_alpro_dist():
    for module, (_, tree) in modules().items():
        if module == "alpro.dist":
            continue
        names = imports(module)
        assert not {n for n in names if _under(n, "torch.distributed")}, f"{module} imports torch.distributed"
        assert not {n for n in names if _under(n, "deepspeed.comm")}, f"{module} imports deepspeed.comm"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                chain = _attribute_chain(node)
                assert not chain.startswith(("torch.distributed.", "deepspeed.comm.")), f"{module}: {chain}"


def test_deepspeed_only_in_train_runtime_and_export():
    users = {m for m in modules() if any(_under(n, "deepspeed") for n in imports(m))}
    assert users <= {"alpro.train.runtime", "alpro.train.export"}, sorted(users)


def test_shard_format_names_are_spelled_only_in_shard_format():
    from alpro import shard_format as sf

    facts = {sf.FORMAT_TAG, sf.INDEX_NAME, sf.BUILD_NAME, sf.SIZES_NAME, sf.REJECTS_NAME, sf.STATS_SUFFIX,
             sf.DALI_IDX_SUFFIX}
    spelled = [(module, node.value) for module, (_, tree) in modules().items() if module != "alpro.shard_format"
               for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in facts]
    assert not spelled, f"spelled outside alpro.shard_format (import the name from there): {spelled}"
