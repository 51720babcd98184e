"""PyAV sparse decoding: the right frames, only the needed GOPs, and clear failures on bad clips."""

from __future__ import annotations

import av
import media_factory as mf
import numpy as np
import pytest

from alpro.data.decode import VideoMeta, decode_video, probe
from alpro.data.shards import SampleError


def _all_frames(path, size):
    with av.open(str(path)) as c:
        return [f.reformat(width=size, height=size, format="rgb24", interpolation="BILINEAR").to_ndarray()
                for f in c.decode(video=0)]


@pytest.mark.parametrize("codec,bframes,suffix", [("h264", 0, ".mp4"), ("h264", 2, ".mp4"), ("vp9", 0, ".webm")])
def test_sparse_decode_returns_exactly_the_requested_frames(tmp_path, codec, bframes, suffix):
    path = mf.make_video(tmp_path / f"c{suffix}", seconds=3, fps=24, gop=8, codec=codec, bframes=bframes, seed=3)
    data = path.read_bytes()
    meta = probe(data)
    assert meta.num_frames == 72 and meta.keyframes.tolist() == list(range(0, 72, 8))
    reference = _all_frames(path, 32)
    indices = np.array([0, 5, 5, 30, 31, 70])  # repeats and two targets in one GOP
    frames, decoded = decode_video(data, indices, meta, 32)
    assert frames.shape == (6, 3, 32, 32)
    for k, i in enumerate(indices):
        assert np.array_equal(frames[k].permute(1, 2, 0).numpy(), reference[i]), (codec, i)
    # GOP-limited and forward-only: 0..5 (6 frames), 24..31 (8), 64..70 (7)
    assert decoded == 21


@pytest.mark.parametrize("suffix,width", [(".mkv", 64), (".ts", 64), (".mp4", 63)])
def test_skipping_frames_while_probing_changes_no_frame(tmp_path, suffix, width):
    """decode.OPEN_OPTIONS stops FFmpeg's stream probing from decoding a frame; containers whose streams are
    only known after probing (MPEG-TS) and odd sizes (yuv444p) must still decode exactly as a plain open."""
    path = mf.make_video(tmp_path / f"c{suffix}", width=width, seconds=1, fps=24, gop=6, seed=5)
    data = path.read_bytes()
    meta = probe(data)
    assert meta.num_frames == 24 and meta.width == width
    frames, _ = decode_video(data, np.array([1, 7, 23]), meta, 24)
    reference = _all_frames(path, 24)
    for k, i in enumerate([1, 7, 23]):
        assert np.array_equal(frames[k].permute(1, 2, 0).numpy(), reference[i]), (suffix, i)


def test_foreign_metadata_from_probe_matches_sharder_layout(tmp_path):
    path = mf.make_video(tmp_path / "c.mp4", seconds=2, fps=24, gop=12)
    meta = probe(path.read_bytes())
    cfr = VideoMeta(num_frames=meta.num_frames, keyframes=meta.keyframes, start_pts=int(meta.pts[0]),
                    pts_per_frame=int(meta.pts[1] - meta.pts[0]))
    a, _ = decode_video(path.read_bytes(), np.array([3, 20, 40]), meta, 16)
    b, _ = decode_video(path.read_bytes(), np.array([3, 20, 40]), cfr, 16)
    assert np.array_equal(a.numpy(), b.numpy())


def test_a_frame_count_that_lies_is_a_sample_error(tmp_path):
    path = mf.make_video(tmp_path / "c.mp4", seconds=1, fps=24, gop=8)
    meta = probe(path.read_bytes())
    meta.num_frames = 100  # the container has 24
    with pytest.raises(SampleError) as err:
        decode_video(path.read_bytes(), np.array([2, 90]), meta, 16)
    assert err.value.reason == "frame_count"


@pytest.mark.parametrize("maker", ["corrupt", "truncated", "not_video", "zero"])
def test_broken_clips_raise_decode_errors(tmp_path, maker):
    path = tmp_path / "bad.mp4"
    if maker == "corrupt":
        mf.make_corrupt(path, seconds=2, gop=8)
    elif maker == "truncated":
        mf.make_truncated(path, seconds=2, gop=8)
    elif maker == "not_video":
        mf.make_not_video(path)
    else:
        mf.make_zero_byte(path)
    data = path.read_bytes()
    with pytest.raises(SampleError) as err:
        meta = probe(data)
        decode_video(data, np.arange(0, meta.num_frames, max(1, meta.num_frames // 4)), meta, 16)
    assert err.value.reason in ("decode_error", "frame_count")
