"""Recipes the code itself reads, shipped as package data (``importlib.resources``) so a wheel install finds them.

``launch/configs/`` is the user-facing copy and the source of truth: ``alpro/recipes/demo/*.yaml`` are byte-for-byte
copies of ``launch/configs/demo/*.yaml`` (``alpro demo`` reads these), and ``tests/test_recipes_package.py`` fails on
any drift, naming the copy command. Copies rather than a build-time hook: setuptools' package data can only name
files inside a package, and a plain copy needs no build code. (The DeepSpeed JSON needs no file: the trainer
generates it from the run config.)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def recipe_dir(name: str) -> Path:
    """The packaged recipe folder ``name`` (e.g. ``demo``) as a real path: recipes name their bases by relative path
    and are handed to a torchrun subprocess, so they must be files (setuptools installs packages unzipped)."""
    return Path(str(files(__name__) / name))
