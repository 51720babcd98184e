"""Shared pytest setup: CPU only, quiet third-party logs, deterministic seeds, and the tiny corpus fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A 48-clip / 24-image shapes-world corpus; shared by every test that needs real media."""
    from cli_helpers import make_tiny_corpus

    return make_tiny_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


@pytest.fixture(scope="session")
def tiny_shards(tiny_corpus, tmp_path_factory) -> dict[str, Path]:
    """train_video / train_image / test_video shard sets of ``tiny_corpus`` (8 fps, short side 40) + entities."""
    from cli_helpers import make_tiny_shards

    return make_tiny_shards(tiny_corpus, tmp_path_factory.mktemp("shards"))
