"""Shared pytest setup: CPU only, quiet third-party logs, the corpus fixtures, and the markers applied by rule.

**slow, by rule.** A test is marked ``slow`` when it spawns the trainer (``alpro train``, ``-m alpro.train``),
torchrun or the DeepSpeed launcher (``torch.distributed.run``, ``torchrun``, ``launch/torchrun.sh``,
``launch/deepspeed.sh``, ``mp.spawn``), the demo (``alpro demo``) or the sharder (``alpro shard``,
``-m alpro.sharding.shard``): in its own body, in a module-level helper it calls, in a helper it imports
(``cli_helpers``, ``golden``, ...), or in a fixture it requests, followed transitively. The hook reads the source of each of those and looks for the spawn
signatures in :data:`SPAWNS`, so a new test that spawns one of them is slow without anyone remembering to mark
it. In-process checks (``alpro.cli.main([...])``, ``load_run_config``) are not spawns and stay fast.

Exception, on purpose: the session corpus fixtures (:data:`SESSION_CORPORA`) run the synthesiser and the sharder
once for the whole session and every test shares their output, so they are a fixed set-up cost of the run, not
a cost of the test that happens to request them first; they are not followed.

Backstop: while a test that is not ``slow`` runs, starting a process whose command line has a spawn signature
fails the test with the command and this rule, so a miss of the source scan cannot make ``make test-fast``
silently expensive.

**Other markers.** ``dist`` is added to tests that start several processes (torchrun, ``mp.spawn``), ``dali``
to tests in files about DALI (``*dali*``), ``triton`` to tests in files that import Triton or run its
interpreter; ``gpu`` marks tests that need CUDA and skips them, with the reason, on a machine without it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_Q = r"""["']"""
#: (kind, pattern) of the source text or command line that starts an expensive process.
SPAWNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("trainer", re.compile(rf"run_cli\(\s*{_Q}(train|demo){_Q}")),
    ("trainer", re.compile(rf"{_Q}alpro{_Q}\s*,\s*{_Q}(train|demo){_Q}")),
    ("trainer", re.compile(rf"{_Q}alpro\.train{_Q}")),
    ("torchrun", re.compile(r"torch\.distributed\.run|torchrun|launch/deepspeed\.sh|\bmp\.spawn\(")),
    ("sharder", re.compile(rf"run_cli\(\s*{_Q}shard{_Q}")),
    ("sharder", re.compile(rf"{_Q}alpro{_Q}\s*,\s*{_Q}shard{_Q}")),
    ("sharder", re.compile(rf"{_Q}alpro\.sharding\.shard{_Q}")),
)
#: Command lines (joined argv) that the run-time backstop refuses in a test that is not slow.
_ARGV_SPAWNS = re.compile(r"-m alpro (train|demo|shard)\b|-m alpro\.train\b|-m alpro\.sharding\.shard\b|"
                          r"torch\.distributed\.run|torchrun|deepspeed\.sh")
#: Built once per session and shared (see the module docstring); the scan does not follow them.
SESSION_CORPORA = frozenset({"tiny_corpus", "tiny_shards", "loader_shards"})
TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------ corpus fixtures


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A 48-clip / 24-image shapes-world corpus (``alpro synth``); shared by every test that needs real media."""
    from cli_helpers import make_tiny_corpus

    return make_tiny_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


@pytest.fixture(scope="session")
def tiny_shards(tiny_corpus, tmp_path_factory) -> dict[str, Path]:
    """train_video / train_image / test_video shard sets of ``tiny_corpus`` (8 fps, short side 40) + entities."""
    from cli_helpers import make_tiny_shards

    return make_tiny_shards(tiny_corpus, tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def loader_shards(tmp_path_factory) -> dict[str, Path]:
    """{'video', 'image', 'vp9', 'root'}: 8 H.264 and 4 VP9 tiny clips (two questions each) and 5 JPEGs sharded by
    the real sharder, 3 per shard; the data tests' corpus (distinct captions, two codecs)."""
    from data_fixtures import make_corpus

    root = tmp_path_factory.mktemp("loader-corpus")
    video, image = make_corpus(root / "h264", n_video=8, n_image=5, qa=True)
    vp9, _ = make_corpus(root / "vp9", n_video=4, n_image=0, codec="vp9", qa=True)
    return {"video": video, "image": image, "vp9": vp9, "root": root}


# ------------------------------------------------------------------------------------------ markers by rule


def _source(obj) -> str:
    """The source of a function without its decorators (parametrize lists are data, not what the test runs)."""
    try:
        src = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        return ""
    try:
        node = ast.parse(src).body[0]
    except (SyntaxError, IndexError):
        return src
    return "\n".join(src.splitlines()[node.lineno - 1 :]) if getattr(node, "decorator_list", None) else src


def _spawn_of(obj, module_globals: dict, fixturedefs: dict, seen: set[int]) -> str | None:
    """The first spawn signature reached from ``obj``'s source, following the names it uses (functions of the
    test's modules and of the helpers under tests/, and fixtures) transitively; None when there is none."""
    obj = getattr(obj, "__wrapped__", obj)
    if id(obj) in seen:
        return None
    seen.add(id(obj))
    src = _source(obj)
    for kind, pattern in SPAWNS:
        if pattern.search(src):
            return f"{kind} ({getattr(obj, '__qualname__', obj)})"
    try:
        names = {n.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name)}
        names |= {n.arg for n in ast.walk(ast.parse(src)) if isinstance(n, ast.arg)}
    except SyntaxError:
        return None
    glb = dict(getattr(obj, "__globals__", module_globals))
    for node in ast.walk(ast.parse(src)):  # function-level `from helper import name` (helpers under tests/)
        if isinstance(node, ast.ImportFrom) and node.module and (TESTS / f"{node.module}.py").is_file():
            module = importlib.import_module(node.module)
            glb.update({a.asname or a.name: getattr(module, a.name, None) for a in node.names})
            names |= {a.asname or a.name for a in node.names}
    for name in sorted(names):
        targets = []
        if name in fixturedefs and name not in SESSION_CORPORA:
            targets += [d.func for d in fixturedefs[name]]
        value = glb.get(name)
        if inspect.isfunction(value) and _is_test_side(value):
            targets.append(value)
        for target in targets:
            found = _spawn_of(target, module_globals, fixturedefs, seen)
            if found:
                return found
    return None


def _is_test_side(fn) -> bool:
    """Helpers are followed only inside tests/ (library code is what the tests spawn, not how)."""
    try:
        return Path(inspect.getfile(fn)).resolve().is_relative_to(TESTS)
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    module_src: dict[Path, str] = {}
    for item in items:
        path = Path(str(item.fspath))
        if path not in module_src:
            module_src[path] = path.read_text()
        src = module_src[path]
        func = getattr(item, "function", None)
        fixturedefs = dict(getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}) or {})
        if func is not None and not item.get_closest_marker("slow"):
            seen: set[int] = set()
            found = _spawn_of(func, func.__globals__, fixturedefs, seen)
            for name in item.fixturenames:  # fixtures requested by autouse / usefixtures / parametrization
                if found or name in SESSION_CORPORA or name not in fixturedefs:
                    continue
                for d in fixturedefs[name]:
                    found = found or _spawn_of(d.func, func.__globals__, fixturedefs, seen)
            if found:
                item.add_marker(pytest.mark.slow(reason=f"spawns the {found}"))
                if found.startswith("torchrun"):
                    item.add_marker(pytest.mark.dist)
        slow = item.get_closest_marker("slow")
        if slow and "torchrun" in str(slow.kwargs.get("reason", "")) and not item.get_closest_marker("dist"):
            item.add_marker(pytest.mark.dist)
        if "dali" in path.name:
            item.add_marker(pytest.mark.dali)
        if re.search(r"^\s*(import triton|from triton\b)|TRITON_INTERPRET", src, re.M):
            item.add_marker(pytest.mark.triton)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs CUDA: torch.cuda.is_available() is False on this machine")


@pytest.fixture(autouse=True)
def _no_spawn_in_fast_tests(request, monkeypatch):
    """The run-time backstop of the slow rule (see the module docstring)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    original = subprocess.Popen.__init__

    def guarded(self, args, *a, **kw):
        line = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
        if _ARGV_SPAWNS.search(line):
            pytest.fail(f"{request.node.nodeid} spawns `{line[:200]}` but is not marked slow: the rule in "
                        "tests/conftest.py did not see it; call the spawn through a helper in tests/ or mark it "
                        "@pytest.mark.slow", pytrace=False)
        original(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


_RENDEZVOUS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_process_group_left_behind(request):
    """A test that runs a command in-process must leave the pytest process as it found it: no live
    torch.distributed process group (its store and gloo threads outlive the test) and no rendezvous variables
    that every later child process would inherit. The leak is undone either way; the test that leaked fails."""
    before = {k: os.environ.get(k) for k in _RENDEZVOUS_ENV}
    yield
    leaked = []
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        leaked.append("a torch.distributed process group")
    changed = [k for k in _RENDEZVOUS_ENV if os.environ.get(k) != before[k]]
    for k in changed:
        if before[k] is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = before[k]
    if changed:
        leaked.append("environment " + ", ".join(changed))
    if leaked:
        pytest.fail(f"{request.node.nodeid} left {' and '.join(leaked)} behind in the pytest process",
                    pytrace=False)
