"""Frame samplers: which frame indices of a clip to decode, computed from the frame count alone.

Every sampler returns ``num`` sorted int64 indices in ``[0, vlen)``, so decoding can run forward once. Clips
shorter than the request repeat frames instead of failing (the original raised and replaced the clip):
random samplers take every frame once plus random repeats, evenly spaced samplers repeat naturally.

- ``rand``: sorted random distinct frames (the original's fine-tuning default).
- ``headtail``: half from the first half of the clip, half from the second (the original's pre-training
  default; for odd ``num`` the tail gets one more, where the original silently returned ``num - 1``).
- ``uniform``: evenly spaced from the first to the last frame (``linspace``), for evaluation.
- ``uniform_legacy``: the original's ``np.arange(0, vlen, vlen / num, dtype=int)``: numpy truncates the step,
  so the first frame is always taken and the tail is under-sampled. Use it to reproduce published numbers.
- ``segment``: one random frame in each of ``num`` equal segments (TSN / VindLU ``rand``).
- ``middle``: the middle frame of each of ``num`` equal segments (VindLU ``middle``).
"""

from __future__ import annotations

import numpy as np

from alpro.data.config import SAMPLINGS


def _distinct(rng: np.random.Generator, lo: int, hi: int, num: int) -> np.ndarray:
    """``num`` sorted frames from ``[lo, hi)``: distinct when possible, else all of them plus random repeats."""
    span = hi - lo
    if span >= num:
        return np.sort(rng.choice(span, size=num, replace=False)) + lo
    extra = rng.choice(span, size=num - span, replace=True)
    return np.sort(np.concatenate([np.arange(span), extra])) + lo


def sample_frames(strategy: str, vlen: int, num: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices (``num``, int64, sorted) for a clip of ``vlen`` frames. Random strategies need ``rng``."""
    if vlen < 1:
        raise ValueError(f"cannot sample frames from a clip of {vlen} frames")
    if strategy not in SAMPLINGS:
        raise ValueError(f"unknown frame sampling {strategy!r} (known: {', '.join(SAMPLINGS)})")
    if strategy in ("rand", "headtail", "segment") and rng is None:
        raise ValueError(f"sampling {strategy!r} needs a random generator")
    if strategy == "rand":
        out = _distinct(rng, 0, vlen, num)
    elif strategy == "headtail":
        half = vlen // 2
        n_head = num // 2
        if half == 0:  # a single-frame clip has no head
            out = _distinct(rng, 0, vlen, num)
        else:
            out = np.concatenate([_distinct(rng, 0, half, n_head), _distinct(rng, half, vlen, num - n_head)])
    elif strategy == "uniform":
        out = np.round(np.linspace(0, vlen - 1, num)).astype(np.int64)
    elif strategy == "uniform_legacy":
        # Exactly the original expression; it can yield one index too many from float rounding: keep `num`.
        out = np.arange(0, vlen, vlen / num, dtype=int)[:num]
        if len(out) < num:
            out = np.concatenate([out, np.full(num - len(out), out[-1])])
    else:
        edges = np.linspace(0, vlen, num + 1)  # segment i is [edges[i], edges[i+1])
        lo = np.floor(edges[:-1]).astype(np.int64)
        hi = np.maximum(np.floor(edges[1:]).astype(np.int64), lo + 1)
        if strategy == "segment":
            out = lo + np.floor(rng.random(num) * (hi - lo)).astype(np.int64)
        else:
            out = (lo + hi - 1) // 2
    return np.clip(out.astype(np.int64), 0, vlen - 1)
