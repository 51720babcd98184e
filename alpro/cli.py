"""The `alpro` command: one console script, one subcommand per job.

Each subcommand lives in its own module exposing ``main(argv: list[str] | None) -> int`` so that
``alpro shard ...`` and ``python -m alpro.sharding.shard ...`` are the same program. Modules are imported
lazily, so ``alpro --help`` stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("alpro.sharding.synth", "generate the embedded 'shapes world' corpus (mp4 + jpg + manifest)"),
    "shard": ("alpro.sharding.shard", "pack a manifest into transcoded WebDataset tar shards"),
    "inspect": ("alpro.sharding.inspect", "summarise a shard set (counts, durations, sizes, rejects)"),
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
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except AlproError as e:
        print(f"alpro {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alpro {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
