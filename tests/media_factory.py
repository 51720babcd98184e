"""Tiny test media made on the fly with PyAV and PIL: good clips and every nasty case a real crawl contains.

Every function writes one file into a directory the caller owns and returns its path. Content is a seeded,
moving pattern, so two calls with the same arguments give byte-identical files (x264 and libvpx run with one
thread) and two different seeds give different bytes (what the sharder's content dedup keys on).

Good clips: ``make_video`` (H.264 or VP9, any GOP, B-frames, fps, audio track, rotation, VFR, odd sizes).
Bad inputs: ``make_zero_byte``, ``make_truncated``, ``make_corrupt``, ``make_not_video``, ``make_audio_only``,
``make_absurd_duration``, ``make_absurd_aspect``. Images: ``make_image``. Captions: ``nasty_captions``.
"""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

__all__ = [
    "frame_pattern",
    "make_video",
    "make_image",
    "make_zero_byte",
    "make_truncated",
    "make_corrupt",
    "make_not_video",
    "make_audio_only",
    "make_absurd_duration",
    "make_absurd_aspect",
    "nasty_captions",
    "corpus",
]


def frame_pattern(index: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB frame (H, W, 3) uint8: a seeded colour gradient with a square that moves with ``index``.

    Smooth content keeps files tiny; the moving square makes consecutive frames differ, so inter-frame coding,
    keyframes and frame-count checks are exercised for real.
    """
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    ys, xs = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), dtype=np.uint8)
    for c in range(3):
        img[..., c] = (base[c] + xs * (c + 1) * 2 + ys * (3 - c)) % 256
    side = max(2, min(width, height) // 4)
    x0 = (index * 3 + int(base[0])) % max(1, width - side)
    y0 = (index * 2 + int(base[1])) % max(1, height - side)
    img[y0 : y0 + side, x0 : x0 + side] = 255 - img[y0 : y0 + side, x0 : x0 + side]
    return img


def _encoder_options(codec: str, gop: int, bframes: int) -> tuple[str, dict[str, str]]:
    """(PyAV codec name, private options) for a deterministic single-threaded encode."""
    if codec == "h264":
        # preset "veryfast" keeps B-frame support (ultrafast forces bframes=0); one thread -> identical bytes.
        x264_params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}"
        return "libx264", {"preset": "veryfast", "threads": "1", "x264-params": x264_params}
    if codec == "vp9":
        return "libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "threads": "1", "row-mt": "0",
                              "lag-in-frames": "0"}
    if codec == "mpeg4":
        return "mpeg4", {"threads": "1"}
    raise ValueError(f"unsupported test codec {codec!r}")


def make_video(
    path: str | Path,
    *,
    width: int = 64,
    height: int = 48,
    seconds: float = 1.0,
    fps: int | Fraction = 24,
    codec: str = "h264",
    gop: int = 12,
    bframes: int = 0,
    audio: bool = False,
    rotation: int | None = None,
    vfr: bool = False,
    seed: int = 0,
    faststart: bool = False,
) -> Path:
    """Encode a clip of ``round(seconds * fps)`` frames and return its path.

    ``codec`` is ``"h264"``, ``"vp9"`` or ``"mpeg4"``; the container follows the suffix (``.mp4``, ``.webm``,
    ``.mkv``). Odd ``width``/``height`` are kept: H.264 then uses yuv444p (x264 refuses odd 4:2:0), which is
    exactly the kind of source the sharder must make even. ``rotation`` writes a display matrix (counter-
    clockwise degrees). ``vfr`` spaces frames irregularly (alternating 1x and 2x the nominal interval) in a
    1/1000 time base, so the stream has no constant frame rate. ``audio`` adds a mono AAC (or Opus for .webm)
    sine track of the same length. ``faststart`` puts the ``moov`` index before the frames (as web servers do),
    so a truncated copy still opens and only its tail is missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_frames = max(1, round(seconds * float(fps)))
    codec_name, options = _encoder_options(codec, gop, bframes)
    odd = width % 2 or height % 2
    pix_fmt = "yuv444p" if (odd and codec == "h264") else "yuv420p"
    container_options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=container_options) as container:
        stream = container.add_stream(codec_name, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = bframes
        stream.options = options
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        audio_stream = None
        if audio:
            audio_stream = container.add_stream("libopus" if path.suffix == ".webm" else "aac", rate=48000)
            audio_stream.layout = "mono"
        pts_ms = 0
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, width, height, seed), format="rgb24")
            frame = frame.reformat(format=pix_fmt)
            if vfr:
                frame.pts, frame.time_base = pts_ms, Fraction(1, 1000)
                pts_ms += round(1000 / float(fps)) * (1 if i % 2 == 0 else 2)
            else:
                frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if audio_stream is not None:
            _write_sine(container, audio_stream, seconds)
    return path


def _write_sine(container: av.container.OutputContainer, stream: av.AudioStream, seconds: float) -> None:
    """Encode ``seconds`` of a 440 Hz mono tone into ``stream``."""
    rate = stream.codec_context.sample_rate
    chunk = stream.codec_context.frame_size or 1024
    total = int(seconds * rate)
    for start in range(0, total, chunk):
        t = (np.arange(start, start + chunk) / rate).astype(np.float32)
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]  # (channels=1, chunk)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def make_image(path: str | Path, *, width: int = 64, height: int = 48, seed: int = 0, quality: int = 90) -> Path:
    """A JPEG (or PNG, by suffix) still of the test pattern."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(frame_pattern(0, width, height, seed))
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, format="JPEG", quality=quality)
    else:
        img.save(path)
    return path


def make_zero_byte(path: str | Path) -> Path:
    """An empty file (a failed download)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make_truncated(path: str | Path, *, fraction: float = 0.5, **video_kwargs: object) -> Path:
    """A good clip cut to its first ``fraction`` of bytes (an interrupted download). By default ``moov`` is at the
    end and is lost (the file does not open); with ``faststart=True`` it opens and the last frames are missing."""
    path = Path(path)
    make_video(path, **video_kwargs)  # type: ignore[arg-type]
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    return path


def make_corrupt(path: str | Path, *, seed: int = 0, **video_kwargs: object) -> Path:
    """A good mp4 whose container still opens but whose coded frames are garbage (bit rot, bad disk).

    The ``mdat`` payload after its first quarter is overwritten with random bytes and ``moov`` is kept, so
    probing succeeds and decoding fails part-way: the case only a full decode at shard time catches.
    """
    path = Path(path)
    make_video(path, **video_kwargs)  # type: ignore[arg-type]
    data = bytearray(path.read_bytes())
    start, end = 64, len(data)
    pos = 0
    while pos + 8 <= len(data):  # walk the top-level mp4 boxes to find mdat
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"mdat":
            start, end = pos + 8 + (size - 8) // 4, pos + size - 16
            break
        if size < 8:
            break
        pos += size
    rng = np.random.default_rng(seed)
    data[start:end] = rng.integers(0, 256, size=end - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def make_not_video(path: str | Path) -> Path:
    """HTML bytes named like a video (an error page saved as ``.mp4``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n" * 4)
    return path


def make_audio_only(path: str | Path, *, seconds: float = 1.0) -> Path:
    """An mp4 (``.mp4``/``.m4a``) with one AAC track and no video stream."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48000)
        stream.layout = "mono"
        _write_sine(container, stream, seconds)
    return path


def make_absurd_duration(path: str | Path, *, hours: float = 10.0, width: int = 64, height: int = 48) -> Path:
    """Two H.264 frames, the second ``hours`` later: a tiny file whose container claims an absurd duration."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"preset": "veryfast", "threads": "1", "x264-params": "bframes=0"}
        for i, pts in enumerate((0, int(hours * 3600 * 1000))):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, width, height), format="rgb24").reformat(
                format="yuv420p")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def make_absurd_aspect(path: str | Path, *, width: int = 2048, height: int = 16, seconds: float = 0.25) -> Path:
    """A valid clip with an absurd frame shape (a 128:1 banner), which the sharder rejects by size limits."""
    return make_video(path, width=width, height=height, seconds=seconds, fps=8, gop=2)


def nasty_captions() -> dict[str, bytes]:
    """Caption payloads as raw bytes (write them to sidecars or manifests as-is).

    ``empty`` and ``blank`` must be rejected, ``non_utf8`` (Latin-1 bytes) must be rejected or reported, ``huge``
    (~1 MB on one line) exceeds any sane caption limit, ``multiline`` is valid and must become one line.
    """
    return {
        "empty": b"",
        "blank": b"   \n\t  \n",
        "non_utf8": "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e".encode("latin-1"),
        "huge": b"a very long caption " * 52_429,
        "multiline": b"a dog runs\nacross the   park\n",
        "unicode": "\u4e00\u53ea\u732b\u5728\u8df3 \u2014 a cat jumps \U0001f408".encode(),
    }


def corpus(directory: str | Path, n: int = 4, *, seconds: float = 1.0, **video_kwargs: object) -> list[Path]:
    """``n`` distinct good H.264 clips ``clip_000.mp4 ...`` (seeds 0..n-1) in ``directory``."""
    directory = Path(directory)
    return [make_video(directory / f"clip_{i:03d}.mp4", seconds=seconds, seed=i, **video_kwargs)  # type: ignore[arg-type]
            for i in range(n)]
