import argparse
import errno
import subprocess
import sys

import pytest

from alpro.cli import guarded, main
from alpro.errors import AlproError


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "shard" in out and "synth" in out


def test_unknown_command_is_one_line_error(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_python_dash_m_alpro():
    r = subprocess.run([sys.executable, "-m", "alpro", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("alpro ")


# Every `python -m` entry point of the package (the `alpro` commands and the helper scripts). Those under
# alpro.train and the sharder fail on their bad argument in about a second, but tests/conftest.py's rule counts any
# `-m alpro.train...` / `-m alpro.sharding.shard` command line as a trainer or sharder spawn, so they run as slow.
FAST_ENTRY_POINTS = ["alpro", "alpro.corpus.entities", "alpro.corpus.synth", "alpro.sharding.inspect",
                     "alpro.kernels.compile_check"]
SPAWN_RULE_ENTRY_POINTS = ["alpro.train", "alpro.train.evaluate", "alpro.train.export", "alpro.train.plots",
                           "alpro.apps.demo", "alpro.apps.demo_report", "alpro.sharding.shard"]


def _bad_argument_is_one_line(module: str) -> None:
    """A usage mistake is one `alpro <cmd>: error: ...` line and exit 2: no usage block, no traceback."""
    args = ["export", "--no-such-option", "1"] if module == "alpro" else ["--no-such-option", "1"]
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (module, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("alpro ") and ": error: " in lines[0], (module, r.stderr)
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("module", FAST_ENTRY_POINTS)
def test_python_dash_m_bad_argument_is_one_line(module):
    _bad_argument_is_one_line(module)


@pytest.mark.slow
@pytest.mark.parametrize("module", SPAWN_RULE_ENTRY_POINTS)
def test_python_dash_m_bad_argument_is_one_line_train_and_shard(module):
    _bad_argument_is_one_line(module)


def _fails_with(exc: BaseException):
    def main(argv):
        raise exc
    return main


def test_one_wrapper_maps_errors_to_lines_and_exit_codes(capsys):
    assert guarded("x", _fails_with(AlproError("bad.yaml: unknown key 'a'"))) == 2
    assert capsys.readouterr().err == "alpro x: error: bad.yaml: unknown key 'a'\n"
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/shard-000003.tar")
    assert guarded("shard", _fails_with(full), []) == 2
    assert capsys.readouterr().err == "alpro shard: error: no space left on device: /data/out/shard-000003.tar\n"
    assert guarded("train", _fails_with(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == ""  # quietly
    with pytest.raises(PermissionError):  # not a user-input error: a bug or a setup problem keeps its traceback
        guarded("x", _fails_with(PermissionError(errno.EACCES, "denied", "/root")), [])


def test_real_full_disk_is_one_line(capsys):
    """ENOSPC from the kernel, not a constructed exception: Linux's /dev/full refuses every write."""
    def write(argv):
        with open("/dev/full", "w") as f:
            f.write("x" * 10)
            f.flush()

    assert guarded("export", write, []) == 2
    assert capsys.readouterr().err == "alpro export: error: no space left on device: ?\n"


def test_usage_errors_are_one_line_only_while_a_command_runs(capsys):
    def parse(argv):
        argparse.ArgumentParser(prog="alpro x").parse_args(argv)

    assert guarded("x", parse, ["--nope"]) == 2
    assert capsys.readouterr().err == "alpro x: error: unrecognized arguments: --nope\n"
    with pytest.raises(SystemExit):  # restored afterwards: a library's own parser behaves as argparse does
        argparse.ArgumentParser(prog="other").parse_args(["--nope"])


# The options dataclass of every `alpro` command and helper script (parsed by alpro.config; help from docstrings).
OPTIONS = {
    "synth": "alpro.corpus.synth:SynthOptions", "shard": "alpro.sharding.shard:ShardCommand",
    "inspect": "alpro.sharding.inspect:InspectOptions", "entities": "alpro.corpus.entities:EntitiesOptions",
    "train": "alpro.train:TrainCommand", "eval": "alpro.train.evaluate:EvalOptions",
    "export": "alpro.train.export:ExportOptions", "plot": "alpro.train.plots:PlotOptions",
    "index": "alpro.apps.search:IndexOptions", "search": "alpro.apps.search:SearchOptions",
    "classify": "alpro.apps.search:ClassifyOptions", "demo": "alpro.apps.demo:DemoOptions",
}
SCRIPTS = {"alpro.apps.demo_report": "ReportOptions", "alpro.kernels.compile_check": "CheckOptions"}


def test_every_command_has_an_options_dataclass_and_help_for_every_option(capsys):
    import importlib

    from alpro.cli import COMMANDS
    from alpro.config import command_parser

    assert set(OPTIONS) == set(COMMANDS)
    classes = {name: getattr(importlib.import_module(path.split(":")[0]), path.split(":")[1])
               for name, path in OPTIONS.items()}
    classes.update({mod: getattr(importlib.import_module(mod), cls) for mod, cls in SCRIPTS.items()})
    for name, cls in classes.items():
        parser = command_parser(cls, prog=name)
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, (name, undocumented)
        if name in COMMANDS:  # the command itself prints that help
            with pytest.raises(SystemExit) as e:
                main([name, "--help"])
            assert e.value.code == 0
            out = capsys.readouterr().out
            flags = [s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
            assert out.startswith(f"usage: alpro {name}") and all(f in out for f in flags), name


@pytest.mark.parametrize("argv, message", [
    (["synth", "out", "--num-clips", "ten"], "'num_clips' must be int, got 'ten'"),
    (["inspect"], "the following arguments are required: shards"),
    (["entities", "--out", "u.txt", "--tagger", "nltk"], "'tagger' must be one of 'auto' | 'spacy' | 'heuristic'"),
    (["demo", "--scale", "fast"], "'scale' must be float, got 'fast'"),
    (["eval", "run", "--split", "dev"], "'split' must be one of 'train' | 'val' | 'test', got 'dev'"),
    (["search", "a query"], "the following arguments are required: --index"),
    (["classify", "--index", "i", "--top", "1.5"], "'top' must be int, got 1.5"),
    (["plot"], "the following arguments are required: runs"),
])
def test_bad_values_are_one_line_errors(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alpro {argv[0]}: error: ") and message in err and err.count("\n") == 1, err
