"""The machine description every benchmark row carries (date, CPU model, cores, load, library versions)."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from pathlib import Path


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(**versions: str) -> dict:
    """``versions``: the libraries that matter to this benchmark, e.g. ``av=av.__version__``."""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "host": platform.node(),
            "cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), **versions}
