"""Shared bits of the ``alpro shard`` / ``alpro inspect`` command lines."""

from __future__ import annotations

import argparse

from alpro.errors import AlproError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one :class:`AlproError` line (exit 2), not usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise AlproError(message)
