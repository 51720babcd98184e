"""From item ids to a :class:`Batch`: read, plan, decode, transform, tokenize, replace bad samples.

Building an item has two phases so that both decoders share everything but the pixels:

- :meth:`ItemLoader.prepare` reads the sample's bytes, parses its metadata and text, and draws every random
  choice (frame indices, crop, RandAugment ops, PEM box, caption) from the item's own generators;
- :meth:`ItemLoader.render` decodes the chosen frames with PyAV and applies the transform. The DALI path
  replaces only this phase (:mod:`alpro.data.dali`).

A sample that fails either phase raises :class:`SampleError`; :meth:`BatchBuilder.build` then takes the next
replacement of the task, in order, and counts the reason.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from alpro.data.batch import Batch, batch_tensor
from alpro.data.config import DataConfig
from alpro.data.decode import VideoMeta, decode_picture, decode_video, meta_from_json, probe
from alpro.data.meta import meta_problem
from alpro.data.pem import crop_video, draw_box, patch_mask
from alpro.data.plan import AUGMENT, FRAMES, MLM, PEM, TEXT, ItemTable, Task, item_rng, rng
from alpro.data.sampling import sample_frames
from alpro.data.shards import IMAGE_EXTS, VIDEO_EXTS, Reader, SampleError
from alpro.data.text import encode, mask_tokens
from alpro.data.transforms import ClipParams, ClipTransform, ImageParams, ImageTransform
from alpro.errors import AlproError

# ------------------------------------------------------------------------------------------------ metadata


def read_meta(members: dict[str, bytes]) -> dict:
    if "json" not in members:
        return {}
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SampleError("bad_metadata", f"json: {e}") from None
    problem = meta_problem(meta)
    if problem is not None:
        raise SampleError("bad_metadata", problem)
    return meta


def captions_of(meta: dict, members: dict[str, bytes]) -> list[str]:
    """Captions from the metadata (``captions`` list or video2dataset's ``caption``), else the txt lines."""
    found = meta.get("captions")
    if isinstance(found, str):
        found = [found]
    if not found and isinstance(meta.get("caption"), str):
        found = [meta["caption"]]
    if not found and "txt" in members:
        found = members["txt"].decode("utf-8", "replace").splitlines()
    return [c.strip() for c in (found or []) if isinstance(c, str) and c.strip()]


def qa_of(meta: dict) -> list[dict]:
    """Question-answer pairs: ``extra.qa`` (list of {question, answer, answer_type}) or one pair in ``extra``."""
    extra = meta.get("extra") or {}
    pairs = extra.get("qa") if isinstance(extra, dict) else None
    if pairs is None and isinstance(extra, dict) and "question" in extra:
        pairs = [extra]
    return [p for p in (pairs or []) if isinstance(p, dict) and str(p.get("question", "")).strip()]


def media_member(members: dict[str, bytes]) -> tuple[str, str, bytes]:
    """("video" | "image", ext, bytes) of the sample's media member."""
    for ext in VIDEO_EXTS:
        if ext in members:
            return "video", ext, members[ext]
    for ext in IMAGE_EXTS:
        if ext in members:
            return "image", ext, members[ext]
    raise SampleError("missing_media", f"no media member among {sorted(members)}")


def count_subitems(task: str, members: dict[str, bytes]) -> int:
    """How many items a sample yields when each caption (retrieval) or question (QA) is its own item."""
    meta = read_meta(members)
    return len(qa_of(meta)) if task == "qa" else len(captions_of(meta, members))


# -------------------------------------------------------------------------------------------------- items


@dataclass
class Prepared:
    """An item with every decision made and its bytes in memory, ready for either decoder."""

    key: str
    media: str  # "video" | "image"
    data: bytes
    text: str
    all_texts: list[str]
    clip: ClipParams | None = None
    image: ImageParams | None = None
    frames: np.ndarray | None = None  # (T,) frame indices (video)
    vmeta: VideoMeta | None = None
    box: tuple[int, int, int, int] | None = None  # PEM (top, left, h, w)
    answer: str | None = None
    answer_type: str | None = None

    def describe(self) -> dict:
        """Everything that decides the item's pixels and text, as plain data (for plan() / resume tests)."""
        return {"key": self.key, "media": self.media, "text": self.text,
                "frames": None if self.frames is None else self.frames.tolist(),
                "clip": self.clip, "image": self.image, "box": self.box}


@dataclass
class Rendered:
    pixels: torch.Tensor  # (T, C, S, S) float32 normalised; (T, S, S, C) uint8 [0, 255] when ``ops`` is not None
    decoded: int  # frames the decoder produced
    delivered: int  # frames returned
    ops: tuple[str, ...] | None = None  # a deferred clip: RandAugment ops + normalisation still to apply


class ItemLoader:
    """Prepares and renders items of the loader's sources for one task and split."""

    def __init__(self, cfg: DataConfig, task: str, split: str, tables: list[ItemTable], seed: int,
                 answer_vocab: dict[str, int] | None = None):
        self.cfg, self.task, self.split, self.tables, self.seed = cfg, task, split, tables, seed
        self.train = split == "train"
        self.num_frames = cfg.frames_for(self.train)
        self.sampling = cfg.sampling_for(task, split)
        self.clip_tf = ClipTransform(cfg, task, self.train)
        self.image_tf = ImageTransform(cfg, self.train)
        self.pem = self.train and task == "pretrain" and cfg.pem.enabled
        self.answer_vocab = answer_vocab
        self._reader: Reader | None = None
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}  # open files stay with the process that opened them

    @property
    def reader(self) -> Reader:
        """One reader per process: open files (and fsspec handles) belong to the process that opened them."""
        if self._reader is None or self._pid != os.getpid():
            self._reader, self._pid = Reader(limits=self.cfg.limits), os.getpid()
        return self._reader

    def prepare(self, source: int, epoch: int, item: int) -> Prepared:
        """Read item ``item`` of a source from its shard and prepare it."""
        table = self.tables[source]
        sample, sub = int(table.sample[item]), int(table.sub[item])
        shard, j = table.shardset.locate(sample)
        key, members = self.reader.sample(shard, j)
        return self.prepare_members(key, members, source, epoch, sample, sub, int(shard.num_frames[j]))

    def prepare_members(self, key: str, members: dict[str, bytes], source: int, epoch: int, sample: int, sub: int,
                        indexed_frames: int = -1) -> Prepared:
        """Prepare a sample already in memory; ``indexed_frames`` is the index's frame count (-1 unknown)."""
        meta = read_meta(members)
        media, _, data = media_member(members)
        if len(data) == 0:
            raise SampleError("missing_media", "empty media member")
        draw = lambda purpose: item_rng(self.seed, source, epoch, sample, sub, purpose)  # noqa: E731
        out = Prepared(key=key, media=media, data=data, text="", all_texts=[])
        self._text(out, meta, members, sub, draw(TEXT))
        if media == "video":
            vmeta = meta_from_json(meta)
            if vmeta is None:  # foreign sample: probe its packets (no decoding)
                vmeta = probe(data)
            elif indexed_frames >= 0 and indexed_frames != vmeta.num_frames:
                raise SampleError("bad_metadata", f"index says {indexed_frames} frames, json {vmeta.num_frames}")
            out.vmeta = vmeta
            out.frames = sample_frames(self.sampling, vmeta.num_frames, self.num_frames, draw(FRAMES))
            out.clip = self.clip_tf.draw(draw(AUGMENT))
        else:
            height, width = int(meta.get("height") or 0), int(meta.get("width") or 0)
            if not (height and width):
                height, width = decode_picture(data, self.cfg.limits.image_pixels).shape[-2:]
            out.image = self.image_tf.draw(draw(AUGMENT), height, width)
        if self.pem:
            out.box = draw_box(draw(PEM), self.cfg.frame_size, self.cfg.frame_size, self.cfg.pem)
        return out

    def _text(self, out: Prepared, meta: dict, members: dict[str, bytes], sub: int, g: np.random.Generator) -> None:
        if self.task == "qa":
            pairs = qa_of(meta)
            if not pairs or sub >= len(pairs):
                raise SampleError("missing_text", "no question for this item")
            pair = pairs[sub if sub >= 0 else (int(g.integers(len(pairs))) if self.train else 0)]
            out.text = str(pair["question"]).strip()
            out.all_texts = [out.text]
            out.answer = str(pair.get("answer", "")).strip()
            out.answer_type = str(pair.get("answer_type", pair.get("type", "")))
            return
        captions = captions_of(meta, members)
        if not captions or sub >= len(captions):
            raise SampleError("missing_text", "no caption")
        if self.task == "retrieval" and self.cfg.paragraph:
            captions = [" ".join(captions)]
            sub = -1
        out.all_texts = captions
        if sub >= 0:
            out.text = captions[sub]
        elif self.train and len(captions) > 1:
            out.text = captions[int(g.integers(len(captions)))]
        else:
            out.text = captions[0]

    def render(self, p: Prepared, defer: bool = False) -> Rendered:
        """Decode and transform an item; ``defer``: a video clip comes back cropped, uint8, channels last, with its
        ops left to apply (``data.augment_on: device``)."""
        if p.media == "video":
            size = self.clip_tf.resize
            raw, decoded = decode_video(p.data, p.frames, p.vmeta, size, self.cfg.interpolation,
                                        self.cfg.decoder_threads, channels_last=defer)
            if defer:
                return Rendered(self.clip_tf.crop_hwc(raw, p.clip), decoded, len(p.frames), ops=p.clip.ops)
            return Rendered(self.clip_tf.apply(raw, p.clip), decoded, len(p.frames))
        pixels = self.image_tf.apply(decode_picture(p.data, self.cfg.limits.image_pixels), p.image)  # (1, C, S, S)
        return Rendered(pixels.expand(self.num_frames, -1, -1, -1), 1, 1)


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class BatchStats:
    """What one batch cost; summed by the loader into ``metrics()``."""

    items: int = 0
    decoded_frames: int = 0
    delivered_frames: int = 0
    decode_seconds: float = 0.0
    skips: Counter = field(default_factory=Counter)


class BatchBuilder:
    """Builds the Batch of a Task: items with replacement, text encoding, MLM, PEM boxes and mask."""

    def __init__(self, items: ItemLoader, tokenizer, kinds: list[str], rank: int):
        self.items, self.tokenizer, self.kinds, self.rank = items, tokenizer, kinds, rank
        cfg = items.cfg
        self.max_len, self.mlm_probability = cfg.max_text_len, cfg.mlm_probability
        self.mlm = items.train and items.task == "pretrain"
        self.defer = cfg.augments_on_device()  # video batches leave unfinished: the loader's consumer finishes them

    def prepare_task(self, task: Task, stats: BatchStats) -> tuple[list[Prepared | None], list[int]]:
        """Prepared items of a task (None = padding or an evaluation clip that failed) and the fallbacks left."""
        fallbacks = list(task.fallbacks)
        out: list[Prepared | None] = []
        for item in task.items:
            out.append(None if item < 0 else self.with_replacement(task, item, fallbacks, stats, render=False))
        return out, fallbacks

    def with_replacement(self, task: Task, item: int, fallbacks: list[int], stats: BatchStats, render: bool,
                         defer: bool = True):
        """Prepare (and render) ``item``; on failure count the reason and try the task's next fallback.

        Training batches stay full: the replacement is the next item of the plan, so it is the same in every
        run. Evaluation never substitutes a clip (that would count one clip twice): the slot becomes padding
        (None, ``valid`` False) and the skip is counted."""
        candidate = item
        while True:
            try:
                prepared = self.items.prepare(task.source, task.epoch, candidate)
                if not render:
                    return prepared
                return prepared, self.render_timed(prepared, stats, defer and self.defer)
            except SampleError as e:
                stats.skips[e.reason] += 1
                if not self.items.train:
                    return None
                if not fallbacks:
                    raise AlproError(f"{self.items.cfg.max_replacements} samples in a row failed near item "
                                     f"{item} of {self.kinds[task.source]} epoch {task.epoch} (last: {e}); "
                                     "the shards look broken") from None
                candidate = fallbacks.pop(0)

    def render_timed(self, prepared: Prepared, stats: BatchStats, defer: bool = False) -> Rendered:
        t0 = time.perf_counter()
        rendered = self.items.render(prepared, defer)
        stats.decode_seconds += time.perf_counter() - t0
        stats.decoded_frames += rendered.decoded
        stats.delivered_frames += rendered.delivered
        return rendered

    def build(self, task: Task) -> tuple[Batch, BatchStats]:
        """The PyAV path: prepare and render every item (replacing bad ones), then assemble."""
        stats = BatchStats()
        fallbacks = list(task.fallbacks)
        prepared, rendered = [], []
        for item in task.items:
            if item < 0:
                prepared.append(None)
                rendered.append(None)
                continue
            p, r = self.with_replacement(task, item, fallbacks, stats, render=True) or (None, None)
            prepared.append(p)
            rendered.append(r)
        return self.assemble_rendered(task, prepared, rendered, stats), stats

    def assemble_rendered(self, task: Task, prepared: list[Prepared | None], rendered: list[Rendered | None],
                          stats: BatchStats) -> Batch:
        """Assemble rendered items: unfinished when every item is a deferred clip, else every clip finished here
        (a video source that also holds pictures)."""
        live = [r for r in rendered if r is not None]
        if live and all(r.ops is not None for r in live):
            return self.assemble(task, prepared, [None if r is None else r.pixels for r in rendered], stats,
                                 ops=[None if r is None else r.ops for r in rendered])
        pixels = [None if r is None else r.pixels if r.ops is None else
                  self.items.clip_tf.finish(r.pixels.permute(0, 3, 1, 2).contiguous(), r.ops) for r in rendered]
        return self.assemble(task, prepared, pixels, stats)

    def assemble(self, task: Task, prepared: list[Prepared | None], pixels: list[torch.Tensor | None],
                 stats: BatchStats, ops: list[tuple[str, ...] | None] | None = None) -> Batch:
        """Stack pixels to (B, C, T, H, W), encode texts, add MLM / PEM / QA / eval fields. With ``ops`` the
        pixels are cropped (T, H, W, C) uint8 clips and the batch leaves unfinished, (B, T, H, W, C) uint8 with
        ``Batch.video_ops``."""
        cfg = self.items.cfg
        t, s = self.items.num_frames, cfg.frame_size
        ref = next((p for p in pixels if p is not None), None)
        device = ref.device if ref is not None else torch.device("cpu")
        if ops is None:
            video = batch_tensor((len(pixels), 3, t, s, s), device)  # (B, C, T, H, W), one copy of each clip
        else:
            video = batch_tensor((len(pixels), t, s, s, 3), device, torch.uint8)  # (B, T, H, W, C), as decoded
        for i, p in enumerate(pixels):
            if p is None:
                video[i].zero_()
            else:
                video[i].copy_(p if ops is not None else p.transpose(0, 1))  # (T, C, H, W) -> (C, T, H, W)
        texts = [p.text if p is not None else "" for p in prepared]
        input_ids, attention_mask = encode(self.tokenizer, texts, self.max_len)
        stats.items += sum(p is not None for p in prepared)
        batch = Batch(type=self.kinds[task.source], keys=[p.key if p is not None else "" for p in prepared],
                      video=video, input_ids=input_ids, attention_mask=attention_mask, texts=texts, video_ops=ops)
        if self.mlm:
            seed = int(rng(self.items.seed, task.source, MLM, task.epoch, task.batch, self.rank).integers(1 << 62))
            generator = torch.Generator().manual_seed(seed)
            batch.mlm_input_ids, batch.mlm_labels = mask_tokens(input_ids, self.tokenizer, self.mlm_probability,
                                                                generator)
        if self.items.pem:
            batch.pem_box = torch.tensor([p.box for p in prepared], dtype=torch.int64)
            batch.pem_mask = patch_mask(batch.pem_box, s, s, cfg.pem.patch_size)
            if ops is None:  # in the worker: the consumer only receives it (else built after the consumer's finish)
                batch.crop_video = crop_video(video, batch.pem_box)
        if self.items.task == "qa":
            vocab = self.items.answer_vocab or {}
            batch.answers = [p.answer if p is not None else "" for p in prepared]
            batch.answer_types = [p.answer_type if p is not None else "" for p in prepared]
            batch.answer_ids = torch.tensor([vocab.get(a, -100) for a in batch.answers], dtype=torch.int64)
        if not self.items.train:
            batch.all_texts = [p.all_texts if p is not None else [] for p in prepared]
            batch.valid = torch.tensor([p is not None for p in prepared], dtype=torch.bool)
        return batch
