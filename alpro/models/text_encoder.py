"""Text and multimodal encoder: one Hugging Face BERT split at ``fusion_layer`` (ALPRO.md §1.2).

Layers ``0 .. fusion_layer-1`` encode the text (word + position + token-type embeddings first). Layers
``fusion_layer ..`` run plain self-attention over ``[text tokens; video tokens]`` -- no cross-attention and no
embedding is added to the video tokens (they carry TimeSformer's own position/time embeddings). The MLM head
is BERT's, tied to the word embeddings.

The layers are transformers' own ``BertLayer`` modules; we drive them one by one (rather than through
``BertModel.forward``) because the two halves see different inputs, and we pass the original's additive
``(1 - mask) * -10000`` attention mask explicitly so the numbers do not depend on transformers' mask helpers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from alpro.models.config import TextConfig

MASK_VALUE = -10000.0  # the original's (and LAVIS's) additive padding mask


def bert_config(cfg: TextConfig, num_layers: int | None = None) -> BertConfig:
    """The transformers ``BertConfig`` for our text config (``num_layers`` lets the prompter build only the
    text half)."""
    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=num_layers or cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        attn_implementation=cfg.attn_implementation,
    )


def additive_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, L) 1/0 key mask -> (B, 1, 1, L) additive mask in the dtype the attention scores will have."""
    device_type = like.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else like.dtype
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


class TextEncoder(nn.Module):
    """``bert`` (embeddings + layers, no pooler) and, for pre-training, ``cls`` (the tied MLM head).

    ``text_only`` builds just the first ``fusion_layer`` layers: the prompter never fuses.
    """

    def __init__(self, cfg: TextConfig, text_only: bool = False, mlm_head: bool = False):
        super().__init__()
        config = bert_config(cfg, cfg.fusion_layer if text_only else cfg.num_layers)
        self.fusion_layer = cfg.fusion_layer
        self.text_only = text_only
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config) if mlm_head else None
        if self.cls is not None:  # BertForMaskedLM's init and tying: decoder weight = word embeddings
            self.cls.apply(self.bert._init_weights)
            self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
            self.cls.predictions.decoder.bias = self.cls.predictions.bias
        self.grad_checkpointing = False

    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def _run(self, x: torch.Tensor, mask: torch.Tensor, layers: nn.ModuleList) -> torch.Tensor:
        attn_mask = additive_mask(mask, x)
        for layer in layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        return x

    def forward_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids + mask -> (B, L, D): embeddings and the text layers (token type 0 everywhere)."""
        if input_ids.shape[1] > self.bert.config.max_position_embeddings:
            raise ValueError(f"text of {input_ids.shape[1]} tokens exceeds max_position_embeddings "
                             f"{self.bert.config.max_position_embeddings}")
        x = self.bert.embeddings(input_ids=input_ids)
        return self._run(x, attention_mask, self.layers[: self.fusion_layer])

    def forward_fusion(self, text_embeds: torch.Tensor, text_mask: torch.Tensor,
                       video_embeds: torch.Tensor) -> torch.Tensor:
        """[text (B, L, D); video (B, 1+P, D)] -> (B, L+1+P, D) through the fusion layers. Token 0 is the
        multimodal [CLS] (the text's), tokens L+1.. are the video patches."""
        x = torch.cat([text_embeds, video_embeds], dim=1)
        video_mask = text_mask.new_ones(video_embeds.shape[:2])
        return self._run(x, torch.cat([text_mask, video_mask], dim=1), self.layers[self.fusion_layer:])

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) fused text tokens -> (..., vocab) MLM scores."""
        return self.cls(hidden)
