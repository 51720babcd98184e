"""Model configuration: one dataclass per part, and the named presets (``alpro-base``, ``tiny``, ``debug``).

``alpro-base`` is the paper's model (TimeSformer-B/16 + BERT-base split at layer 6, ~232M trainable parameters
in pre-training). ``tiny`` trains on two CPU cores in minutes; ``debug`` is for unit tests. Every value is a
plain field so a YAML ``model:`` section (or ``--model.vision.depth 4``) can override it through
:func:`alpro.config.from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PemDiscard = Literal["max_prob", "argmax_index", "none"]


@dataclass
class VisionConfig:
    """TimeSformer with divided space-time attention (ALPRO.md §1.1)."""

    image_size: int = 224
    """Frame side in pixels; 224 / 16 = 14x14 = 196 patches."""
    patch_size: int = 16
    num_frames: int = 4
    """Length of the learned ``time_embed`` (4 in pre-training, 8 retrieval, 16 QA). Other frame counts still
    work: the embedding is nearest-interpolated at run time and when a checkpoint is loaded."""
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    """Stochastic depth, linearly spaced 0 -> rate over the blocks; drawn per (b, h, w) in the temporal branch,
    per (b, t) in the spatial branch and per clip in the MLP, as TimeSformer's DropPath does."""
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"vision.width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.num_frames < 1 or self.depth < 1:
            raise ValueError("vision.num_frames and vision.depth must be >= 1")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"vision.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclass
class TextConfig:
    """BERT split at ``fusion_layer``: layers below encode text, layers from it on fuse [text; video] (§1.2)."""

    vocab_size: int = 30522
    """Set from the tokenizer by ``build_model(vocab_size=...)``."""
    hidden_size: int = 768
    num_layers: int = 12
    fusion_layer: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """transformers attention kernel for the BERT layers; both take the original's additive -10000 mask."""

    def __post_init__(self) -> None:
        if not 0 < self.fusion_layer < self.num_layers:
            raise ValueError(f"text.fusion_layer must be in [1, {self.num_layers - 1}], got {self.fusion_layer}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"text.hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")


@dataclass
class LossConfig:
    """Loss weights (Eq. 6 of the paper: all 1). A weight of 0 switches that loss off entirely."""

    vtc: float = 1.0
    vtm: float = 1.0
    mlm: float = 1.0
    pem: float = 1.0
    pem_discard: PemDiscard = "max_prob"
    """Which PEM pseudo-labels to drop. ``max_prob`` = the paper's rule (the most likely entity has probability
    < ``pem_threshold``); ``argmax_index`` = what the released code computes (``max(sim, 1)[1] < 0.2``, i.e. only
    samples whose top entity is index 0), kept to reproduce its numbers; ``none`` keeps every label."""
    pem_threshold: float = 0.2

    def __post_init__(self) -> None:
        if min(self.vtc, self.vtm, self.mlm, self.pem) < 0:
            raise ValueError("loss weights must be >= 0")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    embed_dim: int = 256
    """VTC projection size (hard-coded 256 in the original)."""
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    """The learnable VTC temperature is clamped in place to [temp_min, temp_max] at the start of every forward."""
    num_entities: int = 1000
    """PEM classes: the first ``num_entities`` lines of the entity list (the original's unigrams.txt)."""
    head_hidden_scale: int = 2
    """PEM and QA MLPs are hidden -> scale*hidden -> ReLU -> classes (the original's ``cls_hidden_scale``)."""
    prompt_max_length: int = 15
    prompt_renormalize: bool = False
    """Re-normalise each entity's template-averaged prompt embedding (CLIP does; the original does not)."""
    attention_backend: str | None = None
    """Divided-attention kernel (``alpro.kernels``): None = the process-wide default."""
    contrastive_backend: str | None = None
    """VTC loss kernel: None = the process-wide default."""
    grad_checkpointing: bool = False
    """Recompute every TimeSformer block and BERT layer in backward (torch.utils.checkpoint, non-reentrant)."""
    original_ckpt_freeze: bool = False
    """Reproduce the published QA fine-tuning, where the original's gradient checkpointing (the ``_gc`` TimeSformer
    config of msrvtt_qa / msvd_qa) calls ``CheckpointFunction.apply(module, 1, x)`` with no parameters, so every
    block's ``attn``, ``temporal_attn`` and ``mlp`` weights get no gradient and never change. True freezes exactly
    those (``requires_grad=False``: they leave the optimizer, weight decay included, as AdamW skips a parameter
    whose grad is None); gradients still flow through them to everything else, as in the original. Independent of
    ``grad_checkpointing``: ours computes full gradients either way. Default False: every weight trains (the fix)."""

    freeze_video_encoder: bool = False
    """Train with the whole video encoder frozen: no weight of it changes, it runs in eval mode (no stochastic
    depth) and, as none of its weights requires grad, autograd keeps no graph through it (no backward). The published QA fine-tuning already left every
    TimeSformer block's attn / temporal_attn / mlp untrained (``original_ckpt_freeze``); this goes the rest of the
    way, so a step costs the video forward only (~0.4x a full step for the tiny preset). The demo's QA stage
    uses it: from the demo's pre-trained weights, 400 full fine-tuning steps answered 38 % of the test questions
    (training accuracy flat at ~38 % from step ~100), 1200 frozen steps 47 % (docs/corpus.md, issue 14).
    Default False: every weight trains."""

    def __post_init__(self) -> None:
        if not 0 < self.temp_min <= self.temp_init <= self.temp_max:
            raise ValueError(f"need 0 < temp_min <= temp_init <= temp_max, got {self.temp_min}, "
                             f"{self.temp_init}, {self.temp_max}")
        if self.embed_dim < 1 or self.num_entities < 1 or self.head_hidden_scale < 1:
            raise ValueError("embed_dim, num_entities and head_hidden_scale must be >= 1")

    @staticmethod
    def preset(name: str) -> ModelConfig:
        """A fresh copy of a named preset (see :data:`PRESETS`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]()


def _alpro_base() -> ModelConfig:
    return ModelConfig()


def _tiny() -> ModelConfig:
    """CPU demo size: 64 px frames, 4x4 patches, 4 + 6 layers of width 128 (2.5M parameters + 128 per
    vocabulary entry)."""
    return ModelConfig(
        vision=VisionConfig(image_size=64, patch_size=16, width=128, depth=4, num_heads=4),
        text=TextConfig(hidden_size=128, num_layers=6, fusion_layer=3, num_heads=4, intermediate_size=512,
                        max_position_embeddings=128),
        embed_dim=64,
        num_entities=100,
    )


def _debug() -> ModelConfig:
    """Unit-test size: 32 px frames, 2x2 patches, 2 + 4 layers of width 64; a train step takes milliseconds."""
    return ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=16, width=64, depth=2, num_heads=2),
        text=TextConfig(vocab_size=1000, hidden_size=64, num_layers=4, fusion_layer=2, num_heads=2,
                        intermediate_size=128, max_position_embeddings=64),
        embed_dim=32,
        num_entities=16,
    )


PRESETS = {"alpro-base": _alpro_base, "tiny": _tiny, "debug": _debug}
