"""The run config: one typed section per component, loaded from ``launch/configs/STAGE.yaml`` + overrides.

    alpro train --config launch/configs/pretrain_debug.yaml --optim.lr 5e-5 --train.steps 100

A stage file may name a base with ``base: other.yaml`` (merged first, paths relative to the file). The
``model:`` section starts from ``model.preset`` (``alpro-base``, ``tiny``, ``debug``) and overrides fields.
Everything is validated at start: an unknown key, a wrong type or a missing data path is one clear error.
The resolved config is written to ``RUN/config.yaml`` and into every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from alpro.config import ConfigError, apply_overrides, from_dict, load_yaml, merge, to_dict
from alpro.data import DataConfig
from alpro.models import ModelConfig
from alpro.tasks import Task

Stage = Task  # a stage trains the model for its task (alpro.tasks)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate (pre-training 1e-4, MSRVTT-ret 2.5e-5, DiDeMo 4e-5, QA 5e-5)."""
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    """The original's HF-style AdamW used eps 1e-6."""
    weight_decay: float = 1e-3
    """The paper's 1e-3. The original code never passed it to its optimizer (effectively 0.0): set 0.0 to
    reproduce the released code exactly."""
    decay_all_params: bool = False
    """True = one group with weight decay on every parameter, as the original's single group; False = exclude
    ``model.no_weight_decay()`` (biases, norms, embeddings, temperature)."""
    warmup_ratio: float = 0.05
    """Linear warm-up over this fraction of the steps, then linear decay to 0 (the original's warmup_linear):
    step k of T runs at lr*k/W while k < W = int(warmup_ratio*T), then lr*(T-k)/(T-W), floor 1e-8 (the last)."""
    initial_zero_grad_steps: int = 2
    """AdamW steps on zero gradients before the first batch, as the original (Horovod's optimizer-state
    broadcast and its pre-loop ``optimizer.step()``): no data, no weight change except their weight decay, but
    Adam's step count starts at 2. 0 = a textbook start."""
    grad_clip: float = 20.0
    """Global gradient-norm clip (0 = off). Pre-training 20, MSRVTT 5."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if self.initial_zero_grad_steps < 0:
            raise ValueError(f"initial_zero_grad_steps must be >= 0, got {self.initial_zero_grad_steps}")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed's own knobs: the settings DeepSpeed acts on and the trainer does not (bucket sizes, overlap, the
    fp16 loss scaler). :func:`alpro.train.runtime.build_ds_config` generates the DeepSpeed JSON from these and the
    fields the trainer owns (``train.zero_stage``, ``train.precision``, ``train.grad_accum``, ``optim.grad_clip``,
    ``data.batch_size``). The defaults are what the former ``launch/ds_configs/zero{0,1,2,3}.json`` held; the
    ZeRO keys go into the JSON only for the stages that read them (stage-3 keys for ZeRO-3,
    ``allgather_bucket_size`` and ``reduce_scatter`` for ZeRO-1/2), as those files did."""

    overlap_comm: bool = False
    """ZeRO 1-3: overlap gradient reduction with the backward pass (more memory for buckets)."""
    contiguous_gradients: bool = True
    """ZeRO 1-3: copy gradients into one contiguous buffer as they are produced (less fragmentation)."""
    reduce_scatter: bool = True
    """ZeRO 1-2: average gradients with reduce-scatter rather than all-reduce."""
    reduce_bucket_size: int = 200_000_000
    """ZeRO 1-3: elements reduced at a time."""
    allgather_bucket_size: int = 200_000_000
    """ZeRO 1-2: elements all-gathered at a time."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """ZeRO-3: elements of parameters fetched ahead of use."""
    stage3_param_persistence_threshold: int = 100_000
    """ZeRO-3: parameters below this many elements stay unpartitioned."""
    stage3_gather_16bit_weights_on_model_save: bool = True
    """ZeRO-3: gather the full 16-bit weights when the engine saves the model."""
    loss_scale: float = 0.0
    """fp16 only: static loss scale; 0 = dynamic loss scaling."""
    initial_scale_power: int = 16
    """fp16 dynamic scaling: the first scale is 2**initial_scale_power."""
    loss_scale_window: int = 1000
    """fp16 dynamic scaling: steps without overflow before the scale grows."""
    hysteresis: int = 2
    """fp16 dynamic scaling: overflows tolerated before the scale shrinks."""
    min_loss_scale: float = 1.0
    """fp16 dynamic scaling: the scale never goes below this."""
    wall_clock_breakdown: bool = False
    """DeepSpeed's per-phase timers in its own log (forward, backward, step)."""

    def __post_init__(self) -> None:
        sizes = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size", "loss_scale_window")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stage3_param_persistence_threshold < 0 or self.hysteresis < 1 or self.loss_scale < 0:
            raise ValueError("stage3_param_persistence_threshold and loss_scale must be >= 0, hysteresis >= 1")
        if self.min_loss_scale <= 0:
            raise ValueError(f"min_loss_scale must be > 0, got {self.min_loss_scale}")


@dataclass
class TrainConfig:
    run_dir: Path = Path("runs/default")
    """Run directory: config.yaml, train.log, metrics.jsonl, tb/, plots/, checkpoints/, final/."""
    resume: str | None = None
    """None = fresh run (refuses an existing run directory); 'auto' = newest checkpoint of run_dir if any;
    or a checkpoint / run directory path."""
    epochs: float = 10.0
    """Length in epochs of the (first) training source; ignored when ``steps`` is set."""
    steps: int | None = None
    """Number of optimizer steps; overrides ``epochs``."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (DeepSpeed's ``gradient_accumulation_steps``)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """DeepSpeed's ``bf16`` / ``fp16`` sections (fp32 master weights in both)."""
    tf32: bool = False
    """With fp32: run fp32 matmuls and convolutions (cuBLAS, cuDNN, the Triton kernels) on TF32 tensor cores.
    Off reproduces the original's IEEE fp32 maths; GPU recipes train in bf16 (DeepSpeed bf16, fp32 master weights)."""
    zero_stage: int = 2
    """ZeRO stage 0-3 (DeepSpeed's ``zero_optimization.stage``). At 0 the trainer clips the gradients itself."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed's own settings; the DeepSpeed JSON is generated from them and the fields above."""
    ds_config: Path | None = None
    """Optional user DeepSpeed JSON (e.g. ``launch/ds_configs/example.json``): every key it sets wins over the
    generated one, except the keys the trainer acts on itself (batch sizes, accumulation, clipping, ZeRO stage,
    bf16/fp16 ``enabled``), which must agree with the run config; ``optimizer`` / ``scheduler`` are refused."""
    grad_checkpointing: bool = False
    log_interval: int = 10
    save_interval: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 3
    eval_interval: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    eval_at_start: bool = False
    """Evaluate before the first step (the original's zero-shot validation at step 0)."""
    elastic: Literal["auto", "universal", "never"] = "auto"
    """Resuming a ZeRO-1/2/3 checkpoint on another world size (or ZeRO stage): ``auto`` converts it once to
    DeepSpeed's universal checkpoint (``checkpoints/universal/step-N``) and loads that; ``universal`` always
    does (also on the same world size); ``never`` refuses another world size (docs/training.md)."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """Non-finite loss or gradients: stop (naming the step and the loss) or skip the step."""
    max_skipped_steps: int = 20
    tensorboard: bool = True
    log_all_ranks: bool = False
    threads: int | None = None
    """torch.set_num_threads per rank (torchrun sets OMP_NUM_THREADS=1)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs <= 0 or self.grad_accum < 1 or self.log_interval < 1:
            raise ValueError("epochs must be > 0, grad_accum and log_interval >= 1")


@dataclass
class InitConfig:
    """Where weights come from. Weights-only initialisation is separate from resuming a run."""

    weights: Path | None = None
    """A checkpoint to initialise the model from (ours, original ALPRO or LAVIS; weights only)."""
    prompter: Path | None = None
    """Pre-training: the VTC-only prompter checkpoint (frozen)."""
    vit: Path | None = None
    """A local timm ViT-B/16 checkpoint file for the video encoder (ImageNet-21k in the paper)."""
    bert: Path | None = None
    """A local Hugging Face BERT directory (bert-base-uncased in the paper)."""
    tokenizer: Path | None = None
    """A local tokenizer directory; None = the one saved with ``weights``/``prompter`` or, failing that, a
    WordPiece vocabulary trained on the corpus texts and saved with the run."""
    entities: Path | None = None
    """PEM entity list (``word count`` per line, the original's unigrams.txt); first num_entities used."""


@dataclass
class EvalConfig:
    protocol: Literal["original", "lavis", "both"] = "lavis"
    """Retrieval scoring: 'original' scores every pair with VTM; 'lavis' re-ranks the VTC top-k by
    VTM logit + cosine."""
    original_rounding: bool = False
    """With protocol 'original': rank as the released code does, on VTM probabilities rounded to 4 decimals with
    ties in torch.sort order (a tied candidate counts against the ground truth when that sort puts it first).
    Off: unrounded probabilities, ties optimistic (docs/model.md, Evaluation)."""
    k_test: int = 128
    batch_size: int = 64
    """Fusion passes per forward during scoring. (DiDeMo's paragraph-to-video queries: ``data.paragraph``.)"""


@dataclass
class QAConfig:
    top_k: int = 1500
    """Answer vocabulary = the ``top_k`` most frequent answers of the training split (the original uses
    max(len(train answers), 1500) classes; MSRVTT-QA 1500, MSVD-QA 2423). Other answers are ignored in the loss
    and count as wrong in evaluation."""
    vocab: Path | None = None
    """A JSON ``{answer: index}`` file (the original's ``train_ans2label.json``) instead of counting."""


@dataclass
class RunConfig:
    stage: Stage = "pretrain"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    qa: QAConfig = field(default_factory=QAConfig)

    def __post_init__(self) -> None:
        vision = self.model.vision
        if self.data.frame_size != vision.image_size:
            raise ValueError(f"data.frame_size ({self.data.frame_size}) must equal model.vision.image_size "
                             f"({vision.image_size})")
        if self.data.pem.patch_size != vision.patch_size:
            raise ValueError(f"data.pem.patch_size ({self.data.pem.patch_size}) must equal model.vision.patch_size "
                             f"({vision.patch_size}): PEM boxes are snapped to the encoder's patch grid")


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:'")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict[str, Any] = {}
    for b in bases:
        merged = merge(merged, _load_with_bases((path.parent / b), seen + (path,)))
    return merge(merged, data)


def _resolve_model(section: dict[str, Any]) -> dict[str, Any]:
    """``model: {preset: tiny, vision: {...}}`` -> the preset's fields with the overrides merged in."""
    section = dict(section or {})
    preset = section.pop("preset", None)
    if preset is None:
        return section
    try:
        base = ModelConfig.preset(preset)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"model.preset: {e}") from None
    return merge(to_dict(base), section)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = _load_with_bases(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    if "model" in data or path is None:
        data["model"] = _resolve_model(data.get("model", {}))
    return from_dict(RunConfig, data)


def check_inputs(cfg: RunConfig) -> None:
    """Fail before any process group starts if a shard set or an init file named by the config is missing.

    Shard specs are resolved as the loader will (directory, index, glob, brace range); ``pipe:`` commands and
    remote URLs are checked when the loader opens them."""
    from alpro.data.shards import resolve

    for split in ("train", "val", "test"):
        sc = cfg.data.split(split)
        for kind, spec, index in (("video", sc.video, sc.video_index), ("image", sc.image, sc.image_index)):
            specs = [] if spec is None else [spec] if isinstance(spec, str) else list(spec)
            local = [s for s in specs if not s.startswith("pipe:") and "://" not in s]
            if local and len(local) == len(specs):
                resolve(spec, f"data.{split}.{kind}", index, cfg.data.allow_index_outside)
    for name in ("weights", "prompter", "vit", "bert", "tokenizer", "entities"):
        path = getattr(cfg.init, name)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"init.{name}: {path} does not exist")
    if cfg.qa.vocab is not None and not Path(cfg.qa.vocab).is_file():
        raise ConfigError(f"qa.vocab: {cfg.qa.vocab} does not exist")
    check_writable(Path(cfg.train.run_dir))


def check_writable(run_dir: Path) -> None:
    """The run directory (or, before it exists, its nearest existing parent) must take a file: a read-only or
    full disk is one line before any model is built. A real probe file, not ``os.access``: root passes every
    permission check but not a read-only mount."""
    import errno
    import tempfile

    probe_dir = run_dir
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(f"train.run_dir: {probe_dir} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".alpro-write-probe-") as f:
            f.write(b"x")
            f.flush()
    except OSError as e:
        what = "no space left on device" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
        raise ConfigError(f"train.run_dir: cannot write in {probe_dir} ({what})") from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
