"""Probe, transcode and validate one clip or image with PyAV and PIL.

Videos are normalised for sparse random access: constant frame rate, no B-frames, a keyframe every ``gop``
frames, yuv420p with even dimensions, short side at most ``short_side`` (never upscaled), display rotation
applied, audio dropped. The encoded bytes are then decoded again: the stored ``num_frames``, keyframe indices
and pts step come from that decode, so the loader and DALI can trust them.

Every failure is a :class:`Reject` with a stable ``reason`` (see ``REJECT_REASONS``) and a one-line detail.
Encoders run with one thread: x264 and libvpx are then bit-exact run to run, which is what makes shards
byte-identical whatever the number of worker processes (parallelism is across clips instead).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import av
from av.video.frame import PictureType
from av.video.reformatter import Interpolation
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "REJECT_REASONS",
    "Reject",
    "MediaLimits",
    "VideoSettings",
    "EncodedMedia",
    "transcode_video",
    "copy_video",
    "encode_image",
    "validate_video",
    "sniff_container",
]

REJECT_REASONS = {
    "missing": "the source file cannot be reached (no such file, broken symlink, symlink loop, no permission)",
    "empty_file": "the source file has 0 bytes",
    "too_large": "the source file is larger than --max-source-bytes",
    "not_media": "the bytes are not a known video/image container (e.g. an HTML error page named .mp4)",
    "unreadable": "a media container that cannot be opened (truncated download, damaged header)",
    "no_video_stream": "the container has no video stream (e.g. audio only)",
    "decode_error": "decoding the source failed part-way (corrupt frames)",
    "truncated": "far fewer frames decode than the container declares",
    "too_long": "the source lasts longer than --max-source-duration",
    "bad_dimensions": "frame size below --min-side, above --max-pixels, or aspect ratio above --max-aspect",
    "too_short": "no frame to store (empty stream, or nothing left after --max-duration)",
    "validation_failed": "the stored clip does not decode to the frames and timestamps recorded",
    "copy_unsupported": "--copy needs a constant-frame-rate mp4/mov source",
    "missing_caption": "the manifest gives no caption field (and no QA) for the sample",
    "empty_caption": "every caption is empty after whitespace normalisation",
    "caption_too_long": "every non-empty caption is longer than --max-caption-chars",
    "caption_not_utf8": "no caption left once those holding bytes that are not UTF-8 are dropped",
    "duplicate_id": "an earlier row has the same id (or the same key once sanitised)",
    "duplicate": "an earlier sample has the same source bytes (sha256); see --keep-duplicates",
    "internal_error": "an unexpected error while processing this sample (a bug: please report it)",
}


class Reject(Exception):
    """A sample that cannot be stored: ``reason`` is a key of ``REJECT_REASONS``, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# The largest frame a training source needs: 8K UHD video (7680x4320 = 33.2 MP), which also covers 24-30 MP
# camera photos. Everything is stored with a short side of at most 256 px, so more pixels buy nothing, and a
# decoded image costs about 8 bytes per pixel at its peak (RGB decode + conversion copy): 33 MP is ~0.27 GB
# per worker, while a 187 KB PNG declaring 8192x8192 would take ~0.8 GB. Checked from the header, before decoding.
DEFAULT_MAX_PIXELS = 7680 * 4320


@dataclass(frozen=True)
class MediaLimits:
    """Sanity limits on sources: anything outside is rejected rather than stored."""

    max_source_duration: float = 3 * 3600.0
    min_side: int = 16
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = 10.0


@dataclass(frozen=True)
class VideoSettings:
    """How stored clips are encoded (all of it is recorded in the dataset index). ``alpro shard`` takes these
    fields as its own options (``ShardOptions.video``); the docstrings are their ``--help``."""

    codec: Literal["h264", "vp9"] = "h264"
    """h264: NVDEC/PyAV; vp9: DALI on CPU"""
    gop: int = 8
    """keyframe every GOP frames"""
    fps: float | None = None
    """target frame rate (never above the source's)"""
    fps_scale: float | None = None
    """frame rate = source fps x SCALE (ALPRO used 0.1)"""
    short_side: int = 256
    """resize the short side to at most this (images too)"""
    crf: int | None = None
    """quality (default: 23 for h264, 32 for vp9)"""
    preset: str = "veryfast"
    """x264 preset"""
    max_duration: float | None = None
    """keep at most this many seconds of each clip"""


@dataclass
class EncodedMedia:
    """The stored media and every field of ``KEY.json`` that describes it."""

    data: bytes
    ext: str
    codec: str
    num_frames: int
    fps: float
    width: int
    height: int
    time_base: tuple[int, int] | None = None
    start_pts: int | None = None
    pts_per_frame: int | None = None
    keyframes: list[int] = field(default_factory=list)
    src: dict[str, Any] = field(default_factory=dict)


# Signatures of containers FFmpeg or PIL can read, to tell "damaged media" from "not media at all".
_MAGIC = (
    (4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (4, b"skip"),
    (0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"), (0, b"OggS"), (0, b"FLV"), (0, b"\x00\x00\x01\xba"),
    (0, b"\x00\x00\x01\xb3"), (0, b"\xff\xd8\xff"), (0, b"\x89PNG"), (0, b"GIF8"), (0, b"BM"), (0, b"ID3"),
    (0, b"II*\x00"), (0, b"MM\x00*"),
)


def sniff_container(data: bytes) -> bool:
    """True if ``data`` starts like a media container (mp4/mov, mkv/webm, avi, ogg, flv, mpeg, ts, images)."""
    if len(data) >= 376 and data[0] == 0x47 and data[188] == 0x47:  # MPEG-TS sync bytes
        return True
    return any(data[off : off + len(sig)] == sig for off, sig in _MAGIC)


def _open_error(data: bytes, err: Exception | str) -> Reject:
    reason = "unreadable" if sniff_container(data) else "not_media"
    return Reject(reason, f"cannot open: {_one_line(err) if isinstance(err, Exception) else err}")


def _one_line(err: Exception) -> str:
    # FFmpeg errors read "[Errno N] Invalid data found when processing input: '<none>'": keep the useful part.
    text = err.strerror if isinstance(err, av.FFmpegError) and err.strerror else str(err)
    return " ".join(text.split())[:300]


def _check_dims(width: int, height: int, limits: MediaLimits) -> None:
    """Reject a frame size from the container/image header, before anything is decoded."""
    short, long = min(width, height), max(width, height)
    if short < limits.min_side:
        raise Reject("bad_dimensions", f"{width}x{height}: short side {short} < --min-side {limits.min_side}")
    if width * height > limits.max_pixels:
        raise Reject("bad_dimensions", f"{width}x{height} = {width * height} pixels > --max-pixels "
                     f"{limits.max_pixels} (from the header, not decoded)")
    if long > limits.max_aspect * short:
        raise Reject("bad_dimensions", f"{width}x{height}: aspect {long / short:.1f} > --max-aspect {limits.max_aspect:g}")


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Scale so the short side is at most ``short_side`` (never up), keep the aspect, round both sides to even."""
    scale = min(1.0, short_side / min(width, height))
    return _even(width * scale), _even(height * scale)


def _rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and 0 < rate < 1000:
            return Fraction(rate)
    return None


def _target_fps(src_fps: Fraction, settings: VideoSettings) -> Fraction:
    """The stored frame rate: ``--fps`` (never above the source: no duplicated frames) or source x ``--fps-scale``."""
    if settings.fps is not None:
        fps = min(Fraction(settings.fps).limit_denominator(1001), src_fps)
    elif settings.fps_scale is not None:
        fps = src_fps * Fraction(settings.fps_scale).limit_denominator(1000)
    else:
        fps = src_fps
    return fps.limit_denominator(1001)


def _open_source(data: bytes) -> av.container.InputContainer:
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise _open_error(data, e) from None
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        container.close()
        raise Reject("no_video_stream", f"streams: {kinds}")
    return container


def _probe(container: av.container.InputContainer, limits: MediaLimits) -> dict[str, Any]:
    """Source facts from the container headers, checked against the limits before any decoding."""
    stream = container.streams.video[0]
    ctx = stream.codec_context
    duration = None
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    if duration is not None and duration > limits.max_source_duration:
        raise Reject("too_long", f"{duration:.0f} s > {limits.max_source_duration:.0f} s")
    if not ctx.width or not ctx.height:
        raise Reject("unreadable", "video stream has no frame size")
    _check_dims(ctx.width, ctx.height, limits)
    rate = _rate(stream)
    return {"duration": duration, "fps": float(rate) if rate else None, "width": ctx.width, "height": ctx.height,
            "codec": ctx.name, "num_frames": stream.frames or None}


def _decoded_frames(container: av.container.InputContainer) -> Iterator[av.VideoFrame]:
    """Frames of the first video stream in display order; a decode failure mid-stream is a ``decode_error``."""
    stream = container.streams.video[0]
    stream.codec_context.thread_count = 1  # one clip per worker process; threads would only oversubscribe
    count = 0
    try:
        for frame in container.decode(stream):
            count += 1
            yield frame
    except (av.FFmpegError, ValueError) as e:
        raise Reject("decode_error", f"after {count} frame(s): {_one_line(e)}") from None


# BITEXACT + ACCURATE_RND: swscale's SIMD and C paths (chosen by CPU and buffer alignment) may otherwise round
# differently; one thread: no slice threading. Scaled frames then depend on the input pixels only.
_SWS_FLAGS = Interpolation.AREA | Interpolation.ACCURATE_RND | Interpolation.BITEXACT


def _converter(rot: int, width: int, height: int) -> Callable[[av.VideoFrame], av.VideoFrame]:
    """Source frame -> stored frame: scale to the stored size as yuv420p, then apply the display rotation."""
    w, h = (height, width) if rot % 2 else (width, height)
    rotate = _Rotator(rot, w, h) if rot else None

    def convert(frame: av.VideoFrame) -> av.VideoFrame:
        out = frame.reformat(width=w, height=h, format="yuv420p", interpolation=_SWS_FLAGS, threads=1)
        return rotate(out) if rotate else out

    return convert


class _Rotator:
    """Applies a display-matrix rotation with FFmpeg's ``transpose`` / ``hflip,vflip`` filters: an exact pixel
    permutation of the already-scaled yuv420p frame, into FFmpeg's own padded frame buffers (no numpy round
    trip, no second colour conversion)."""

    _FILTERS = {1: [("transpose", "cclock")], 2: [("hflip", None), ("vflip", None)], 3: [("transpose", "clock")]}

    def __init__(self, quarter_turns: int, width: int, height: int) -> None:
        self.graph = av.filter.Graph()
        node = self.graph.add_buffer(width=width, height=height, format="yuv420p", time_base=Fraction(1, 1000))
        for name, arg in self._FILTERS[quarter_turns]:
            nxt = self.graph.add(name, arg)
            node.link_to(nxt)
            node = nxt
        node.link_to(self.graph.add("buffersink"))
        self.graph.configure()

    def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
        frame.pts, frame.time_base = 0, Fraction(1, 1000)
        self.graph.push(frame)
        return self.graph.pull()


def _encoder(container: av.container.OutputContainer, settings: VideoSettings, fps: Fraction, width: int,
             height: int) -> av.video.stream.VideoStream:
    """A single-threaded x264 or libvpx-vp9 stream: keyframe every ``gop`` frames, no B-frames, yuv420p."""
    if settings.codec == "h264":
        stream = container.add_stream("libx264", rate=fps)
        crf = 23 if settings.crf is None else settings.crf
        # scenecut=0 + min-keyint=keyint: keyframes exactly at 0, gop, 2*gop, ... (sparse-access cost is bounded).
        # mbtree=0: with macroblock-tree rate control x264 (core 165) is not reproducible on small frames (the same
        # input encoded after other clips in one process gave different bytes); within an 8-frame GOP mbtree
        # buys little anyway.
        params = (f"keyint={settings.gop}:min-keyint={settings.gop}:scenecut=0:bframes=0:open-gop=0:mbtree=0:"
                  "threads=1")
        stream.options = {"preset": settings.preset, "crf": str(crf), "x264-params": params}
    elif settings.codec == "vp9":
        stream = container.add_stream("libvpx-vp9", rate=fps)
        crf = 32 if settings.crf is None else settings.crf
        # realtime/cpu-used 8 is ~5x faster than "good" at ~10 % more bytes; no alt-ref: one packet per frame.
        stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": str(crf), "b": "0", "threads": "1",
                          "row-mt": "0", "auto-alt-ref": "0", "lag-in-frames": "0", "keyint_min": str(settings.gop)}
    else:
        raise ValueError(f"unsupported codec {settings.codec!r}")
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = settings.gop
    stream.codec_context.time_base = 1 / fps
    stream.codec_context.thread_count = 1
    return stream


def transcode_video(data: bytes, settings: VideoSettings, limits: MediaLimits) -> EncodedMedia:
    """Source bytes -> a validated CFR clip per ``settings``.

    Frame-rate conversion picks, for output frame ``k`` at time ``k / fps``, the source frame on screen at that
    time (the last one whose timestamp is not later), using exact rational timestamps, so variable-frame-rate
    sources come out CFR and nothing depends on float rounding. Frames that no output slot needs are decoded
    but never converted or encoded.
    """
    with _open_source(data) as source:
        src = _probe(source, limits)
        stream = source.streams.video[0]
        src_fps = _rate(stream) or Fraction(25)
        fps = _target_fps(src_fps, settings)
        limit = None if settings.max_duration is None else Fraction(settings.max_duration).limit_denominator(10**6)
        out = io.BytesIO()
        encoded, decoded = 0, 0
        with av.open(out, mode="w", format="mp4") as sink:
            enc = None
            t0 = prev = prev_conv = None
            last_t = Fraction(-1)
            pending: Fraction = Fraction(0)  # time of the next output slot, encoded / fps

            def emit(frame: av.VideoFrame) -> None:
                nonlocal encoded
                frame.pts, frame.time_base = encoded, enc.codec_context.time_base
                # A decoded I-frame keeps pict_type I, which x264/libvpx obey as a forced keyframe: clear it so
                # keyframes fall exactly every `gop` frames.
                frame.pict_type = PictureType.NONE
                sink.mux(enc.encode(frame))
                encoded += 1

            for frame in _decoded_frames(source):
                decoded += 1
                if frame.pts is None:
                    continue
                t = Fraction(frame.pts) * frame.time_base
                if t0 is None:
                    t0 = t
                    rot = (round((frame.rotation or 0) / 90)) % 4
                    w, h = (src["height"], src["width"]) if rot % 2 else (src["width"], src["height"])
                    out_w, out_h = output_size(w, h, settings.short_side)
                    enc = _encoder(sink, settings, fps, out_w, out_h)
                    convert = _converter(rot, out_w, out_h)
                t -= t0
                if t <= last_t:  # non-increasing timestamps: a broken or duplicated frame, skip it
                    continue
                # Every slot before this frame's time shows the previous frame.
                while prev is not None and pending < t and (limit is None or pending < limit):
                    if prev_conv is None:
                        prev_conv = convert(prev)
                    emit(prev_conv)
                    pending = Fraction(encoded) / fps
                if limit is not None and t >= limit:
                    prev = None
                    break
                prev, prev_conv, last_t = frame, None, t
            if prev is not None:
                # The last frame stays on screen for its duration (or one source frame interval).
                dur = Fraction(prev.duration) * prev.time_base if prev.duration else 1 / src_fps
                end = last_t + dur if limit is None else min(last_t + dur, limit)
                while pending < end:
                    if prev_conv is None:
                        prev_conv = convert(prev)
                    emit(prev_conv)
                    pending = Fraction(encoded) / fps
            if enc is None or encoded == 0:
                raise Reject("too_short", f"{decoded} frame(s) decoded, none to store")
            sink.mux(enc.encode(None))
        if src["num_frames"] and decoded < 0.9 * src["num_frames"] and limit is None:
            raise Reject("truncated", f"{decoded} of {src['num_frames']} declared frames decode")
        src["num_frames"] = decoded
    media = validate_video(out.getvalue(), expected_frames=encoded)
    media.src = src
    return media


def validate_video(data: bytes, expected_frames: int | None = None) -> EncodedMedia:
    """Demux and fully decode stored bytes; return what ``KEY.json`` records about them.

    ``num_frames`` is the number of frames that actually decode; keyframe indices come from packet flags, in
    display (pts) order. With ``expected_frames`` (a clip we just encoded) any mismatch, or a pts step that is
    not constant, is ``validation_failed``; without it (``--copy``) a variable step is ``copy_unsupported``.
    """
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            packets: list[tuple[int, bool, int]] = []  # (pts, is_keyframe, duration)
            frames = 0
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    packets.append((packet.pts, packet.is_keyframe, packet.duration or 0))
                frames += len(packet.decode())
            ctx, tb = stream.codec_context, stream.time_base
    except (av.FFmpegError, ValueError, IndexError) as e:
        raise Reject("validation_failed", f"stored clip does not decode: {_one_line(e)}") from None
    packets.sort()
    pts = [p for p, _, _ in packets]
    if frames == 0 or frames != len(pts) or (expected_frames is not None and frames != expected_frames):
        raise Reject("validation_failed", f"{frames} frames decode from {len(pts)} packets"
                     + ("" if expected_frames is None else f", {expected_frames} encoded"))
    steps = sorted({b - a for a, b in zip(pts, pts[1:])})
    if len(steps) > 1:
        reason = "validation_failed" if expected_frames is not None else "copy_unsupported"
        raise Reject(reason, f"pts steps vary ({steps[0]}..{steps[-1]}): not constant frame rate")
    step = steps[0] if steps else packets[0][2]
    keyframes = [i for i, (_, key, _) in enumerate(packets) if key]
    if not keyframes or keyframes[0] != 0:
        raise Reject("validation_failed", "the first frame is not a keyframe")
    return EncodedMedia(data=data, ext="mp4", codec=ctx.name, num_frames=frames,
                        fps=float(1 / (step * tb)) if step else 0.0, width=ctx.width, height=ctx.height,
                        time_base=(tb.numerator, tb.denominator), start_pts=pts[0], pts_per_frame=step,
                        keyframes=keyframes)


def copy_video(data: bytes, limits: MediaLimits) -> EncodedMedia:
    """``--copy``: keep an already-prepared clip as it is, after probing and a full validating decode."""
    with _open_source(data) as source:
        src = _probe(source, limits)
        fmt = source.format.name
    if "mp4" not in fmt and "mov" not in fmt:
        raise Reject("copy_unsupported", f"container is {fmt}, not mp4/mov")
    media = validate_video(data)
    src["num_frames"] = media.num_frames
    media.src = src
    return media


def encode_image(data: bytes, short_side: int, quality: int, limits: MediaLimits) -> EncodedMedia:
    """Any PIL-readable image -> RGB JPEG, EXIF orientation applied, short side at most ``short_side``."""
    try:
        with warnings.catch_warnings():
            # PIL warns above 89 MP; --max-pixels decides instead (PIL's own hard limit, 179 MP, still applies).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only: the size is known before any decoding
        with img:
            _check_dims(img.width, img.height, limits)
            src = {"duration": 0.0, "fps": 0.0, "width": img.width, "height": img.height,
                   "codec": (img.format or "unknown").lower(), "num_frames": 1}
            img.load()
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except Reject:
        raise
    except Image.DecompressionBombError as e:
        raise Reject("bad_dimensions", _one_line(e)) from None
    except UnidentifiedImageError:
        raise _open_error(data, "not an image format PIL knows") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for damaged files
        raise _open_error(data, e) from None
    scale = min(1.0, short_side / min(rgb.size))
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return EncodedMedia(data=out.getvalue(), ext="jpg", codec="jpeg", num_frames=1, fps=0.0,
                        width=rgb.width, height=rgb.height, src=src)
