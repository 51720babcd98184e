"""The recipes the code reads ship as package data (alpro/recipes/) and are byte-for-byte copies of launch/configs/."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from alpro.recipes import recipe_dir

REPO = Path(__file__).resolve().parents[1]


def test_packaged_demo_recipes_are_copies_of_launch():
    launch = sorted(p.name for p in (REPO / "launch" / "configs" / "demo").glob("*.yaml"))
    packaged = recipe_dir("demo")
    assert launch and sorted(p.name for p in packaged.glob("*.yaml")) == launch
    for name in launch:
        assert (packaged / name).read_bytes() == (REPO / "launch" / "configs" / "demo" / name).read_bytes(), (
            f"alpro/recipes/demo/{name} differs from launch/configs/demo/{name}: the launch/ copy is the source of "
            "truth, run `cp launch/configs/demo/*.yaml alpro/recipes/demo/`")


def test_demo_reads_the_packaged_recipes_and_they_resolve():
    from alpro.apps.demo import CONFIGS
    from alpro.train.config import load_run_config

    assert CONFIGS == recipe_dir("demo") and CONFIGS.is_relative_to(REPO / "alpro")
    for name in ("prompter", "pretrain", "qa"):
        cfg = load_run_config(CONFIGS / f"{name}.yaml")
        assert cfg.stage == name


@pytest.mark.slow
def test_wheel_carries_the_recipes(tmp_path):
    """A built wheel holds the recipes (what a non-editable install reads through importlib.resources)."""
    src = tmp_path / "src"  # a copy: setuptools builds in the source tree (build/, *.egg-info)
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, src / name)
    for name in ("alpro", "kernels", "sharding"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "wheel"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("alpro-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in sorted(p.name for p in (REPO / "launch" / "configs" / "demo").glob("*.yaml")):
        assert f"alpro/recipes/demo/{name}" in names
