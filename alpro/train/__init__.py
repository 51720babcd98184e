"""Training system: DeepSpeed ZeRO under torchrun (one or many nodes), every stage, eval, export, search.

``alpro train --config launch/configs/STAGE.yaml [--section.key value ...]`` and
``torchrun ... -m alpro.train --config ...`` are the same program (:func:`main`).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="alpro train",
        description="Train one ALPRO stage (prompter, pretrain, retrieval, qa) with DeepSpeed.",
        epilog="Any --section.key VALUE pair overrides the config file, e.g. --optim.lr 5e-5 --train.steps 100.",
    )
    p.add_argument("--config", required=True, help="stage YAML (launch/configs/*.yaml)")
    p.add_argument("--resume", default=None, help="shortcut for --train.resume (auto | checkpoint | run dir)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    args, overrides = p.parse_known_args(argv)
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
