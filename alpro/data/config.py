"""``DataConfig``: everything the loader needs, embedded in the run config under ``data:``.

Defaults reproduce ALPRO pre-training (4 frames, resize 256 -> random crop 224, headtail sampling, 30 text
tokens, MLM 15%, 50/50 video/image batches, RandAugment(2, 5) on video and (2, 7) on images). Fine-tuning
configs change ``num_frames``, ``max_text_len`` and ``batch_size``; the task picks the transforms (see
``docs/loader.md``). Debug presets shrink ``frame_size`` (e.g. 32 or 64) and ``pem.patch_size`` with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alpro.tasks import TASKS  # noqa: F401 -- re-exported: alpro.data.TASKS

Sampling = Literal["rand", "headtail", "uniform", "uniform_legacy", "segment", "middle"]
SAMPLINGS: tuple[str, ...] = ("rand", "headtail", "uniform", "uniform_legacy", "segment", "middle")

# The original's op lists (ALPRO.md §3.2): TemporalConsistentRandomAugment for video, RandomAugment for images.
VIDEO_RANDAUG_OPS = ["Identity", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
                     "TranslateY", "Rotate", "HorizontalFlip"]
IMAGE_RANDAUG_OPS = ["Identity", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"]
RANDAUG_OPS = ("Identity", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
               "Rotate", "HorizontalFlip")


@dataclass
class SplitConfig:
    """The shards of one split. A shard set is a directory holding ``index.json.zst``, that index file, a
    ``.tar`` path, a glob (``dir/*.tar``), a brace range (``shard-{000000..000099}.tar``), a list of those,
    a ``pipe:`` command or an fsspec URL (``s3://...``, needs the fsspec backend installed)."""

    video: str | list[str] | None = None
    """Video shards (pre-training clips, retrieval clips, QA clips)."""
    image: str | list[str] | None = None
    """Image shards mixed into pre-training / prompter batches (CC-3M in the paper). Unused by other tasks."""
    image_fraction: float = 0.5
    """Probability that a training step draws an image batch when both ``video`` and ``image`` are set. The
    original's MetaLoader picks uniformly between its two loaders: 0.5."""
    video_index: str | None = None
    """``index.json.zst`` of ``video`` when it cannot be found next to the shards (``pipe:`` commands)."""
    image_index: str | None = None
    """``index.json.zst`` of ``image`` when it cannot be found next to the shards."""
    sampling: Sampling | None = None
    """Frame sampling for this split; None = the task's default: ``headtail`` for pre-training and the
    prompter, ``rand`` for fine-tuning (the original's config default), ``uniform`` for evaluation."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.image_fraction <= 1.0:
            raise ValueError(f"image_fraction must be in [0, 1], got {self.image_fraction}")


@dataclass
class RandAugmentConfig:
    """RandAugment as the original (``src/datasets/randaugment.py``): ops sampled per clip, magnitude fixed.

    At magnitude 5 the enhance ops (Contrast, Brightness, Sharpness) get factor 0.5 * 1.8 + 0.1 = 1.0 and are
    therefore no-ops, exactly as in the original: they are kept in the list because they still take one of the
    N op slots."""

    video: bool = True
    """Temporally consistent RandAugment on training video for pre-training, the prompter and QA."""
    retrieval: bool = False
    """Also apply it in retrieval fine-tuning. The original constructs it there but never applies it
    (ALPRO.md §5.1); the paper says RandAug(2,5) is used for all fine-tuning."""
    num_ops: int = 2
    """N: distinct ops per clip (sampled without replacement), the same ops on every frame."""
    magnitude: int = 5
    """M on the original's 0..10 scale: shear 0.03*M, translate M px at 224 (scaled with frame_size), rotate 3*M
    degrees, enhance factor 0.18*M + 0.1."""
    ops: list[str] = field(default_factory=lambda: list(VIDEO_RANDAUG_OPS))
    image: bool = True
    """RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip + RandomAugment on training images."""
    image_num_ops: int = 2
    """N for images: ops sampled with replacement, each applied with probability ``image_op_prob``."""
    image_magnitude: int = 7
    image_op_prob: float = 0.5
    image_ops: list[str] = field(default_factory=lambda: list(IMAGE_RANDAUG_OPS))
    image_min_scale: float = 0.2
    """Smallest RandomResizedCrop area fraction for images."""

    def __post_init__(self) -> None:
        for name in (*self.ops, *self.image_ops):
            if name not in RANDAUG_OPS:
                raise ValueError(f"unknown RandAugment op {name!r} (known: {', '.join(RANDAUG_OPS)})")
        if not 0 <= self.num_ops <= len(self.ops):
            raise ValueError(f"num_ops must be in [0, {len(self.ops)}] (ops are drawn without replacement)")
        if self.image_num_ops < 0 or not 0 <= self.magnitude <= 10 or not 0 <= self.image_magnitude <= 10:
            raise ValueError("image_num_ops must be >= 0 and magnitudes in [0, 10]")
        if not 0.0 <= self.image_op_prob <= 1.0 or not 0.0 < self.image_min_scale <= 1.0:
            raise ValueError("image_op_prob must be in [0, 1] and image_min_scale in (0, 1]")


@dataclass
class PemConfig:
    """The PEM random crop (ALPRO.md §2.4): one box per clip, the same in every frame, on the patch grid."""

    enabled: bool = True
    """Fill ``crop_video`` / ``pem_mask`` / ``pem_box`` in pre-training batches."""
    patch_size: int = 16
    """Patch grid the box snaps to (the video encoder's patch size; debug presets use 8 or 16)."""
    min_area: float = 0.3
    max_area: float = 0.5
    min_aspect: float = 0.3
    max_aspect: float = 1 / 0.3

    def __post_init__(self) -> None:
        if self.patch_size < 1 or not 0 < self.min_area <= self.max_area <= 1:
            raise ValueError("pem.patch_size must be >= 1 and 0 < min_area <= max_area <= 1")
        if not 0 < self.min_aspect <= self.max_aspect:
            raise ValueError("pem: 0 < min_aspect <= max_aspect required")


@dataclass
class LimitsConfig:
    """Caps on what a shard may make the loader allocate, checked from tar headers / image headers before the
    bytes are read or decoded (``docs/loader.md``, Bad data). A sample over a cap is skipped and counted
    (``skipped/too_large``, ``skipped/too_many_pixels``), like any other bad sample."""

    video_bytes: int = 512 << 20
    """Largest video member (mp4, webm, mkv, ...): 512 MiB, room for a 10-minute 1080p source clip kept with
    ``--copy``; the sharder's transcoded clips are a few hundred KB."""
    image_bytes: int = 64 << 20
    """Largest image member (jpg, png, webp, ...): 64 MiB, far above any photo a training set holds."""
    other_bytes: int = 16 << 20
    """Largest member of any other kind (json, txt, vinfo, ...): 16 MiB; the sharder's are a few KB (a long
    clip's keyframe list is the largest part: 3,000 keyframes are ~20 KB)."""
    image_pixels: int = 7680 * 4320
    """Largest image (width x height, read from the image header before decoding): 33.2 Mpx (8K UHD), the
    sharder's own source cap (``alpro shard --max-pixels``), so every image it accepts is accepted here and a
    foreign one costs at most ~0.3 GB while decoded (Pillow's image, the RGB array, its copy). A training image
    ends up as a 224 px crop."""

    def __post_init__(self) -> None:
        if min(self.video_bytes, self.image_bytes, self.other_bytes, self.image_pixels) < 1:
            raise ValueError("limits.* must be >= 1")

    @property
    def sample_bytes(self) -> int:
        """Largest sample byte range read in one piece: one media member and a few small ones."""
        return max(self.video_bytes, self.image_bytes) + 4 * self.other_bytes


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    test: SplitConfig = field(default_factory=SplitConfig)

    num_frames: int = 4
    """Frames per training clip (ALPRO: 4 pre-training, 8 retrieval, 16 QA)."""
    eval_num_frames: int | None = None
    """Frames per evaluation clip; None = ``num_frames``."""
    frame_size: int = 224
    """Model input side in pixels (square)."""
    resize: int | None = None
    """Pre-training / prompter: side of the square resize before the random ``frame_size`` crop (the original
    resizes to 256 ignoring aspect, then crops 224). None = round(frame_size * 256 / 224). Fine-tuning and
    evaluation of retrieval / QA resize straight to ``frame_size`` as the original."""
    interpolation: Literal["bilinear", "bicubic", "area"] = "bicubic"
    """Filter of the decode-time resize (PyAV's swscale, DALI's resize). The original resized inside decord,
    whose FFmpeg scale filter defaults to bicubic."""

    max_text_len: int = 30
    """Tokens per text incl. [CLS]/[SEP], padded to this length (pre-training 30, MSRVTT 40, DiDeMo 50)."""
    mlm_probability: float = 0.15
    paragraph: bool = False
    """Retrieval: join all captions of a clip into one text (DiDeMo paragraph-to-video)."""
    retrieval_items: Literal["per_caption", "per_video"] = "per_caption"
    """Retrieval training: one item per (clip, caption) pair as the original, or one per clip with a random
    caption each epoch."""

    batch_size: int = 16
    """Per-rank training batch size."""
    eval_batch_size: int | None = None
    """Per-rank evaluation batch size; None = ``batch_size``."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0 = decode in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool = False
    """Page-locked batches (faster host-to-GPU copies; only useful with CUDA)."""

    decoder: Literal["auto", "pyav", "dali"] = "auto"
    """Video decoder: ``auto`` = DALI on the GPU when CUDA and DALI are present, else PyAV in workers."""
    dali_device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where DALI decodes: ``gpu`` = NVDEC (``device='mixed'``), ``cpu`` = libavcodec (VP9 / MJPEG only),
    ``auto`` = gpu when CUDA is available."""
    dali_threads: int = 4
    """DALI CPU threads (parsing, demuxing, CPU decoding)."""
    dali_reader: Literal["plan", "webdataset"] = "plan"
    """How DALI gets its clips when it decodes: ``plan`` = the loader's global plan feeds ``external_source``
    (one order, one resume state, one replacement rule for both decoders); ``webdataset`` = DALI's
    ``fn.readers.webdataset`` reads the shards and the whole video path runs in DALI
    (:mod:`alpro.data.dali_reader`): DALI's own order, resumable with the same world size only. Ignored when
    PyAV decodes."""
    decoder_threads: int = 1
    """FFmpeg threads per PyAV decode. 1 is best inside several workers; raise it with few workers and
    large frames."""
    augment_on: Literal["auto", "loader", "device"] = "auto"
    """Where a video clip's RandAugment ops and normalisation run on the PyAV path. ``loader``: in the loader
    (its DataLoader workers), which send float32 batches. ``device``: the workers decode, crop and send uint8
    frames with each clip's drawn ops, and the loader finishes the batch on the training device (the GPU with
    CUDA, else the training process's CPU): a quarter of the bytes through shared memory and to the GPU, and
    CPU cores that only decode. The random draws are the same either way and the result is bit-identical on
    the CPU. ``auto``: ``device`` when CUDA is available, else ``loader``. DALI batches are finished by the
    consumer on DALI's device either way; pictures are always finished in the loader."""

    shuffle_block: int = 8192
    """Training order: shards are shuffled, concatenated, then samples are shuffled inside blocks of this
    many samples (MosaicML-style locality). 0 = one permutation of the whole set."""
    resampled: bool = False
    """Endless iteration: one ``for batch in loader`` never ends (epochs roll over inside it). Streaming
    (``pipe:``) sources need it unless their sample counts are known."""
    max_replacements: int = 16
    """A bad sample is replaced by the next sample of the plan; this many failures in a row is an error."""
    stream_buffer: int = 256
    """Streaming sources (``pipe:``): per-worker shuffle buffer in samples. Also the shuffle buffer
    (``initial_fill``) of DALI's webdataset reader with ``dali_reader: webdataset``."""

    pipe_retries: int = 2
    """``pipe:`` sources: a command that exits with a non-zero status is run again this many times (after 1 s,
    2 s, ...; samples it already delivered are not repeated), then the loader stops with one line naming the
    command, its exit status and the last line of its stderr."""
    allow_index_outside: bool = False
    """Read shards that an ``index.json.zst`` lists outside its own directory (``../x.tar``, absolute paths,
    another bucket or prefix for URLs). Off: such an index is refused with one line naming the entry, so an
    index from someone else cannot make the loader read arbitrary files."""

    limits: LimitsConfig = field(default_factory=LimitsConfig)
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    pem: PemConfig = field(default_factory=PemConfig)

    def __post_init__(self) -> None:
        if self.num_frames < 1 or (self.eval_num_frames is not None and self.eval_num_frames < 1):
            raise ValueError("num_frames and eval_num_frames must be >= 1")
        if self.frame_size < 8:
            raise ValueError(f"frame_size must be >= 8, got {self.frame_size}")
        if self.resize is not None and self.resize < self.frame_size:
            raise ValueError(f"resize ({self.resize}) must be >= frame_size ({self.frame_size})")
        if self.max_text_len < 3:
            raise ValueError(f"max_text_len must be >= 3 ([CLS] x [SEP]), got {self.max_text_len}")
        if not 0.0 <= self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in [0, 1), got {self.mlm_probability}")
        if self.batch_size < 1 or (self.eval_batch_size is not None and self.eval_batch_size < 1):
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if self.num_workers < 0 or self.prefetch_factor < 1 or self.dali_threads < 1 or self.decoder_threads < 0:
            raise ValueError("num_workers must be >= 0, prefetch_factor and dali_threads >= 1, decoder_threads >= 0")
        if self.shuffle_block < 0 or self.max_replacements < 1 or self.stream_buffer < 1 or self.pipe_retries < 0:
            raise ValueError("shuffle_block and pipe_retries must be >= 0, max_replacements and stream_buffer >= 1")
        if self.frame_size % self.pem.patch_size:
            raise ValueError(f"frame_size ({self.frame_size}) must be a multiple of pem.patch_size "
                             f"({self.pem.patch_size}): PEM boxes live on the patch grid")

    # Derived values, one place for the task-dependent defaults.

    def split(self, name: str) -> SplitConfig:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r} (train, val, test)")
        return getattr(self, name)

    def resize_for(self, task: str) -> int:
        """Side of the square decode-time resize: pre-training crops from a larger square, fine-tuning does not."""
        if task in ("pretrain", "prompter"):
            return self.resize or round(self.frame_size * 256 / 224)
        return self.frame_size

    def augments_on_device(self) -> bool:
        """``augment_on`` resolved: True when the loader's consumer finishes video batches (see the field)."""
        if self.augment_on == "auto":
            import torch  # only here: the config module stays importable without torch

            return torch.cuda.is_available()
        return self.augment_on == "device"

    def frames_for(self, train: bool) -> int:
        return self.num_frames if train else (self.eval_num_frames or self.num_frames)

    def sampling_for(self, task: str, split: str) -> str:
        chosen = self.split(split).sampling
        if chosen is not None:
            return chosen
        if split != "train":
            return "uniform"
        return "headtail" if task in ("pretrain", "prompter") else "rand"

    def batch_size_for(self, train: bool) -> int:
        return self.batch_size if train else (self.eval_batch_size or self.batch_size)
