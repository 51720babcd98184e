"""Training system: DeepSpeed ZeRO under torchrun (one or many nodes), every stage, eval, export, search.

``alpro train --config launch/configs/STAGE.yaml [--section.key value ...]`` and
``torchrun ... -m alpro.train --config ...`` are the same program (:func:`main`).
"""

from __future__ import annotations

from dataclasses import dataclass

from alpro.config import option, parse_command_overrides


@dataclass
class TrainCommand:
    """The options of ``alpro train`` (parsed by :func:`alpro.config.parse_command_overrides`; help from these
    docstrings); every other ``--section.key VALUE`` pair overrides the config file."""

    config: str = option(positional=False)
    """stage YAML (launch/configs/*.yaml)"""
    resume: str | None = None
    """shortcut for --train.resume (auto | checkpoint | run dir)"""
    print_config: bool = False
    """print the resolved config and exit"""
    local_rank: int | None = option(None, aliases=("--local_rank",), hidden=True)
    """set by the deepspeed launcher; torchrun's LOCAL_RANK is what the trainer reads"""


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_command_overrides(
        TrainCommand, argv, prog="alpro train",
        description="Train one ALPRO stage (prompter, pretrain, retrieval, qa) with DeepSpeed.",
        epilog="Any --section.key VALUE pair overrides the config file, e.g. --optim.lr 5e-5 --train.steps 100.")
    if args.resume is not None:
        overrides += ["--train.resume", args.resume]

    from alpro.train.config import check_inputs, dump_config, load_run_config

    cfg = load_run_config(args.config, overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    check_inputs(cfg)
    from alpro.train.trainer import run

    run(cfg)
    return 0
