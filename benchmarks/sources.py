"""The "as downloaded" source clips the sharding and loader benchmarks share: long-GOP H.264 with B-frames."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np


def make_source(path: Path, seed: int, seconds: float, width: int = 640, height: int = 360, fps: int = 30,
                pan: int = 2) -> None:
    """A textured scene panning ``pan`` px per frame under a moving block; one keyframe, 3 B-frames."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, size=(height // 8 + 8, width // 8 + 64, 3), dtype=np.uint8)
    texture = np.kron(texture, np.ones((8, 8, 1), dtype=np.uint8))  # 8x8 blocks: detail a codec must spend on
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20", "x264-params": "keyint=250:bframes=3:threads=1"}
        for i in range(int(seconds * fps)):
            x = i * pan % (texture.shape[1] - width)  # camera pan
            img = texture[:height, x : x + width].copy()
            bx, by = (40 + i * 5) % (width - 64), (30 + i * 3) % (height - 64)
            img[by : by + 64, bx : bx + 64] = (255 - 3 * i) % 256
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def source_clips(src: Path, n: int, seconds: float, tag: str = "", pan: int = 2) -> list[Path]:
    """``n`` sources ``src/clipNNN{tag}.mp4`` (made once, then reused: seeded, so a cached clip is the clip)."""
    src.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(n):
        path = src / f"clip{i:03d}{tag}.mp4"
        if not path.exists():
            make_source(path, seed=i, seconds=seconds, pan=pan)
        clips.append(path)
    return clips


def write_manifest(path: Path, clips: list[Path], caption: str) -> Path:
    """A JSONL manifest of ``clips``; ``caption`` is formatted with the clip's stem (``{stem}``)."""
    path.write_text("".join(json.dumps({"id": p.stem, "video": str(p), "caption": caption.format(stem=p.stem)})
                            + "\n" for p in clips))
    return path
