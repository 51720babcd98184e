"""Full-DALI reader mode (``data.dali_reader: webdataset``): DALI reads the shards, picks the frames, decodes,
resizes, crops and normalises; torch adds RandAugment, text, MLM and PEM and returns the usual :class:`Batch`.

Two DALI graphs run back to back in the training process::

    reader graph (checkpointed)                         decode graph (stateless)
    readers.webdataset -> json, txt, vinfo, video       external_source(video, frames, crop position)
    random.uniform     -> one seed per sample     ==>     -> decoders.video(frames=...)  device 'mixed' | 'cpu'
    python_function(vinfo, seed)                          -> resize (square, the task's decode size)
        -> frame list, crop position                      -> crop_mirror_normalize (CLIP mean/std, layout CFHW)

Why two graphs: DALI 2.4's ``decoders.video`` implements no checkpointing, and a pipeline built with
``enable_checkpointing=True`` refuses to build around it. Everything with state -- the reader's position and
shuffle buffer, the random seeds -- lives in the reader graph, so its ``Pipeline.checkpoint()`` plus how many
samples of its current batch were handed out is the whole resume state; the decode graph is a pure function
of its inputs. Batches leave DALI through the PyTorch plugin's ``feed_ndarray`` after a raw ``Pipeline.run``,
not through ``DALIGenericIterator``: the iterator dies for good on the first pipeline error (a corrupt clip).

Frame lists come from a ``python_function`` that runs :func:`alpro.data.sampling.sample_frames` on the
``.vinfo`` frame count with a generator seeded by the sample's DALI-drawn seed: the plan path's own function,
so the deterministic samplers give identical indices and the random ones the identical distribution. DALI
arithmetic could express the evenly spaced samplers but not ``rand``'s sorted draw without replacement; one
code path for all six is easier to trust. The crop position comes from the same seed through
``ClipTransform.draw``, and DALI applies a per-sample crop to every frame of the sequence: one crop per clip.

In torch, the item's text (caption choice), PEM box and RandAugment ops are drawn from that same seed by the
plan path's code (:meth:`ItemLoader.prepare_members`); temporally consistent RandAugment then runs on the
decoded clip (de-normalise, ops, normalise; only clips that drew ops), followed by tokenising and MLM.

Order: DALI's own, not the loader's global plan. Each rank reads its ``1/world`` of the samples
(``num_shards`` / ``shard_id``); the tar order is reshuffled every epoch with a seed all ranks share
(``shuffle_after_epoch``), and samples pass a shuffle buffer of ``data.stream_buffer`` (``initial_fill``).
A restored run continues exactly, with the same world size only. Evaluation reads each rank's part in shard
order once (``stick_to_shard``, ``pad_last_batch``); the padding is ``valid=False``.

Bad clips: a failed decode-graph run loses its batch inside DALI, but the reader graph's outputs are still in
hand, so the batch is decoded again one clip at a time to find the bad ones. Training replaces them by the
stream's next samples (batches stay full); evaluation marks the slot ``valid=False``.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from alpro.data.batch import CLIP_MEAN, CLIP_STD, Batch
from alpro.data.config import DataConfig
from alpro.data.dali import check_codec, dali_device
from alpro.data.indexed import IndexedSource
from alpro.data.plan import AUGMENT, FRAMES, ORDER, ItemTable, Task, item_rng, rng
from alpro.data.protocol import STATE_VERSION, Mix
from alpro.data.samples import BatchBuilder, BatchStats, ItemLoader, Prepared, read_meta
from alpro.data.sampling import sample_frames
from alpro.data.shards import MEDIA_VIDEO, VIDEO_EXTS, Reader, SampleError, ShardSet, resolve, split_name
from alpro.data.sources import task_sources
from alpro.data.transforms import apply_op, normalize
from alpro.errors import AlproError
from alpro.shard_format import vinfo_frames

LOG = logging.getLogger("alpro.data")
_SEEDS = 1000  # purpose key of the DALI seeds, apart from the plan's purposes (plan.ORDER ...)
_MEAN = [255.0 * m for m in CLIP_MEAN]
_STD = [255.0 * s for s in CLIP_STD]


# ------------------------------------------------------------------------------------------------ shards


def check_reader_shards(shardset: ShardSet, where: str, device: str) -> None:
    """What the reader mode needs, checked before any pipeline exists: local tars with the sharder's DALI index
    files, video samples only, and a codec the DALI device decodes (H.264 on the CPU is a one-line error)."""
    if shardset.streaming:
        raise AlproError(f"{where}: pipe: sources cannot be read by DALI's webdataset reader (it opens local tar "
                         "files); use data.dali_reader: plan")
    for shard in shardset.shards:
        if shard.index_file is None or not os.path.isfile(shard.index_file) or not os.path.isfile(shard.url):
            raise AlproError(f"{where}: {shard.url} has no local DALI index (.idx): data.dali_reader 'webdataset' "
                             "reads local shard sets written by `alpro shard`; use data.dali_reader: plan")
    not_video = int(sum(int((s.media != MEDIA_VIDEO).sum()) for s in shardset.shards))
    if not_video:
        raise AlproError(f"{where}: {not_video} samples are not videos; data.dali_reader 'webdataset' needs a "
                         "video-only shard set (`alpro shard --media video`)")
    check_codec(_codec(shardset), device, where)


def _codec(shardset: ShardSet) -> str:
    """The set's codec: the sharder's options in ``index.json.zst``, else the first sample's json."""
    codec = str(shardset.options.get("codec") or "")
    if codec or not shardset.shards:
        return codec
    try:
        return str(read_meta(Reader().head(shardset.shards[0], 0)).get("codec") or "")
    except SampleError:
        return ""


# ------------------------------------------------------------------------------------------------ graphs


def _seed(*keys: int) -> int:
    return int(rng(*keys).integers(1 << 31))


def _vlen(vinfo: np.ndarray) -> int:
    """Frame count of a ``.vinfo`` member (little-endian int32 x4: frames, width, height, fps*1000); -1 if absent.
    Read as bytes rather than with the reader's ``dtypes``: a malformed member must fail one sample, not the
    reader."""
    return vinfo_frames(vinfo.tobytes())


class _DrawItem:
    """The reader graph's ``python_function``: (vinfo, seed) -> (frame indices (T,) int32, crop position (2,)
    float32 as DALI's normalised ``crop_pos_x``, ``crop_pos_y``), with the plan path's functions and generators.
    The consumer re-derives the same draws from the same seed (:meth:`ItemLoader.prepare_members`)."""

    def __init__(self, items: ItemLoader, seed: int):
        self.items, self.seed = items, seed
        self.margin = items.clip_tf.resize - items.clip_tf.frame_size

    def __call__(self, vinfo: np.ndarray, sample_seed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vlen = _vlen(vinfo)
        if vlen < 1:  # no usable .vinfo: the consumer rejects the sample before decoding
            return np.zeros(self.items.num_frames, np.int32), np.zeros(2, np.float32)
        draw = lambda purpose: item_rng(self.seed, 0, 0, int(sample_seed), -1, purpose)  # noqa: E731
        frames = sample_frames(self.items.sampling, vlen, self.items.num_frames, draw(FRAMES))
        crop = self.items.clip_tf.draw(draw(AUGMENT)).crop  # (top, left) or None
        position = (crop[1] / self.margin, crop[0] / self.margin) if crop is not None and self.margin else (0, 0)
        return frames.astype(np.int32), np.asarray(position, np.float32)


def _reader_pipeline(shardset: ShardSet, cfg: DataConfig, train: bool, rank: int, world: int, seed: int,
                     draw: _DrawItem, checkpoint: bytes | None):
    from nvidia.dali import fn, pipeline_def, types

    if train:
        # stick_to_shard is off so that each epoch reads the next 1/world of the (reshuffled) tar order: ranks
        # never overlap within an epoch. The tar-order seed is the same on every rank; the buffer's is not.
        order = {"random_shuffle": True, "initial_fill": cfg.stream_buffer, "shuffle_after_epoch": True,
                 "shuffle_after_epoch_seed": _seed(seed, _SEEDS, ORDER), "stick_to_shard": False}
    else:
        order = {"random_shuffle": False, "stick_to_shard": True, "pad_last_batch": True}

    @pipeline_def(batch_size=cfg.batch_size_for(train), num_threads=cfg.dali_threads, device_id=None,
                  exec_dynamic=True, enable_checkpointing=True, seed=_seed(seed, _SEEDS, rank))
    def graph():
        meta, text, vinfo, video = fn.readers.webdataset(
            paths=[s.url for s in shardset.shards], index_paths=[s.index_file for s in shardset.shards],
            ext=["json", "txt", "vinfo", ";".join(VIDEO_EXTS)], missing_component_behavior="empty",
            num_shards=world, shard_id=rank, seed=_seed(seed, _SEEDS, rank, 1), name="reader", **order)
        sample_seed = fn.random.uniform(range=[0, 1 << 30], dtype=types.INT32)
        frames, crop = fn.python_function(vinfo, sample_seed, function=draw, num_outputs=2)
        return meta, text, vinfo, video, sample_seed, frames, crop, fn.get_property(video, key="source_info")

    pipe = graph(checkpoint=checkpoint)
    pipe.build()
    return pipe


def _decode_pipeline(cfg: DataConfig, batch_size: int, device: str, device_id: int | None, size: int):
    from nvidia.dali import fn, pipeline_def, types

    # DALI has no area filter; its antialiased linear filter averages over the footprint when shrinking.
    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "area": types.INTERP_LINEAR}
    crop = size > cfg.frame_size

    @pipeline_def(batch_size=batch_size, num_threads=cfg.dali_threads, device_id=device_id, prefetch_queue_depth=1,
                  exec_dynamic=True)
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        video = fn.decoders.video(encoded, device="mixed" if device == "gpu" else "cpu", frames=frames)
        video = fn.resize(video, resize_x=size, resize_y=size, interp_type=interp[cfg.interpolation], antialias=True)
        window = {}
        if crop:
            window = {"crop": (cfg.frame_size, cfg.frame_size),
                      "crop_pos_x": fn.external_source(name="crop_x", dtype=types.FLOAT, ndim=0),
                      "crop_pos_y": fn.external_source(name="crop_y", dtype=types.FLOAT, ndim=0)}
        return fn.crop_mirror_normalize(video, mean=_MEAN, std=_STD, output_layout="CFHW", dtype=types.FLOAT,
                                        **window)

    pipe = graph()
    pipe.build()
    return pipe


def _reason(error: Exception) -> str:
    """The informative line of a DALI pipeline error (the operator's message, not the traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = [line for line in lines if "failed" in line.lower() or "error" in line.lower()]
    return (found[-1] if found else lines[-1] if lines else type(error).__name__)[:200]


# ------------------------------------------------------------------------------------------------ stream


@dataclass
class _Sample:
    """One sample as the reader graph delivered it, copied to host bytes (DALI reuses its buffers next run)."""

    key: str
    members: dict[str, bytes]  # json, txt (when present) and the media under "mp4"
    vlen: int  # .vinfo frame count, -1 without one
    seed: int  # the sample's DALI-drawn seed: every random choice of the item derives from it
    frames: np.ndarray  # (T,) int32 frame indices computed in the graph
    crop: tuple[float, float]  # crop_pos_x, crop_pos_y in [0, 1]


class _ReaderStream:
    """The reader graph's samples one at a time, at a position that survives a restart: the graph's checkpoint
    before its current batch and how many samples of that batch were handed out."""

    def __init__(self, build: Callable[[bytes | None], object]):
        self.build = build
        self.pipe = None
        self.checkpoint: bytes | None = None
        self.consumed = 0
        self.queue: deque[_Sample] = deque()

    def restart(self, checkpoint: bytes | None, consumed: int) -> None:
        self.pipe = self.build(checkpoint)
        self.checkpoint, self.consumed, self.queue = checkpoint, consumed, deque()
        if consumed:  # the batch that was being consumed, minus what was already handed out
            self.queue = deque(self._run()[consumed:])

    def next(self) -> _Sample:
        if self.pipe is None:
            self.restart(None, 0)
        if not self.queue:
            self.checkpoint, self.consumed = self.pipe.checkpoint(), 0
            self.queue = deque(self._run())
        self.consumed += 1
        return self.queue.popleft()

    def position(self) -> tuple[bytes | None, int]:
        return self.checkpoint, self.consumed

    def _run(self) -> list[_Sample]:
        try:
            meta, text, vinfo, video, seeds, frames, crop, info = self.pipe.run()
        except RuntimeError as e:
            raise AlproError(f"DALI's webdataset reader failed: {_reason(e)}") from None
        out = []
        for i in range(len(meta)):
            name = bytes(np.asarray(info[i])).decode("utf-8", "replace").rsplit(":", 1)[-1]
            members = {"mp4": np.asarray(video[i]).tobytes()}
            for ext, found in (("json", meta[i]), ("txt", text[i])):
                data = np.asarray(found).tobytes()
                if data:
                    members[ext] = data
            position = np.asarray(crop[i])
            out.append(_Sample(key=(split_name(name) or (name, ""))[0], members=members,
                               vlen=_vlen(np.asarray(vinfo[i])), seed=int(np.asarray(seeds[i])),
                               frames=np.array(frames[i], dtype=np.int32),
                               crop=(float(position[0]), float(position[1]))))
        return out


def _decoded_estimate(p: Prepared, device: str) -> int:
    """Frames DALI decodes for an item: from frame 0 to the last target on the CPU (DALI does not seek there),
    from each target's keyframe on NVDEC."""
    if device == "cpu":
        return int(p.frames.max()) + 1
    kf, total, pos = p.vmeta.keyframes, 0, -1
    for t in np.unique(p.frames):
        start = max(int(kf[np.searchsorted(kf, t, side="right") - 1]), pos + 1)
        total, pos = total + int(t) - start + 1, int(t)
    return total


# ------------------------------------------------------------------------------------------------ loader


class DaliReaderSource:
    """Training or evaluation back-end of one task on DALI's webdataset reader. Image batches of pre-training /
    the prompter come from an :class:`~alpro.data.indexed.IndexedSource` of the image shards, mixed per step
    by the loader shell as on the other paths."""

    mode = "dali_reader"
    resume_hints = {"world_size": "DALI's reader order depends on the number of ranks (resume with the same world "
                                  "size, or use data.dali_reader: plan)"}

    def __init__(self, cfg: DataConfig, task: str, split: str, tokenizer, rank: int, world_size: int, seed: int,
                 answer_vocab: dict[str, int] | None = None):
        from alpro.dist import get_local_rank

        self.cfg, self.task, self.split, self.rank, self.world, self.seed = cfg, task, split, rank, world_size, seed
        self.train = split == "train"
        if task == "qa" and not self.train:
            raise AlproError("data.dali_reader 'webdataset' cannot evaluate QA (evaluation asks every question "
                             "once; the reader yields one item per clip): use data.dali_reader: plan")
        if task == "qa" and answer_vocab is None:
            raise AlproError("QA training needs answer_vocab (build_answer_vocab on the training shards)")
        sources = task_sources(cfg, task, split)
        self.kinds = [kind for kind, *_ in sources]
        self.weights = [w for *_, w in sources]
        if self.kinds[0] != "video":
            raise AlproError(f"data.{split}.image_fraction 1.0 leaves no video for DALI's webdataset reader; "
                             "use data.dali_reader: plan")
        _, spec, index, _ = sources[0]
        self.shardset = resolve(spec, f"data.{split}.video", index, cfg.allow_index_outside)
        self.device = dali_device(cfg)
        check_reader_shards(self.shardset, f"data.{split}.video", self.device)

        self.items = ItemLoader(cfg, task, split, [ItemTable.per_sample(self.shardset)], seed, answer_vocab)
        self.builder = BatchBuilder(self.items, tokenizer, ["video"], rank)
        self.batch_size = cfg.batch_size_for(self.train)
        n = len(self.shardset)
        if self.train:
            self.video_batches = n // (self.batch_size * world_size)
            if self.video_batches == 0:
                raise AlproError(f"data.train.video: {n} clips is less than one global batch "
                                 f"({self.batch_size} x {world_size} ranks)")
        else:
            # DALI's split: rank r reads samples [n*r//world, n*(r+1)//world); pad_last_batch pads every rank to
            # the largest part, rounded up to whole batches, so all ranks run the same number of batches.
            self.local = n * (rank + 1) // world_size - n * rank // world_size
            self.video_batches = math.ceil(math.ceil(n / world_size) / self.batch_size)
        self.images: IndexedSource | None = None
        self.left_out: Counter = Counter()
        if "image" in self.kinds:
            only_images = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, image_fraction=1.0))
            self.images = IndexedSource(only_images, task, "train", tokenizer, rank, world_size, seed, answer_vocab)
            self.left_out.update(self.images.left_out)

        local_rank = get_local_rank()
        self.torch_device = torch.device("cuda", local_rank) if self.device == "gpu" else torch.device("cpu")
        self.crop = self.items.clip_tf.resize > cfg.frame_size
        self.decoder = _decode_pipeline(cfg, self.batch_size, self.device,
                                        local_rank if self.device == "gpu" else None, self.items.clip_tf.resize)
        draw = _DrawItem(self.items, seed)
        self.stream = _ReaderStream(lambda checkpoint: _reader_pipeline(self.shardset, cfg, self.train, rank,
                                                                        world_size, seed, draw, checkpoint))
        self._served = 0  # evaluation: samples of this rank's part handed out in the current pass
        self._image_step = 0  # image batches delivered so far: the image source's own step
        self._image_iter: Iterator[tuple[Batch, BatchStats]] | None = None

    # -- sizes and position

    def __len__(self) -> int:
        """Batches per pass: video batches per epoch (drop last) plus the image source's, or the evaluation
        batches of every rank."""
        return self.video_batches + (len(self.images) if self.images is not None else 0)

    def position(self) -> dict:
        """The reader graph's DALI checkpoint (base64: the trainer stores loader states as JSON), how many samples
        of its current batch were used, and the image source's position (with the header of an indexed state,
        as the image loader this mode used to nest wrote it)."""
        checkpoint, consumed = self.stream.position()
        images = None
        if self.images is not None:
            images = {"version": STATE_VERSION, "mode": self.images.mode, "task": self.task, "seed": self.seed,
                      "rank": self.rank, "world_size": self.world, "batch_size": self.images.batch_size,
                      "kinds": list(self.images.kinds), "step": self._image_step, **self.images.position()}
        return {"reader": {"checkpoint": None if checkpoint is None else base64.b64encode(checkpoint).decode(),
                           "consumed": consumed},
                "images": images}

    def restore(self, position: dict) -> None:
        checkpoint = position["reader"]["checkpoint"]
        self.stream.restart(None if checkpoint is None else base64.b64decode(checkpoint),
                            int(position["reader"]["consumed"]))
        if self.images is not None:
            self.images.restore(position["images"])
            self._image_step, self._image_iter = int(position["images"]["step"]), None

    def plan(self, step: int, stop: int | None, mix: Mix):
        raise AlproError("plan() needs the loader's global plan; with data.dali_reader 'webdataset' the order is "
                         "DALI's own")

    # -- iteration

    def batches(self, step: int, stop: int | None, mix: Mix) -> Iterator[tuple[Batch, BatchStats]]:
        if not self.train:  # every evaluation pass reads this rank's part from its start
            self._served = 0
            self.stream.restart(None, 0)
        while stop is None or step < stop:
            if self.kinds[mix(step)] == "image":
                yield self._image_batch()
            else:
                yield self._video_batch(step)
            step += 1

    def _image_batch(self) -> tuple[Batch, BatchStats]:
        """The image source's next batch: its own plan, continued endlessly (its epochs roll over inside)."""
        if self._image_iter is None:
            self._image_iter = self.images.batches(self._image_step, None, lambda _: 0)
        out = next(self._image_iter)
        self._image_step += 1
        return out

    def _video_batch(self, step: int) -> tuple[Batch, BatchStats]:
        """B items: training fills every slot with a sample that prepares and decodes (replacing bad ones by the
        stream's next samples); evaluation takes the next B samples of the rank's part, bad ones and padding
        becoming ``valid=False``."""
        stats = BatchStats()
        picked: list[tuple[_Sample, Prepared] | None] = [None] * self.batch_size
        pixels: list[torch.Tensor | None] = [None] * self.batch_size
        todo, failures = list(range(self.batch_size)), 0
        while todo:
            for i in todo:
                picked[i] = self._take(stats)
            wanted = [i for i in todo if picked[i] is not None]
            for i, clip in zip(wanted, self._decode([picked[i] for i in wanted], stats)):
                pixels[i] = clip
            todo = [i for i in wanted if pixels[i] is None] if self.train else []
            failures += len(todo)
            if failures > self.cfg.max_replacements:
                raise AlproError(f"{failures} clips of batch {step} failed to decode in DALI; the shards look broken")
        prepared = [None if pick is None or pixels[i] is None else pick[1] for i, pick in enumerate(picked)]
        return self.builder.assemble(Task(step, 0, 0, step, ()), prepared, pixels, stats), stats

    def _take(self, stats: BatchStats) -> tuple[_Sample, Prepared] | None:
        """The next usable sample: training skips samples that fail to prepare (counted); evaluation returns
        None for them and for the padding after the rank's part."""
        for _ in range(self.cfg.max_replacements + 1):
            sample = self.stream.next()
            if not self.train:
                self._served += 1
                if self._served > self.local:
                    return None
            try:
                if sample.vlen < 1:
                    raise SampleError("bad_metadata", "no .vinfo member")
                prepared = self.items.prepare_members(sample.key, sample.members, 0, 0, sample.seed, -1, sample.vlen)
            except SampleError as e:
                stats.skips[e.reason] += 1
                LOG.warning(f"skipping sample {sample.key!r}: {e}")
                if not self.train:
                    return None
                continue
            check_codec(prepared.vmeta.codec, self.device, prepared.key)
            return sample, prepared
        raise AlproError(f"{self.cfg.max_replacements + 1} samples in a row from DALI's reader could not be used; "
                         "the shards look broken")

    # -- decoding

    def _decode(self, picked: list[tuple[_Sample, Prepared]], stats: BatchStats) -> list[torch.Tensor | None]:
        """Each item's clip (T, C, S, S) normalised, augmented; None where DALI cannot decode it."""
        if not picked:
            return []
        t0 = time.perf_counter()
        try:
            clips: list[torch.Tensor | None] = list(self._run_decoder(picked))
        except RuntimeError as e:
            if len(picked) == 1:
                clips = [None]
                stats.skips["decode_error"] += 1
                LOG.warning(f"DALI cannot decode {picked[0][0].key!r}: {_reason(e)}")
            else:
                stats.skips["dali_batch_retries"] += 1
                LOG.warning(f"DALI failed on a batch ({_reason(e)}); decoding its clips one by one")
                clips = [self._decode_one(item, stats) for item in picked]
        stats.decode_seconds += time.perf_counter() - t0
        out = []
        for (sample, prepared), clip in zip(picked, clips):
            if clip is not None:
                stats.decoded_frames += _decoded_estimate(prepared, self.device)
                stats.delivered_frames += len(sample.frames)
                clip = self._augment(clip, prepared.clip.ops)
            out.append(clip)
        return out

    def _decode_one(self, item: tuple[_Sample, Prepared], stats: BatchStats) -> torch.Tensor | None:
        try:
            return self._run_decoder([item])[0]
        except RuntimeError as e:
            stats.skips["decode_error"] += 1
            LOG.warning(f"DALI cannot decode {item[0].key!r}: {_reason(e)}")
            return None

    def _run_decoder(self, picked: list[tuple[_Sample, Prepared]]) -> torch.Tensor:
        """(n, C, T, S, S) float32 normalised clips from the decode graph, on the DALI device."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        pipe = self.decoder
        pipe.feed_input("encoded", [np.frombuffer(p.data, dtype=np.uint8) for _, p in picked])
        pipe.feed_input("frames", [s.frames for s, _ in picked])
        if self.crop:
            pipe.feed_input("crop_x", [np.float32(s.crop[0]) for s, _ in picked])
            pipe.feed_input("crop_y", [np.float32(s.crop[1]) for s, _ in picked])
        (out,) = pipe.run()
        tensor = out.as_tensor()
        clips = torch.empty(tensor.shape(), dtype=torch.float32, device=self.torch_device)
        stream = torch.cuda.current_stream(self.torch_device) if self.device == "gpu" else None
        feed_ndarray(tensor, clips, cuda_stream=stream)
        return clips

    def _augment(self, clip: torch.Tensor, ops: tuple[str, ...]) -> torch.Tensor:
        """(C, T, S, S) normalised -> (T, C, S, S) with the clip's RandAugment ops applied to every frame alike."""
        frames = clip.permute(1, 0, 2, 3)  # (T, C, S, S)
        if not ops:
            return frames
        mean = torch.tensor(_MEAN, device=clip.device).view(1, 3, 1, 1)
        std = torch.tensor(_STD, device=clip.device).view(1, 3, 1, 1)
        frames = frames * std + mean  # back to [0, 255], where the ops are defined
        for name in ops:
            frames = apply_op(frames, name, self.items.clip_tf.magnitude, self.cfg.frame_size)
        return normalize(frames)

    def close(self) -> None:
        if self.images is not None:
            self.images.close()
        self.stream = self.decoder = None
