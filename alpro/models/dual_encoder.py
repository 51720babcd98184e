"""The dual encoder both models are built on: TimeSformer + the text half of BERT, the two projections, the
learnable temperature and the video-text contrastive loss (ALPRO.md §1, §2.1).

Two siblings subclass :class:`DualEncoder`:

- :class:`alpro.models.prompter.Prompter` (stage 1, the PEM teacher): text layers only, VTC only;
- :class:`alpro.models.alpro.ALPRO` (pre-training, retrieval, QA): the full BERT with its fusion layers, and
  the heads on top.

The attribute names (``video_encoder``, ``text_encoder``, ``vision_proj``, ``text_proj``, ``temp``) are the
checkpoint key names, and the build order below is the order in which seeded parameters are drawn.

Shapes: B clips, L text tokens, P = patches per frame, D = hidden width, E = ``embed_dim`` (256).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from alpro.data.batch import Batch
from alpro.dist import all_gather_with_grad, get_rank
from alpro.kernels import contrastive_loss
from alpro.models.config import ModelConfig
from alpro.models.text_encoder import TextEncoder
from alpro.models.video_encoder import VideoEncoder
from alpro.tasks import Task


class DualEncoder(nn.Module):
    """Video encoder, text encoder and, unless ``projections=False`` (QA), ``vision_proj`` / ``text_proj`` /
    ``temp`` for VTC. ``text_only`` builds just the first ``fusion_layer`` BERT layers (the prompter never fuses);
    ``mlm_head`` adds BERT's tied MLM head."""

    def __init__(self, cfg: ModelConfig, task: Task, *, text_only: bool = False, mlm_head: bool = False,
                 projections: bool = True):
        super().__init__()
        self.cfg, self.task = cfg, task
        self.use_vtc = projections and cfg.loss.vtc > 0

        self.video_encoder = VideoEncoder(cfg.vision, cfg.attention_backend)
        if cfg.original_ckpt_freeze:  # the published QA run's frozen TimeSformer weights (see the config field)
            self.video_encoder.freeze_as_original_checkpointing()
        if cfg.freeze_video_encoder:  # frozen whole: eval mode; no weight needs grad, so no graph is built
            self.video_encoder.requires_grad_(False).eval()
        self.text_encoder = TextEncoder(cfg.text, text_only=text_only, mlm_head=mlm_head)
        if projections:
            self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
            self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim)
            self.temp = nn.Parameter(torch.tensor(cfg.temp_init))
        self.backend = {"backend": cfg.contrastive_backend} if cfg.contrastive_backend else {}

    # ------------------------------------------------------------------------------------------- uniform API

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute TimeSformer blocks and BERT layers in backward."""
        self.video_encoder.grad_checkpointing = enable
        self.text_encoder.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Trainable parameters conventionally excluded from weight decay: biases, norms, the temperature and
        TimeSformer's cls/pos/time embeddings."""
        tokens = ("cls_token", "pos_embed", "time_embed")
        return {n for n, p in self.named_parameters() if p.requires_grad and (p.ndim < 2 or n.endswith(tokens))}

    def train(self, mode: bool = True):
        """A frozen video encoder (``ModelConfig.freeze_video_encoder``) stays in eval mode."""
        super().train(mode)
        if self.cfg.freeze_video_encoder:
            self.video_encoder.eval()
        return self

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, 1+P, D): [CLS; patches pooled over time]."""
        return self.video_encoder(video)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, D): the text half of BERT."""
        return self.text_encoder.forward_text(input_ids, attention_mask)

    def video_feat(self, video_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 1+P, D) -> (B, E): L2-normalised projection of the video CLS (what VTC compares)."""
        return F.normalize(self.vision_proj(video_embeds[:, 0]), dim=-1)

    def text_feat(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, E): L2-normalised projection of the text [CLS]."""
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    @torch.no_grad()
    def clamp_temp(self) -> None:
        self.temp.clamp_(self.cfg.temp_min, self.cfg.temp_max)

    # ----------------------------------------------------------------------------------------------- losses

    def vtc_loss(self, video_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE of the local rows against every rank's features; targets offset by the global rank."""
        video_all, text_all = all_gather_with_grad(video_feat), all_gather_with_grad(text_feat)
        offset = get_rank() * video_feat.shape[0]
        return contrastive_loss(video_feat, text_feat, video_all, text_all, self.temp, offset, **self.backend)


def valid_only(batch: Batch) -> Batch:
    """Drop rows whose clip could not be decoded (``batch.valid``); a no-op when every row is valid.

    With several ranks VTC's gather needs the same number of rows everywhere, so a loader that flags clips
    invalid must keep that count equal across ranks (e.g. by substituting a decodable clip).
    """
    if batch.valid is None or bool(batch.valid.all()):
        return batch
    rows = batch.valid.nonzero().squeeze(1)
    picked = rows.tolist()
    changes = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if torch.is_tensor(value) and value.shape[:1] == batch.valid.shape:
            changes[f.name] = value[rows.to(value.device)]
        elif isinstance(value, list) and len(value) == len(batch.valid):
            changes[f.name] = [value[i] for i in picked]
    return dataclasses.replace(batch, **changes)
