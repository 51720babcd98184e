"""ALPRO: the heads and the four pre-training losses (ALPRO.md §1.3, §2), plus the fine-tuning tasks.

:class:`ALPRO` is a :class:`~alpro.models.dual_encoder.DualEncoder` (encoders, projections, temperature, VTC)
with the full BERT (text + fusion layers) and heads; the stage-1 prompter is its sibling
(:class:`~alpro.models.prompter.Prompter`). ``task`` decides which heads exist and which losses run:

=========  ===============================================  =============================================
task       heads                                            losses (weights in ``cfg.loss``)
=========  ===============================================  =============================================
pretrain   vision_proj, text_proj, temp, vtm_head,          VTC + VTM + MLM + PEM
           MLM head, pem_head, frozen prompter
retrieval  vision_proj, text_proj, temp, vtm_head           VTC + VTM
qa         qa_head                                          cross-entropy over the answer vocabulary
=========  ===============================================  =============================================

Shapes: B clips, L text tokens, P = patches per frame, D = hidden width, E = ``embed_dim`` (256).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from alpro.data.batch import Batch
from alpro.errors import AlproError
from alpro.kernels import local_similarity
from alpro.models.checkpoint import LoadReport, load_checkpoint
from alpro.models.config import ModelConfig
from alpro.models.dual_encoder import DualEncoder, valid_only
from alpro.tasks import TASKS, Task

if TYPE_CHECKING:
    from alpro.models.prompter import Prompter


def mlp_head(width: int, scale: int, num_classes: int) -> nn.Sequential:
    """width -> scale*width -> ReLU -> classes: the PEM head and the QA classifier."""
    return nn.Sequential(nn.Linear(width, width * scale), nn.ReLU(inplace=True), nn.Linear(width * scale, num_classes))


@torch.no_grad()
def sample_hard_negatives(sim_v2t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VTM hard negatives from the local (B, B) similarity logits ``video @ text.T / temp`` (§2.2).

    Returns ``(neg_video_for_text (B,), neg_text_for_video (B,))``, each drawn from the softmax of its row
    with the diagonal removed, so an item never samples itself.
    """
    B = sim_v2t.shape[0]
    if B < 2:
        raise AlproError("VTM needs at least 2 clips per rank to sample a negative")
    eye = torch.eye(B, dtype=torch.bool, device=sim_v2t.device)
    w_t2v = sim_v2t.t().float().masked_fill(eye, float("-inf")).softmax(dim=1)  # (text, video)
    w_v2t = sim_v2t.float().masked_fill(eye, float("-inf")).softmax(dim=1)  # (video, text)
    return torch.multinomial(w_t2v, 1).squeeze(1), torch.multinomial(w_v2t, 1).squeeze(1)


class ALPRO(DualEncoder):
    def __init__(self, cfg: ModelConfig, task: Task, num_answers: int | None = None,
                 prompter: Prompter | None = None):
        tasks = tuple(t for t in TASKS if t != "prompter")
        if task not in tasks:
            hint = " (the prompter stage is alpro.models.Prompter)" if task == "prompter" else ""
            raise ValueError(f"ALPRO has no task {task!r}; choose one of {tasks}{hint}")
        w = cfg.loss
        use_mlm = task == "pretrain" and w.mlm > 0
        # encoders, then vision_proj / text_proj / temp unless QA (the base; names are checkpoint keys)
        super().__init__(cfg, task, mlm_head=use_mlm, projections=task != "qa")
        self.use_mlm = use_mlm
        self.use_vtm = task in ("pretrain", "retrieval") and w.vtm > 0
        self.use_pem = task == "pretrain" and w.pem > 0
        D = cfg.text.hidden_size

        if task in ("pretrain", "retrieval"):
            self.vtm_head = nn.Linear(D, 2)  # class 1 = "match"
        if self.use_pem:
            if prompter is None:
                raise ValueError("task 'pretrain' with PEM needs a prompter (build_model makes one)")
            self.pem_head = mlp_head(D, cfg.head_hidden_scale, cfg.num_entities)
            self.prompter = prompter.requires_grad_(False).eval()
        else:
            self.prompter = None
        if task == "qa":
            if not num_answers:
                raise ValueError("task 'qa' needs num_answers (the answer vocabulary size)")
            self.qa_head = mlp_head(D, cfg.head_hidden_scale, num_answers)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    # ------------------------------------------------- uniform API (encode_*, *_feat, clamp_temp: DualEncoder)

    def train(self, mode: bool = True) -> ALPRO:
        """The prompter is a frozen teacher: it stays in eval mode whatever the rest does."""
        super().train(mode)
        if self.prompter is not None:
            self.prompter.eval()
        return self

    def fuse(self, text_embeds: torch.Tensor, text_mask: torch.Tensor, video_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L, D), (B, L), (B, 1+P, D) -> (B, L+1+P, D) multimodal tokens; token 0 is the fused [CLS]."""
        return self.text_encoder.forward_fusion(text_embeds, text_mask, video_embeds)

    def vtm_logits(self, text_embeds: torch.Tensor, text_mask: torch.Tensor,
                   video_embeds: torch.Tensor) -> torch.Tensor:
        """Paired rows -> (B, 2) match logits (class 1 = match)."""
        return self.vtm_head(self.fuse(text_embeds, text_mask, video_embeds)[:, 0])

    def qa_logits(self, text_embeds: torch.Tensor, text_mask: torch.Tensor,
                  video_embeds: torch.Tensor) -> torch.Tensor:
        """Question and clip -> (B, num_answers) answer logits."""
        return self.qa_head(self.fuse(text_embeds, text_mask, video_embeds)[:, 0])

    def build_prompts(self, tokenizer, entities: list[str]) -> None:
        """Embed the entity prompts into the prompter's buffers (see :meth:`Prompter.build_prompts`)."""
        if self.prompter is None:
            raise AlproError(f"a {self.task!r} model has no prompter (only pre-training with PEM has one)")
        self.prompter.build_prompts(tokenizer, entities)

    def load_prompter(self, path) -> LoadReport:
        """Load the VTC-only prompter checkpoint (ours, or the original's ``prompter_pretrained.pt``) into the
        frozen prompter, leaving its prompt buffers alone (they are built from the entity list)."""
        if self.prompter is None:
            raise AlproError(f"a {self.task!r} model has no prompter (only pre-training with PEM has one)")
        report = load_checkpoint(self.prompter, path, skip=("video_prompt_feat", "image_prompt_feat"))
        self.prompter.requires_grad_(False).eval()
        return report

    # ------------------------------------------------------------------------- losses (vtc_loss: DualEncoder)

    def forward(self, batch: Batch, negatives: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        """One training forward. Returns ``loss`` (the weighted sum) and each active unweighted loss
        (``loss_vtc``, ``loss_vtm``, ``loss_mlm``, ``loss_pem``, ``loss_qa``), accuracies and diagnostics.

        ``negatives = (neg_video_for_text, neg_text_for_video)``, two (B,) index tensors into the local batch,
        replaces VTM's hard-negative sampling (reproducing a stored draw, or a custom sampler).
        Clips flagged ``batch.valid == False`` (undecodable placeholders) are dropped first.
        """
        batch = valid_only(batch)
        if self.task == "qa":
            return self._forward_qa(batch)
        self.clamp_temp()
        out: dict[str, torch.Tensor] = {"temp": self.temp.detach()}
        video_embeds = self.encode_video(batch.video)  # (B, 1+P, D)
        text_embeds = self.encode_text(batch.input_ids, batch.attention_mask)  # (B, L, D)
        video_feat, text_feat = self.video_feat(video_embeds), self.text_feat(text_embeds)  # (B, E)
        if self.use_vtc:
            out["loss_vtc"] = self.vtc_loss(video_feat, text_feat)

        # Every fusion pass of the step in one call: positives, VTM negatives, MLM (same text length L).
        B, L = batch.input_ids.shape
        mask = batch.attention_mask
        texts, masks, videos = [text_embeds], [mask], [video_embeds]
        if self.use_vtm:
            if negatives is None:
                negatives = sample_hard_negatives(local_similarity(video_feat, text_feat, self.temp))
            neg_video, neg_text = negatives
            texts += [text_embeds, text_embeds[neg_text]]
            masks += [mask, mask[neg_text]]
            videos += [video_embeds[neg_video], video_embeds]
        if self.use_mlm:
            if batch.mlm_input_ids is None or batch.mlm_labels is None:
                raise AlproError("MLM is on but the batch has no mlm_input_ids / mlm_labels")
            texts.append(self.encode_text(batch.mlm_input_ids, mask))
            masks.append(mask)
            videos.append(video_embeds)
        if self.use_vtm or self.use_mlm or self.use_pem:
            fused = self.fuse(torch.cat(texts), torch.cat(masks), torch.cat(videos)).split(B)  # k x (B, L+1+P, D)
        if self.use_vtm:
            logits = self.vtm_head(torch.cat([f[:, 0] for f in fused[:3]])).float()  # (3B, 2): B pos., 2B neg.
            labels = torch.cat([logits.new_ones(B), logits.new_zeros(2 * B)]).long()
            out["loss_vtm"] = F.cross_entropy(logits, labels)
            out["acc_vtm"] = (logits.argmax(1) == labels).float().mean()
        if self.use_mlm:
            out.update(self._mlm(fused[-1][:, :L], batch.mlm_labels))
        if self.use_pem:
            out.update(self._pem(fused[0][:, L + 1:], batch))

        weights = {"loss_vtc": self.cfg.loss.vtc, "loss_vtm": self.cfg.loss.vtm,
                   "loss_mlm": self.cfg.loss.mlm, "loss_pem": self.cfg.loss.pem}
        out["loss"] = sum((weights[k] * v for k, v in out.items() if k in weights), video_feat.new_zeros(()))
        return out

    def _mlm(self, text_tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy on the masked positions only (the head runs on those rows, not on all B*L)."""
        picked = labels != -100  # (B, L)
        logits = self.text_encoder.mlm_logits(text_tokens[picked])  # (M, vocab)
        target = labels[picked]
        if target.numel() == 0:  # nothing masked in this batch: a zero that still reaches the MLM head
            return {"loss_mlm": logits.sum() * 0.0, "acc_mlm": logits.new_zeros(())}
        return {"loss_mlm": F.cross_entropy(logits.float(), target),
                "acc_mlm": (logits.argmax(-1) == target).float().mean()}

    def _pem(self, patch_tokens: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Prompting entity modeling: fused patches inside the crop box -> MLP -> soft CE against the frozen
        prompter's entity distribution for the cropped clip (§2.4)."""
        if batch.crop_video is None or batch.pem_mask is None:
            raise AlproError("PEM is on but the batch has no crop_video / pem_mask")
        inside = batch.pem_mask.to(patch_tokens.dtype).unsqueeze(-1)  # (B, P, 1), 1 inside the box
        pooled = (patch_tokens * inside).sum(1) / inside.sum(1).clamp(min=1.0)  # (B, D)
        logits = self.pem_head(pooled).float()  # (B, entities)
        soft, keep = self.prompter.pseudo_labels(batch.crop_video, batch.type)  # (B, entities), (B,)
        ce = -(soft * logits.log_softmax(dim=1)).sum(1)  # (B,)
        kept = keep.float()
        loss = (ce * kept).sum() / kept.sum().clamp(min=1.0)
        agree = (logits.argmax(1) == soft.argmax(1)).float()
        return {"loss_pem": loss, "acc_pem": (agree * kept).sum() / kept.sum().clamp(min=1.0),
                "pem_kept": kept.mean()}

    def _forward_qa(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.answer_ids is None:
            raise AlproError("QA needs batch.answer_ids")
        video_embeds = self.encode_video(batch.video)
        text_embeds = self.encode_text(batch.input_ids, batch.attention_mask)
        logits = self.qa_logits(text_embeds, batch.attention_mask, video_embeds).float()  # (B, answers)
        target = batch.answer_ids
        known = (target != -100).float()  # answers outside the vocabulary carry no loss
        loss = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum") / known.sum().clamp(min=1.0)
        acc = ((logits.argmax(1) == target).float() * known).sum() / known.sum().clamp(min=1.0)
        return {"loss": loss, "loss_qa": loss, "acc_qa": acc}

