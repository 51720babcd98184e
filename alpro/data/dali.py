"""NVIDIA DALI decoding: the same plan, the same transforms, only the pixels come from DALI.

The DataLoader workers prepare each video batch exactly as in the PyAV path (read bytes, parse metadata, draw
frame indices and augmentation). The main process feeds the encoded clips and their frame lists to one DALI
graph::

    external_source(encoded) -> decoders.video(frames=per-sample indices) -> resize(square) -> torch

with ``device='mixed'`` (NVDEC: H.264, HEVC, VP9, AV1) when CUDA is present and ``device='cpu'`` otherwise;
the graph is otherwise identical. The crop, RandAugment and normalisation then run in torch on the tensor
where DALI left it (the GPU for mixed), with the very code the PyAV path uses.

Why ``external_source`` and not ``readers.webdataset``: the reader has its own shuffling and sharding, which
cannot reproduce the loader's global plan; feeding the plan keeps one order, one resume state and one
replacement rule for both decoders. Bytes come from the same positioned reads of the shards.

Bad clips: DALI decodes a whole batch at once and cannot drop a sample. When a batch fails, the pipeline is
run again on the next batch (raw ``Pipeline.run`` recovers, unlike ``DALIGenericIterator``) and the failed
batch is re-decoded item by item with PyAV, replacing bad items by the plan's fallbacks: the batch is exactly
what the PyAV path delivers, and ``dali_batch_fallbacks`` counts these events.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from alpro.data.config import DataConfig
from alpro.data.indexed import IndexedSource
from alpro.data.plan import Task
from alpro.data.samples import BatchBuilder, BatchStats, Prepared
from alpro.data.shards import SampleError
from alpro.errors import AlproError

LOG = logging.getLogger("alpro.data")
CPU_CODECS = ("vp9", "vp8", "mjpeg")  # what DALI's CPU video decoder can decode (no H.264 / HEVC / AV1)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def choose_decoder(cfg: DataConfig) -> str:
    """``pyav`` or ``dali``: ``auto`` takes DALI only with CUDA (NVDEC); on a CPU machine PyAV is faster."""
    if cfg.decoder == "pyav":
        return "pyav"
    if cfg.decoder == "dali":
        if not dali_available():
            raise AlproError("data.decoder is 'dali' but NVIDIA DALI is not installed "
                             "(pip install nvidia-dali-cuda130)")
        return "dali"
    return "dali" if torch.cuda.is_available() and dali_available() else "pyav"


def dali_device(cfg: DataConfig) -> str:
    if cfg.dali_device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if cfg.dali_device == "gpu" and not torch.cuda.is_available():
        raise AlproError("data.dali_device is 'gpu' but CUDA is not available")
    return cfg.dali_device


def check_codec(codec: str, device: str, where: str) -> None:
    if device == "cpu" and codec and codec not in CPU_CODECS:
        raise AlproError(f"{where}: codec {codec!r} cannot be decoded by DALI on the CPU (only "
                         f"{', '.join(CPU_CODECS)}); use data.decoder: pyav, a GPU, or shards made with "
                         "`alpro shard --codec vp9`")


class DaliRenderer:
    """Decodes the prepared video items of a batch with DALI and finishes the batch in torch."""

    def __init__(self, cfg: DataConfig, builder: BatchBuilder, codecs: set[str]):
        from alpro.dist import get_local_rank

        self.builder, self.items = builder, builder.items
        self.device = dali_device(cfg)
        for codec in codecs:
            check_codec(codec, self.device, "video shards")
        self.size = self.items.clip_tf.resize
        self.torch_device = torch.device("cuda", get_local_rank()) if self.device == "gpu" else torch.device("cpu")
        self.pipe = _build_pipeline(cfg.batch_size_for(self.items.train), cfg.dali_threads, self.device,
                                    get_local_rank() if self.device == "gpu" else None, self.size, cfg.interpolation)

    def _decode(self, prepared: list[Prepared]) -> list[torch.Tensor]:
        """Frames of each item, (T, 3, size, size) uint8 on the renderer's device."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        self.pipe.feed_input("encoded", [np.frombuffer(p.data, dtype=np.uint8) for p in prepared])
        self.pipe.feed_input("frames", [p.frames.astype(np.int32) for p in prepared])
        (out,) = self.pipe.run()
        tensor = out.as_tensor()
        frames = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.torch_device)  # (B, T, H, W, 3)
        stream = torch.cuda.current_stream(self.torch_device) if self.device == "gpu" else None
        feed_ndarray(tensor, frames, cuda_stream=stream)
        return list(frames.permute(0, 1, 4, 2, 3))  # each (T, 3, H, W)

    def _estimated_decoded(self, p: Prepared) -> int:
        """Frames DALI decodes for an item: from frame 0 to the last target on the CPU (no seeking there), from
        each target's keyframe on NVDEC."""
        if self.device == "cpu":
            return int(p.frames.max()) + 1
        kf = p.vmeta.keyframes
        total, pos = 0, -1
        for t in np.unique(p.frames):
            start = max(int(kf[np.searchsorted(kf, t, side="right") - 1]), pos + 1)
            total += int(t) - start + 1
            pos = int(t)
        return total

    def render(self, task: Task, prepared: list[Prepared | None], fallbacks: list[int], stats: BatchStats):
        videos = [i for i, p in enumerate(prepared) if p is not None and p.media == "video"]
        for i in videos:
            check_codec(prepared[i].vmeta.codec, self.device, prepared[i].key)
        pixels: list[torch.Tensor | None] = [None] * len(prepared)
        decoded = None
        if videos:
            try:
                decoded = self._decode([prepared[i] for i in videos])
            except RuntimeError as e:
                LOG.warning(f"DALI failed on batch {task.step} ({str(e).splitlines()[-1][:200]}); "
                            "re-decoding it with PyAV")
                stats.skips["dali_batch_fallbacks"] += 1
        if decoded is not None:
            for i, frames in zip(videos, decoded):
                p = prepared[i]
                pixels[i] = self.items.clip_tf.apply(frames, p.clip)
                stats.decoded_frames += self._estimated_decoded(p)
                stats.delivered_frames += len(p.frames)
        for i, p in enumerate(prepared):
            if p is None or pixels[i] is not None:
                continue
            prepared[i], pixels[i] = self._pyav(task, p, fallbacks, stats)
        return self.builder.assemble(task, prepared, pixels, stats)

    def _pyav(self, task: Task, p: Prepared, fallbacks: list[int], stats: BatchStats):
        """One item through the PyAV path, with the plan's replacement rule if it cannot be decoded."""
        try:
            return p, self.builder.render_timed(p, stats).pixels.to(self.torch_device)
        except SampleError as e:
            stats.skips[e.reason] += 1
            if not self.items.train:
                return None, None
            if not fallbacks:
                raise AlproError(f"replacements exhausted in batch {task.step} (last: {e})") from None
            replaced = self.builder.with_replacement(task, fallbacks.pop(0), fallbacks, stats, render=True,
                                                     defer=False)
            return replaced[0], replaced[1].pixels.to(self.torch_device)


class DaliIndexedSource(IndexedSource):
    """The indexed back-end with DALI decoding: workers prepare the video batches (bytes, frame indices,
    augmentation), the main process decodes them with :class:`DaliRenderer`; image batches are built in the
    workers as on the PyAV path. Same plan, same position, same state as :class:`IndexedSource`."""

    def __init__(self, cfg: DataConfig, task: str, split: str, tokenizer, rank: int, world_size: int, seed: int,
                 answer_vocab: dict[str, int] | None = None):
        super().__init__(cfg, task, split, tokenizer, rank, world_size, seed, answer_vocab)
        if "video" in self.kinds:
            codecs = {str(self.shardsets[0].options.get("codec", ""))} - {""}
            self.renderer = DaliRenderer(cfg, self.builder, codecs)

    def _context(self) -> str | None:
        # Forking a process that runs DALI threads crashes the children: DALI runs start their workers from a
        # clean fork server instead. The dataset is pickled to them once: a shard set read from a columnar index
        # travels as its path and is re-mapped in the worker (alpro.data.shards.ColumnIndex), so a worker holds
        # the pages it reads, not a copy of the index.
        return "forkserver"


def _build_pipeline(batch_size: int, threads: int, device: str, device_id: int | None, size: int,
                    interpolation: str):
    from nvidia.dali import fn, pipeline_def, types

    # DALI has no area filter; its antialiased linear filter averages over the footprint when shrinking.
    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "area": types.INTERP_LINEAR}
    interp = interp[interpolation]

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=1,
                  exec_dynamic=True)
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        video = fn.decoders.video(encoded, device="mixed" if device == "gpu" else "cpu", frames=frames)
        return fn.resize(video, resize_x=size, resize_y=size, interp_type=interp, antialias=True)

    pipe = graph()
    pipe.build()
    return pipe
