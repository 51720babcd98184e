"""``python -m alpro.train`` / ``torchrun -m alpro.train``: the trainer, with the CLI's error handling."""

import sys

from alpro.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
