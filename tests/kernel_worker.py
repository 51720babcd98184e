"""Run kernel test cases in a separate, long-lived Python process with a chosen ``TRITON_INTERPRET`` mode.

Triton fixes interpreter-or-not when a ``@triton.jit`` kernel is *defined* (module import), so the interpreter
tests and the compile-only tests (which need real ``JITFunction`` objects) cannot share a process, and neither
may leak its mode into the rest of the pytest run. Each test module starts one worker (spawned: nothing is
inherited but ``sys.path``), sends it case names from ``tests/kernel_cases.py`` and gets back the case's
measurements; an assertion inside a case fails the calling test with the worker's traceback.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def _init(interpret: bool) -> None:
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _run(case: str, kwargs: dict[str, Any]) -> Any:
    import kernel_cases  # first import happens here, after _init set the mode

    return getattr(kernel_cases, case)(**kwargs)


class KernelWorker:
    """One spawned process; ``run(case, **kwargs)`` calls ``kernel_cases.<case>(**kwargs)`` there."""

    def __init__(self, interpret: bool):
        ctx = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init, initargs=(interpret,))

    def run(self, case: str, **kwargs: Any) -> Any:
        return self.pool.submit(_run, case, kwargs).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
