"""CPU decoding with PyAV: only the GOPs that hold the sampled frames, forward only, RGB only for the targets.

For each target frame (sorted), the decoder seeks to the keyframe before it only when that keyframe lies
beyond the frames already decoded; otherwise it keeps decoding forward (the next target is in the current
GOP or the next one). It never seeks backwards. Frames that are not targets are decoded (they are reference
frames) but never converted; targets are converted and resized in one swscale call at the output size.
The keyframe list and pts layout come from the sharder's metadata; clips without it (foreign shards) are
probed once by demuxing packets, which reads no pixels.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation, VideoReformatter
from PIL import Image

from alpro.data.shards import SampleError

_INTERP = {"bilinear": Interpolation.BILINEAR, "bicubic": Interpolation.BICUBIC, "area": Interpolation.AREA}
_REFORMATTERS: dict[int, VideoReformatter] = {}


def _reformatter() -> VideoReformatter:
    """One swscale context per process, reused across frames and clips (building one per frame costs ~10x the
    conversion at these sizes). Per process because a context must never cross a fork."""
    pid = os.getpid()
    if pid not in _REFORMATTERS:
        _REFORMATTERS.clear()
        _REFORMATTERS[pid] = VideoReformatter()
    return _REFORMATTERS[pid]


@dataclass
class VideoMeta:
    """What decoding needs to know about a clip before touching pixels."""

    num_frames: int
    keyframes: np.ndarray  # (K,) int64 sorted frame indices of keyframes, starts with 0
    start_pts: int = 0
    pts_per_frame: int = 0  # constant frame rate: frame i has pts start_pts + i * pts_per_frame
    pts: np.ndarray | None = None  # (num_frames,) presentation pts when the rate is not constant (probed)
    codec: str = ""
    width: int = 0
    height: int = 0

    def index_of(self, pts: int | None, fallback: int) -> int:
        if pts is None:
            return fallback
        if self.pts is not None:
            return int(np.searchsorted(self.pts, pts))
        return int(round((pts - self.start_pts) / self.pts_per_frame)) if self.pts_per_frame else fallback

    def pts_of(self, index: int) -> int:
        if self.pts is not None:
            return int(self.pts[index])
        return self.start_pts + index * self.pts_per_frame


def meta_from_json(meta: dict) -> VideoMeta | None:
    """The sharder's fields (docs/shard_format.md); None when a foreign sample lacks any of them."""
    try:
        n = int(meta["num_frames"])
        keyframes = np.asarray(meta["keyframes"], dtype=np.int64)
        return VideoMeta(num_frames=n, keyframes=keyframes, start_pts=int(meta["start_pts"]),
                         pts_per_frame=int(meta["pts_per_frame"]), codec=str(meta.get("codec", "")),
                         width=int(meta.get("width", 0)), height=int(meta.get("height", 0)))
    except (KeyError, TypeError, ValueError):
        return None


# FFmpeg's stream probing (avformat_find_stream_info) decodes a clip's first frame only to learn its pixel
# format, which the decoding that follows learns anyway. Told to skip frames while probing, opening a 456x256
# H.264 clip in memory drops from ~4.5 ms to ~1.2 ms, about a tenth of the loader's whole per-clip cost
# (benchmarks/README.md, Loader). Only the probing decoder sees the option (PyAV gives `options` to
# find_stream_info, and only for containers whose streams are known before it: mp4, webm, mkv); the frames
# decoded afterwards are unchanged (tests/test_data_decode.py).
OPEN_OPTIONS = {"skip_frame": "all"}


def _open(data: bytes) -> tuple[av.container.InputContainer, av.VideoStream]:
    try:
        container = av.open(io.BytesIO(data), mode="r", options=OPEN_OPTIONS)
    except (av.FFmpegError, ValueError, OSError) as e:
        raise SampleError("decode_error", f"cannot open clip: {e}") from None
    if not container.streams.video:
        container.close()
        raise SampleError("decode_error", "no video stream")
    return container, container.streams.video[0]


def probe(data: bytes) -> VideoMeta:
    """Frame count, keyframes and pts of a clip by demuxing its packets (no decoding)."""
    container, stream = _open(data)
    pts, keys = [], []
    try:
        with container:
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                pts.append(packet.pts)
                keys.append(packet.is_keyframe)
            ctx = stream.codec_context
            codec, width, height = ctx.name, ctx.width, ctx.height
    except av.FFmpegError as e:
        raise SampleError("decode_error", f"demux failed: {e}") from None
    if not pts:
        raise SampleError("decode_error", "clip has no video packets")
    order = np.argsort(pts, kind="stable")
    sorted_pts = np.asarray(pts, dtype=np.int64)[order]
    keyframes = np.flatnonzero(np.asarray(keys, dtype=bool)[order]).astype(np.int64)
    if len(keyframes) == 0 or keyframes[0] != 0:
        keyframes = np.concatenate([[0], keyframes]).astype(np.int64)
    return VideoMeta(num_frames=len(sorted_pts), keyframes=keyframes, start_pts=int(sorted_pts[0]),
                     pts=sorted_pts, codec=codec, width=width, height=height)


def decode_video(data: bytes, indices: np.ndarray, meta: VideoMeta, size: int, interpolation: str = "bilinear",
                 threads: int = 1, channels_last: bool = False) -> tuple[torch.Tensor, int]:
    """Frames ``indices`` (sorted, may repeat) resized to size x size -> ((T, 3, size, size) uint8, frames decoded);
    ``channels_last``: (T, size, size, 3) as the decoder gives them (no transposing copy).

    Raises SampleError('frame_count') when the stream ends before a target (metadata that lies) and
    SampleError('decode_error') for anything FFmpeg rejects."""
    targets = np.unique(indices)
    wanted = set(targets.tolist())
    container, stream = _open(data)
    stream.codec_context.thread_count = threads
    if threads != 1:
        stream.thread_type = "AUTO"
    got: dict[int, np.ndarray] = {}
    decoded = 0
    pos = -1  # index of the last decoded frame
    try:
        with container:
            frames = None
            for t in targets:
                t = int(t)
                if t <= pos:
                    continue  # already passed (only possible when a seek landed late)
                kf = int(meta.keyframes[np.searchsorted(meta.keyframes, t, side="right") - 1])
                if frames is None or kf > pos + 1:
                    if kf > 0:
                        container.seek(meta.pts_of(kf), stream=stream, backward=True, any_frame=False)
                    frames = container.decode(stream)
                    pos = kf - 1
                while pos < t:
                    frame = next(frames, None)
                    if frame is None:
                        raise SampleError("frame_count", f"stream ended at frame {pos + 1}, needed {t} "
                                          f"(metadata says {meta.num_frames})")
                    decoded += 1
                    pos = meta.index_of(frame.pts, pos + 1)
                    if pos in got or pos not in wanted:
                        continue
                    # threads=1: swscale's own thread pool would oversubscribe workers and cannot survive fork.
                    rgb = _reformatter().reformat(frame, width=size, height=size, format="rgb24",
                                                  interpolation=_INTERP[interpolation], threads=1)
                    got[pos] = rgb.to_ndarray()
                if t not in got:
                    raise SampleError("decode_error", f"frame {t} was not produced (seek landed at {pos})")
    except av.FFmpegError as e:
        raise SampleError("decode_error", str(e)) from None
    shape = (len(indices), size, size, 3) if channels_last else (len(indices), 3, size, size)
    out = torch.empty(shape, dtype=torch.uint8)  # one copy of each frame (HWC -> CHW unless channels_last)
    for j, i in enumerate(indices):
        frame = torch.from_numpy(got[int(i)])
        out[j].copy_(frame if channels_last else frame.permute(2, 0, 1))
    return out, decoded


def decode_picture(data: bytes, max_pixels: int = 7680 * 4320) -> torch.Tensor:
    """JPEG / PNG / WebP bytes -> (3, H, W) uint8 RGB (Pillow; grey, palette and CMYK images are converted).

    The size is read from the image header first: an image over ``max_pixels`` (``data.limits.image_pixels``)
    raises SampleError('too_many_pixels') before a single pixel is decoded (a 200 KB PNG can hold 64 Mpx)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise SampleError("too_many_pixels", f"image of {width}x{height} pixels, over the cap of "
                                  f"{max_pixels} (data.limits.image_pixels)")
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError("decode_error", f"image: {e}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)
