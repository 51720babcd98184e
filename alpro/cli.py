"""The `alpro` command: one console script, one subcommand per job.

Each subcommand lives in its own module exposing ``main(argv: list[str] | None) -> int`` (or the function
named after ``:``) so that ``alpro shard ...`` and ``python -m alpro.sharding.shard ...`` are the same program. Modules are imported
lazily, so ``alpro --help`` stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    # data
    "synth": ("alpro.sharding.synth", "generate the embedded 'shapes world' corpus (mp4 + jpg + manifest)"),
    "shard": ("alpro.sharding.shard", "pack a manifest into transcoded WebDataset tar shards"),
    "inspect": ("alpro.sharding.inspect", "summarise a shard set (counts, durations, sizes, rejects)"),
    "entities": ("alpro.models.entities", "build the PEM entity list (unigrams.txt) from corpus captions"),
    # training and evaluation
    "train": ("alpro.train", "train one stage (prompter, pretrain, retrieval, qa) from a YAML config"),
    "eval": ("alpro.train.evaluate", "evaluate retrieval or QA, zero-shot or fine-tuned"),
    "export": ("alpro.train.export", "write one consolidated safetensors file from a (ZeRO) checkpoint"),
    "plot": ("alpro.train.plots", "draw the PNG plots of a run directory"),
    # applications
    "index": ("alpro.train.search:index_main", "embed a shard collection with a trained checkpoint"),
    "search": ("alpro.train.search:search_main", "text -> ranked clips over an index (VTC top-k, VTM re-rank)"),
    "classify": ("alpro.train.search:classify_main", "label clips zero-shot with entity prompts"),
    "demo": ("alpro.train.demo", "the main job end to end on the embedded corpus (what `make demo` runs)"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: alpro <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "Run `alpro <command> --help` for the options of one command."]
    return "\n".join(lines)


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
    from alpro.errors import AlproError

    try:
        module_name, _, func = COMMANDS[name][0].partition(":")
        module = importlib.import_module(module_name)
        return int(getattr(module, func or "main")(rest) or 0)
    except AlproError as e:
        print(f"alpro {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alpro {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
