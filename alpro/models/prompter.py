"""The PEM prompter: a dual encoder trained with VTC only, plus entity-prompt embeddings (ALPRO.md §2.4).

Stage 1 trains it (``build_model(cfg, task="prompter")``). During ALPRO pre-training a frozen copy scores a
random crop of each clip against every entity's prompt embedding; the softmax over entities is the soft
pseudo-label the PEM head learns to predict. It is :class:`ALPRO`'s sibling: both subclass
:class:`~alpro.models.dual_encoder.DualEncoder`, and the prompter adds no head.

Shapes: B clips, L text tokens, P = patches per frame, D = hidden width, E = ``embed_dim`` (256).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alpro.data.batch import Batch
from alpro.errors import AlproError
from alpro.models.config import ModelConfig
from alpro.models.dual_encoder import DualEncoder, valid_only
from alpro.tasks import IMAGE_TEMPLATES, VIDEO_TEMPLATES

__all__ = ["Prompter", "VIDEO_TEMPLATES", "IMAGE_TEMPLATES"]

class Prompter(DualEncoder):
    """The dual encoder with the text half of BERT only and VTC as its loss, holding ``video_prompt_feat`` /
    ``image_prompt_feat`` (entities, E): each entity's prompt embeddings averaged over the 12 templates."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, task="prompter", text_only=True)
        self.register_buffer("video_prompt_feat", torch.zeros(cfg.num_entities, cfg.embed_dim))
        self.register_buffer("image_prompt_feat", torch.zeros(cfg.num_entities, cfg.embed_dim))
        self._prompts_checked = False
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Stage-1 training forward: ``loss`` (``cfg.loss.vtc`` x ``loss_vtc``), ``loss_vtc`` and ``temp``.
        Clips flagged ``batch.valid == False`` (undecodable placeholders) are dropped first."""
        batch = valid_only(batch)
        self.clamp_temp()
        out: dict[str, torch.Tensor] = {"temp": self.temp.detach()}
        video_embeds = self.encode_video(batch.video)  # (B, 1+P, D)
        text_embeds = self.encode_text(batch.input_ids, batch.attention_mask)  # (B, L, D)
        video_feat, text_feat = self.video_feat(video_embeds), self.text_feat(text_embeds)  # (B, E)
        loss = video_feat.new_zeros(())
        if self.use_vtc:
            out["loss_vtc"] = self.vtc_loss(video_feat, text_feat)
            loss = loss + self.cfg.loss.vtc * out["loss_vtc"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def build_prompts(self, tokenizer, entities: list[str], batch_size: int = 1024) -> None:
        """Fill both prompt buffers from ``entities`` (exactly ``cfg.num_entities`` names).

        ``tokenizer`` is a Hugging Face tokenizer (called as ``tokenizer(texts, padding="max_length", ...)``).
        Prompts are padded to ``prompt_max_length`` (15), encoded by the text layers, projected and
        L2-normalised, then averaged over templates -- not re-normalised unless ``prompt_renormalize``.
        """
        if len(entities) != self.cfg.num_entities:
            raise AlproError(f"got {len(entities)} entities but the model has num_entities={self.cfg.num_entities}")
        was_training = self.training
        self.eval()
        device = self.temp.device
        for buffer, templates in ((self.video_prompt_feat, VIDEO_TEMPLATES), (self.image_prompt_feat, IMAGE_TEMPLATES)):
            prompts = [t.format(e) for t in templates for e in entities]  # template-major, as the original
            enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=self.cfg.prompt_max_length,
                            return_tensors="pt")
            feats = torch.cat([
                self.text_feat(self.encode_text(ids.to(device), mask.to(device)))
                for ids, mask in zip(enc["input_ids"].split(batch_size), enc["attention_mask"].split(batch_size))
            ])  # (templates * entities, E)
            feats = feats.view(len(templates), len(entities), -1).mean(dim=0)  # (entities, E)
            if self.cfg.prompt_renormalize:
                feats = F.normalize(feats, dim=-1)
            buffer.copy_(feats)
        self._prompts_checked = True
        self.train(was_training)

    @torch.no_grad()
    def pseudo_labels(self, crop_video: torch.Tensor, media: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, T, H, W) cropped clips -> (soft labels (B, entities), keep (B,) bool).

        ``q = softmax(video_feat @ prompt_feat.T / temp)`` with the prompter's own temperature and the video or
        image prompt set by ``media``; ``keep`` applies ``cfg.loss.pem_discard``.
        """
        if not self._prompts_checked:
            if not (bool(self.video_prompt_feat.any()) and bool(self.image_prompt_feat.any())):
                raise AlproError("the prompter's entity prompts are not built: call model.build_prompts(tokenizer, "
                                 "entities) after loading the prompter")
            self._prompts_checked = True
        prompts = self.video_prompt_feat if media == "video" else self.image_prompt_feat
        # fp32 similarities: under bf16 training the features are bf16 while the prompt buffers stay fp32
        sim = self.video_feat(self.encode_video(crop_video)).float() @ prompts.float().t() / self.temp.float()
        soft = sim.softmax(dim=1)
        rule, threshold = self.cfg.loss.pem_discard, self.cfg.loss.pem_threshold
        if rule == "max_prob":  # the paper: the most likely entity is below the threshold
            keep = soft.max(dim=1).values >= threshold
        elif rule == "argmax_index":  # the released code: argmax *index* < 0.2, i.e. only index 0 is dropped
            keep = ~(sim.max(dim=1).indices < threshold)
        else:
            keep = torch.ones_like(soft[:, 0], dtype=torch.bool)
        return soft, keep
