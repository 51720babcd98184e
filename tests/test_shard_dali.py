"""DALI (on CPU) reads our shards through our own .idx files, and decodes a VP9 shard with fn.decoders.video."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import media_factory as mf
import numpy as np
import pytest

from alpro.sharding.index import read_index
from alpro.sharding.shard import shard_manifest

pytestmark = pytest.mark.dali


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dali_src")
    rows = [{"id": f"v{i}", "video": str(mf.make_video(d / f"v{i}.mp4", seed=i, seconds=0.5 + 0.25 * i)),
             "caption": f"clip {i}"} for i in range(4)]
    rows.append({"id": "img", "image": str(mf.make_image(d / "img.jpg", seed=9)), "caption": "an image"})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "m.jsonl"


def _pipeline(out: Path, exts: list[str], dtypes: list, decode: bool = False):
    from nvidia.dali import fn, pipeline_def

    index = read_index(out)
    tars = [str(out / e["file"]) for e in index["shards"]]
    idxs = [str(out / e["idx"]) for e in index["shards"]]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, seed=0)
    def pipe():
        outputs = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=exts, dtypes=dtypes,
                                        missing_component_behavior="error", name="reader")
        if decode:
            return (*outputs[:-1], fn.decoders.video(outputs[-1], device="cpu"))
        return tuple(outputs)

    p = pipe()
    p.build()
    return p, index


def test_dali_reads_h264_shards_with_our_index(sources, tmp_path):
    from nvidia.dali import types

    out = tmp_path / "h264"
    shard_manifest(sources, out, shard_size=2, progress=False)
    p, index = _pipeline(out, ["json", "vinfo", "mp4;jpg"], [types.UINT8, types.INT32, types.UINT8])
    total = index["totals"]["samples"]
    assert p.epoch_size("reader") == total == 5
    members = {}
    for e in index["shards"]:
        with tarfile.open(out / e["file"]) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    for _ in range(total):
        meta_t, vinfo_t, media_t = p.run()
        meta = json.loads(bytes(np.array(meta_t[0])))
        vinfo = np.array(vinfo_t[0]).tolist()
        assert vinfo == [meta["num_frames"], meta["width"], meta["height"], round(meta["fps"] * 1000)]
        ext = "mp4" if meta["media"] == "video" else "jpg"
        assert bytes(np.array(media_t[0])) == members[f"{meta['key']}.{ext}"]


def test_dali_cpu_decodes_a_vp9_shard_to_the_recorded_frame_count(sources, tmp_path):
    from nvidia.dali import types

    out = tmp_path / "vp9"
    shard_manifest(sources, out, codec="vp9", media="video", shard_size=3, progress=False)
    p, index = _pipeline(out, ["vinfo", "mp4"], [types.INT32, types.UINT8], decode=True)
    assert index["totals"]["videos"] == 4
    counts = []
    for _ in range(4):
        vinfo_t, frames_t = p.run()
        num_frames, width, height, _ = np.array(vinfo_t[0]).tolist()
        frames = np.array(frames_t[0])
        assert frames.shape == (num_frames, height, width, 3) and frames.dtype == np.uint8
        counts.append(num_frames)
    assert sorted(counts) == [12, 18, 24, 30]  # 0.5, 0.75, 1.0, 1.25 s at 24 fps
