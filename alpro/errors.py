"""One exception type for bad user input (files, configs, shards, checkpoints, CLI args).

Raise :class:`AlproError` with a one-line, specific message; the ``alpro`` CLI prints it as
``alpro <command>: error: <message>`` and exits with status 2, never with a traceback.
"""

from __future__ import annotations


class AlproError(Exception):
    """A user-facing error: the message alone must tell the user what is wrong and where."""


class ConfigError(AlproError):
    """An invalid configuration (unknown key, wrong type, missing data)."""
