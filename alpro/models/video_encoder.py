"""TimeSformer video encoder with divided space-time attention, as ALPRO uses it (ALPRO.md §1.1, KERNELS.md §1).

Token layout inside the blocks: one clip is ``[CLS, (n, t) for n in 0..N-1 for t in 0..T-1]`` -- space-major,
time innermost -- so patch n of frame t sits at row ``1 + n*T + t``. The attention maths lives in
:mod:`alpro.kernels` (``temporal_attention`` / ``spatial_attention`` read the packed ``qkv`` Linear output in
this row order), so the blocks here never permute or copy tokens into per-frame / per-location groups.

The encoder returns ``[CLS; patches mean-pooled over time]`` of shape (B, 1 + N, C) for any frame count:
the paper's "temporal fusion layer", and what the multimodal encoder sees.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from alpro.kernels import spatial_attention, temporal_attention
from alpro.models.config import VisionConfig


def drop_path_mask(shape: tuple[int, ...], p: float, ref: torch.Tensor) -> torch.Tensor:
    """Scaled Bernoulli keep-mask of ``shape`` for stochastic depth (timm's ``drop_path`` maths).

    TimeSformer draws the mask over dim 0 of whatever tensor it drops, i.e. per (b, h, w) location in the
    temporal branch, per (b, t) frame in the spatial branch and per clip in the MLP; callers pass that shape.
    """
    keep = 1.0 - p
    return ref.new_empty(shape).bernoulli_(keep).div_(keep)


def resize_time_embed(time_embed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(1, T0, C) -> (1, T, C) by nearest interpolation: 4 -> 8 frames gives [e0, e0, e1, e1, ...]."""
    if time_embed.shape[1] == num_frames:
        return time_embed
    resized = F.interpolate(time_embed.transpose(1, 2), size=num_frames, mode="nearest")  # (1, C, T)
    return resized.transpose(1, 2)


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + P*P, C) -> (1, 1 + h*w, C): nearest interpolation of the square patch grid, CLS slot kept.

    This is what the original's ``forward_features`` does at run time. (Its checkpoint loaders instead
    interpolate the *flattened* sequence, which mixes grid rows; we resize on the grid in both places.)
    """
    if pos_embed.shape[1] == 1 + grid[0] * grid[1]:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=list(grid), num_prefix_tokens=1, interpolation="nearest",
                                  antialias=False)


class AttentionProjections(nn.Module):
    """The Linear layers around one attention op: ``qkv`` (C -> 3C) before it and ``proj`` (C -> C) after it.

    Named like TimeSformer's ``Attention`` so checkpoints map one to one; the softmax attention in between is
    an :mod:`alpro.kernels` call made by the block.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class DividedSpaceTimeBlock(nn.Module):
    """Temporal attention over patch tokens -> spatial attention per frame (CLS shared) -> MLP; pre-norm."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, eps: float,
                 attention_backend: str | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.drop_path = drop_path
        self.backend = {"backend": attention_backend} if attention_backend else {}
        self.temporal_norm1 = nn.LayerNorm(dim, eps=eps)
        self.temporal_attn = AttentionProjections(dim)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = AttentionProjections(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        B, L, C = x.shape  # L = 1 + N*T
        T = num_frames
        N = (L - 1) // T
        drop = self.training and self.drop_path > 0
        cls, patches = x[:, :1], x[:, 1:]  # (B, 1, C), (B, N*T, C)

        # 1. Temporal: each location attends over its T frames; CLS excluded; zero-initialised temporal_fc.
        qkv = self.temporal_attn.qkv(self.temporal_norm1(patches))  # (B, N*T, 3C)
        res = self.temporal_attn.proj(temporal_attention(qkv, T, self.num_heads, **self.backend))  # (B, N*T, C)
        if drop:  # one draw per (b, n) location
            res = (res.view(B, N, T, C) * drop_path_mask((B, N, 1, 1), self.drop_path, res)).view(B, N * T, C)
        xt = patches + self.temporal_fc(res)

        # 2. Spatial: per frame, [CLS; that frame's N patches]; the T CLS outputs are averaged.
        xs = torch.cat([cls, xt], dim=1)  # (B, 1 + N*T, C)
        cls_out, patch_out = spatial_attention(self.attn.qkv(self.norm1(xs)), T, self.num_heads, **self.backend)
        cls_res = self.attn.proj(cls_out)  # (B, T, C)
        patch_res = self.attn.proj(patch_out)  # (B, N*T, C)
        if drop:  # one draw per (b, t) frame, shared by that frame's CLS copy and its patches
            mask = drop_path_mask((B, 1, T, 1), self.drop_path, cls_res)
            cls_res = cls_res * mask.view(B, T, 1)
            patch_res = (patch_res.view(B, N, T, C) * mask).view(B, N * T, C)
        x = xs + torch.cat([cls_res.mean(dim=1, keepdim=True), patch_res], dim=1)

        # 3. MLP, one draw per clip.
        res = self.mlp(self.norm2(x))
        if drop:
            res = res * drop_path_mask((B, 1, 1), self.drop_path, res)
        return x + res


class VideoEncoder(nn.Module):
    """TimeSformer: (B, C, T, H, W) normalised frames -> (B, 1 + N, C) = [CLS; time-pooled patch tokens]."""

    def __init__(self, cfg: VisionConfig, attention_backend: str | None = None):
        super().__init__()
        C = cfg.width
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, 3, C, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, C))
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.num_frames, C))  # zero: not in the ViT weights
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # 0 -> rate, linear
        self.blocks = nn.ModuleList(
            DividedSpaceTimeBlock(C, cfg.num_heads, cfg.mlp_ratio, rate, cfg.layer_norm_eps, attention_backend)
            for rate in rates
        )
        self.norm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """TimeSformer's init: truncated normal 0.02, LayerNorm 1/0, and every ``temporal_fc`` zeroed.

        (The original's loop zeroes "every block but the first", but it counts the ModuleList itself as the
        first match, so in effect all blocks start with the temporal path as the identity.)
        """
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.zeros_(blk.temporal_fc.weight)
            nn.init.zeros_(blk.temporal_fc.bias)

    def freeze_as_original_checkpointing(self) -> list[str]:
        """Stop training the weights the original's gradient checkpointing left without gradient: every block's
        ``attn``, ``temporal_attn`` and ``mlp`` (``ModelConfig.original_ckpt_freeze``). Returns their names."""
        frozen = []
        for i, blk in enumerate(self.blocks):
            for part in ("attn", "temporal_attn", "mlp"):
                for name, p in getattr(blk, part).named_parameters():
                    p.requires_grad_(False)
                    frozen.append(f"blocks.{i}.{part}.{name}")
        return frozen

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, 1 + N*T, C): patch, spatial and temporal embeddings, in block row order."""
        B, _, T, H, W = video.shape
        video = video.to(self.pos_embed.dtype)  # a bf16/fp16 engine casts the weights, not the batch
        p = self.patch_embed.patch_size[0]
        grid = (H // p, W // p)
        frames = video.transpose(1, 2).reshape(B * T, video.shape[1], H, W)  # (B*T, 3, H, W)
        pos = resize_pos_embed(self.pos_embed, grid)  # (1, 1 + N, C)
        x = self.patch_embed(frames) + pos[:, 1:]  # (B*T, N, C)
        N, C = x.shape[1:]
        x = x.view(B, T, N, C).transpose(1, 2) + resize_time_embed(self.time_embed, T).unsqueeze(1)  # (B, N, T, C)
        cls = (self.cls_token + pos[:, :1]).expand(B, -1, -1)  # (B, 1, C)
        return torch.cat([cls, x.reshape(B, N * T, C)], dim=1)

    def forward_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, 1 + N*T, C): every token after the final LayerNorm, before time pooling."""
        T = video.shape[2]
        x = self.embed(video)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, T, use_reentrant=False)
            else:
                x = blk(x, T)
        return self.norm(x)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, 1 + N, C): CLS and the patch tokens averaged over the T frames."""
        T = video.shape[2]
        x = self.forward_tokens(video)
        B, L, C = x.shape
        patches = x[:, 1:].view(B, (L - 1) // T, T, C).mean(dim=2)  # (B, N, C)
        return torch.cat([x[:, :1], patches], dim=1)
