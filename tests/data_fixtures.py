"""Shard builders for the data tests: a few tiny H.264 / VP9 clips and JPEG images, and hand-written shards.

:func:`make_corpus` shards clips with the real sharder (``alpro shard`` through :func:`cli_helpers.run_cli`, the
one way tests run the sharder), so the loader is always tested against what ``alpro shard`` writes; the session
fixture ``loader_shards`` in ``conftest.py`` builds it once. :func:`write_shards` hand-writes shards in the same
format for the samples the sharder refuses to write (corrupt, truncated, lying metadata): the loader must
survive those when they come from other tools or from disk corruption.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import media_factory as mf
import numpy as np
import zstandard
from cli_helpers import run_cli

from alpro.data.decode import probe


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
    return 0


def write_shards(out: Path, samples: list[dict], per_shard: int = 4, name: str = "shard") -> Path:
    """samples: {key, path, captions, media ("video"|"image"), extra} and, to make bad samples, ``meta_from``
    (probe another file for the metadata), ``override`` (metadata fields) and ``raw_json`` (member bytes).
    Writes GNU tars + index.json.zst."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for s0 in range(0, len(samples), per_shard):
        file = f"{name}-{s0 // per_shard:06d}.tar"
        keys, media, frames, offsets, sizes = [], [], [], [], []
        with open(out / file, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for s in samples[s0 : s0 + per_shard]:
                data = Path(s["path"]).read_bytes()
                start = tar.offset
                meta = {"id": s["key"], "key": s["key"], "media": s["media"], "captions": s["captions"],
                        "extra": s.get("extra", {})}
                if s["media"] == "video":
                    m = probe(Path(s.get("meta_from", s["path"])).read_bytes())
                    ppf = int(m.pts[1] - m.pts[0])
                    meta.update(codec=m.codec, num_frames=m.num_frames, fps=24.0, width=m.width, height=m.height,
                                start_pts=int(m.start_pts), pts_per_frame=ppf, keyframes=m.keyframes.tolist())
                    meta.update(s.get("override", {}))
                    vinfo = struct.pack("<4i", meta["num_frames"], m.width, m.height, 24000)
                else:
                    meta.update(codec="jpeg", num_frames=1)
                    vinfo = struct.pack("<4i", 1, 0, 0, 0)
                _member(tar, f"{s['key']}.json", s.get("raw_json", json.dumps(meta).encode()))
                _member(tar, f"{s['key']}.txt", "\n".join(s["captions"]).encode())
                _member(tar, f"{s['key']}.vinfo", vinfo)
                ext = "jpg" if s["media"] == "image" else Path(s["path"]).suffix.lstrip(".")
                _member(tar, f"{s['key']}.{ext}", data)
                keys.append(s["key"])
                media.append(s["media"])
                frames.append(meta["num_frames"])
                offsets.append(start)
                sizes.append(tar.offset - start)
        entries.append({"file": file, "num_samples": len(keys), "keys": keys, "media": media,
                        "num_frames": frames, "offsets": offsets, "sizes": sizes,
                        "bytes": (out / file).stat().st_size})
    index = {"format": "alpro-shards", "version": 1, "name": name, "options": {}, "shards": entries}
    (out / "index.json.zst").write_bytes(zstandard.ZstdCompressor().compress(json.dumps(index).encode()))
    return out


def make_corpus(root: Path, n_video: int = 8, n_image: int = 4, codec: str = "h264", seconds: float = 2.0,
                qa: bool = False) -> tuple[Path, Path]:
    """Clips and images sharded by the real sharder (``alpro shard``), 3 per shard, with distinct captions and
    (``qa``) two questions per clip; returns (video_dir, image_dir).

    The sharder runs in a subprocess: FFmpeg's encoder threads must not exist in a process that later forks
    DataLoader workers (a forked child can inherit a held lock and hang)."""
    src = root / "src"
    rows = []
    for i in range(n_video):
        mf.make_video(src / f"v{i}.mp4", width=64, height=48, seconds=seconds, fps=24, gop=8, seed=i)
        row = {"id": f"v{i:03d}", "video": f"v{i}.mp4",
               "captions": [f"clip number {i} shows a moving square", f"caption two of clip {i}"]}
        if qa:
            row["qa"] = [{"question": f"what color is thing {i} {q}", "answer": ["red", "blue", "green"][(i + q) % 3],
                          "answer_type": "color"} for q in range(2)]
        rows.append(row)
    for i in range(n_image):
        mf.make_image(src / f"i{i}.jpg", width=80, height=60, seed=100 + i)
        rows.append({"id": f"i{i:03d}", "image": f"i{i}.jpg", "caption": f"a still image {i}"})
    manifest = src / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    video, image = root / "video", root / "image"
    _shard(manifest, video, "--media", "video", "--codec", codec)
    if n_image:
        _shard(manifest, image, "--media", "image")
    return video, image


def _shard(manifest: Path, out: Path, *args: str) -> None:
    run_cli("shard", str(manifest), str(out), "--shard-size", "3", "--no-progress", *args)


def frames_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def write_foreign(out: Path, clips: list[Path], per_shard: int = 3) -> Path:
    """video2dataset's layout: ``KEY.mp4 + KEY.txt + KEY.json`` in default-format (PAX) tars, no index."""
    out.mkdir(parents=True, exist_ok=True)
    for s0 in range(0, len(clips), per_shard):
        with tarfile.open(out / f"{s0 // per_shard:05d}.tar", "w") as tar:
            for i, clip in enumerate(clips[s0 : s0 + per_shard], start=s0):
                key = f"{s0 // per_shard:05d}{i:04d}"
                meta = {"url": f"https://example.com/{i}.mp4", "key": key, "status": "success",
                        "caption": f"foreign clip {i}"}
                _member(tar, f"{key}.mp4", clip.read_bytes())
                _member(tar, f"{key}.txt", f"foreign clip {i}".encode())
                _member(tar, f"{key}.json", json.dumps(meta).encode())
    return out
