"""Reconstruction decoders for masked image modelling, and the patch <-> image layout they share.

Both are deliberately light: in SimMIM and MAE the decoder is thrown away after
pretraining, and a weak decoder pushes the representation work into the encoder.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models import named_apply
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from earthray.models.backbones import token_grid


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), tokens in row-major grid order, pixels as (p, p, C)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of ``patchify``: (B, N, p*p*C) -> (B, C, h*p, w*p)."""
    b = patches.shape[0]
    p = patch_size
    h, w = grid
    x = patches.reshape(b, h, w, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * p, w * p)


class SimMIMDecoder(nn.Module):
    """SimMIM's one-layer head: 1x1 conv to ``out_chans * stride**2`` then PixelShuffle.

    Takes a channels-last feature map (B, h, w, in_dim), as ``SwinEncoder`` emits it, and
    returns an image (B, out_chans, h*stride, w*stride).
    """

    def __init__(self, in_dim: int, out_chans: int, stride: int):
        super().__init__()
        self.out_chans = out_chans
        self.stride = stride
        self.proj = nn.Conv2d(in_dim, out_chans * stride**2, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(feats.permute(0, 3, 1, 2)))


class MAEDecoder(nn.Module):
    """MAE's decoder: re-insert mask tokens, add positions, a few ViT blocks, per-patch pixels.

    ``forward(latent (B, K, D), restore_idx (B, N))`` -> (B, N, patch_size**2 * out_chans),
    in ``patchify`` layout, for every token (the loss picks the masked ones).
    """

    def __init__(
        self,
        embed_dim: int,
        decoder_dim: int,
        depth: int,
        num_heads: int,
        num_tokens: int,
        patch_size: int,
        out_chans: int,
        grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        grid = token_grid(num_tokens, grid)
        self.num_tokens = num_tokens
        self.patch_size = patch_size
        self.out_chans = out_chans
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "pos_embed", build_sincos2d_pos_embed(list(grid), decoder_dim).unsqueeze(0), persistent=False
        )
        self.blocks = nn.ModuleList([Block(decoder_dim, num_heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, patch_size**2 * out_chans)
        named_apply(init_weights_vit_timm, self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, restore_idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)
        b, k, d = x.shape
        n = restore_idx.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - k, d)], dim=1)
        x = x.gather(1, restore_idx.unsqueeze(-1).expand(-1, -1, d)) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))
