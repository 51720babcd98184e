"""The bytes of a shard set directory, for byte-identity checks between builds."""
from __future__ import annotations

import json
from pathlib import Path


def shard_set_bytes(out: Path) -> dict[str, bytes]:
    """Every file's bytes by name; a ``_stats.json`` without its ``seconds`` (the one field that is a timing)."""
    files = {}
    for p in sorted(out.iterdir()):
        if p.name.endswith("_stats.json"):
            stats = json.loads(p.read_text())
            stats.pop("seconds")
            files[p.name] = json.dumps(stats).encode()
        elif p.is_file():
            files[p.name] = p.read_bytes()
    return files
