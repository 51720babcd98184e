"""Validation of a sample's ``KEY.json`` before anything uses it (``docs/shard_format.md``, ``KEY.json`` fields).

A shard from someone else may hold any JSON. Every field the loader or ``alpro inspect`` reads is checked for
type and range here, once per sample, so that a wrong value is one counted bad sample (``bad_metadata``) and
never an exception deep inside frame sampling or a histogram. Fields that are absent are fine (foreign shards
are probed instead); fields nobody reads are not checked. No torch import: ``alpro inspect`` uses it too.
"""

from __future__ import annotations

import json
import math
from typing import Any

# Bounds that no real clip reaches but that keep every later computation (frame sampling, pts arithmetic,
# histograms) in plain int64 / float range.
MAX_FRAMES = 10_000_000  # 4.6 days at 25 fps
MAX_SIDE = 1 << 16
MAX_TEXTS = 100_000


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def meta_problem(meta: Any) -> str | None:
    """What is wrong with a parsed ``KEY.json`` (one short phrase), or None when every field it has is usable."""
    if not isinstance(meta, dict):
        return f"json is a {type(meta).__name__}, not an object"
    captions = meta.get("captions")
    if captions is not None and not isinstance(captions, str):
        if not isinstance(captions, list) or len(captions) > MAX_TEXTS:
            return f"captions is {_show(captions)}, not a list of strings"
        if not all(isinstance(c, str) for c in captions):
            return "captions holds a non-string"
    if "caption" in meta and meta["caption"] is not None and not isinstance(meta["caption"], str):
        return f"caption is {_show(meta['caption'])}, not a string"
    if "media" in meta and meta["media"] not in ("video", "image"):
        return f"media is {_show(meta['media'])}, not 'video' or 'image'"
    if "num_frames" in meta and not (_is_int(meta["num_frames"]) and 0 <= meta["num_frames"] <= MAX_FRAMES):
        return f"num_frames is {_show(meta['num_frames'])}, not an integer in [0, {MAX_FRAMES}]"
    for name in ("width", "height"):
        if name in meta and meta[name] is not None and not (_is_int(meta[name]) and 0 <= meta[name] <= MAX_SIDE):
            return f"{name} is {_show(meta[name])}, not an integer in [0, {MAX_SIDE}]"
    for name in ("fps", "duration"):
        if name in meta and meta[name] is not None and not (_is_number(meta[name]) and meta[name] >= 0):
            return f"{name} is {_show(meta[name])}, not a finite number >= 0"
    for name in ("start_pts", "pts_per_frame"):
        if name in meta and meta[name] is not None and not (_is_int(meta[name]) and abs(meta[name]) < 1 << 62):
            return f"{name} is {_show(meta[name])}, not an integer"
    if "pts_per_frame" in meta and _is_int(meta["pts_per_frame"]) and meta["pts_per_frame"] < 0:
        return f"pts_per_frame is {meta['pts_per_frame']}, not >= 0"
    if "keyframes" in meta and meta["keyframes"] is not None:
        kf = meta["keyframes"]
        n = meta.get("num_frames") if _is_int(meta.get("num_frames")) else MAX_FRAMES
        if not isinstance(kf, list) or not all(_is_int(k) and 0 <= k < max(n, 1) for k in kf):
            return f"keyframes is {_show(kf)}, not a list of frame indices below num_frames"
        if kf != sorted(kf):
            return "keyframes are not sorted"
    if "codec" in meta and meta["codec"] is not None and not isinstance(meta["codec"], str):
        return f"codec is {_show(meta['codec'])}, not a string"
    extra = meta.get("extra")
    if extra is not None and not isinstance(extra, dict):
        return f"extra is {_show(extra)}, not an object"
    if isinstance(extra, dict):
        qa = extra.get("qa")
        if qa is not None and not (isinstance(qa, list) and all(isinstance(p, dict) for p in qa)):
            return f"extra.qa is {_show(qa)}, not a list of objects"
        for pair in qa or ([extra] if "question" in extra else []):
            for name in ("question", "answer", "answer_type"):
                if name in pair and pair[name] is not None and not isinstance(pair[name], (str, int, float)):
                    return f"extra.qa {name} is {_show(pair[name])}, not a string"
    return None


def _show(value: Any) -> str:
    """A value as it appears in the JSON, cut to 40 characters (messages stay one short line)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
