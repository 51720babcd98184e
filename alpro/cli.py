"""The `alpro` command: one console script, one subcommand per job.

Each subcommand lives in its own module exposing ``main(argv: list[str] | None) -> int`` (or the function
named after ``:``) so that ``alpro shard ...`` and ``python -m alpro.sharding.shard ...`` are the same program. Modules are imported
lazily, so ``alpro --help`` stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import sys
from collections.abc import Callable
from typing import NoReturn

from alpro.errors import AlproError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    # data
    "synth": ("alpro.corpus.synth", "generate the embedded 'shapes world' corpus (mp4 + jpg + manifest)"),
    "shard": ("alpro.sharding.shard", "pack a manifest into transcoded WebDataset tar shards"),
    "inspect": ("alpro.sharding.inspect", "summarise a shard set (counts, durations, sizes, rejects)"),
    "entities": ("alpro.corpus.entities", "build the PEM entity list (unigrams.txt) from corpus captions"),
    # training and evaluation
    "train": ("alpro.train", "train one stage (prompter, pretrain, retrieval, qa) from a YAML config"),
    "eval": ("alpro.train.evaluate", "evaluate retrieval or QA, zero-shot or fine-tuned"),
    "export": ("alpro.train.export", "write one consolidated safetensors file from a (ZeRO) checkpoint"),
    "plot": ("alpro.train.plots", "draw the PNG plots of a run directory"),
    # applications
    "index": ("alpro.apps.search:index_main", "embed a shard collection with a trained checkpoint"),
    "search": ("alpro.apps.search:search_main", "text -> ranked clips over an index (VTC top-k, VTM re-rank)"),
    "classify": ("alpro.apps.search:classify_main", "label clips zero-shot with entity prompts"),
    "demo": ("alpro.apps.demo", "the main job end to end on the embedded corpus (what `make demo` runs)"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: alpro <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `alpro <command> --help` for the options of one command."]
    return "\n".join(lines)


def guarded(name: str, main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """The one error wrapper of every entry point: ``alpro <name>`` and each module's ``python -m`` block.

    - :class:`AlproError` (bad input, config, files) -> ``alpro <name>: error: <message>`` on one line, exit 2;
    - a full disk or quota (``OSError`` ENOSPC / EDQUOT) -> ``alpro <name>: error: no space left on device: <path>``,
      exit 2 (what was written stays; the commands that resume say so in their own messages);
    - Ctrl-C -> exit 130, no traceback;
    - an argparse usage mistake in any parser the command builds -> one line, exit 2 (see
      :func:`_one_line_usage_errors`). Anything else is a bug and keeps its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _one_line_usage_errors():
            return int(main(argv) or 0)
    except AlproError as e:
        message = " ".join(str(e).split()) if "\n" in str(e) else str(e)
        print(f"alpro {name}: error: {message}", file=sys.stderr)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        print(f"alpro {name}: error: {what}: {e.filename if e.filename is not None else '?'}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 2


@contextlib.contextmanager
def _one_line_usage_errors():
    """While a command runs, ``argparse.ArgumentParser.error`` raises :class:`AlproError` instead of printing the
    usage block and exiting. Chosen over a parser subclass in every module (ten parsers in eight modules, several
    of them owned by other rooms) so that no command can forget it; restored on exit, and ``--help`` (which does
    not go through ``error``) is unchanged."""
    original = argparse.ArgumentParser.error

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        raise AlproError(message)

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from alpro import __version__

        print(f"alpro {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"alpro: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2

    def run(args: list[str]) -> int | None:
        module_name, _, func = COMMANDS[name][0].partition(":")
        return getattr(importlib.import_module(module_name), func or "main")(args)

    return guarded(name, run, rest)


if __name__ == "__main__":
    raise SystemExit(main())
