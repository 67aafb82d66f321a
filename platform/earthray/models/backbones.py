"""Shared encoders built from timm's own stages and blocks, without timm's patch embedding.

The patch embedding is per sensor (``patch_embed.py``), so the encoders here start from
tokens. Both accept masks the way their pretraining method needs them: SimMIM keeps the
full grid and swaps masked tokens for a learned token (Swin's windows need the grid),
MAE drops the masked tokens before the blocks (a ViT does not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import build_sincos2d_pos_embed, calculate_drop_path_rates, trunc_normal_
from timm.models import named_apply
from timm.models.swin_transformer import SwinTransformerStage
from timm.models.swin_transformer_v2 import SwinTransformerV2Stage
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))



def token_grid(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (h, w) token grid: ``grid`` checked against ``num_tokens``, or the square one."""
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens is not a square grid; pass grid=(h, w)")
        grid = (side, side)
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"grid {grid} does not hold {num_tokens} tokens")
    return tuple(grid)

class SwinEncoder(nn.Module):
    """Hierarchical Swin (v1 or v2) over a token grid, with a SimMIM mask token.

    Built for one input size: timm precomputes each stage's shifted-window attention
    masks for its resolution, and stages clamp their window to the grid when the grid is
    smaller (which is what lets tiny presets run on 32-64 px chips). ``forward`` returns
    every stage's output channels-last, the last one layer-normed as in timm's Swin.
    """

    def __init__(
        self,
        img_size: int | Sequence[int],
        patch_size: int,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int | Sequence[int],
        v2: bool = False,
        drop_path_rate: float = 0.0,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        img = _pair(img_size)
        if img[0] % patch_size or img[1] % patch_size:
            raise ValueError(f"img_size {img} is not divisible by patch_size {patch_size}")
        self.img_size = img
        self.patch_size = patch_size
        self.grid = (img[0] // patch_size, img[1] // patch_size)
        self.v2 = v2
        n = len(depths)
        windows = [window_size] * n if isinstance(window_size, int) else list(window_size)
        self.out_dims = [embed_dim * 2**i for i in range(n)]
        self.out_strides = [patch_size * 2**i for i in range(n)]

        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim))
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stage_cls = SwinTransformerV2Stage if v2 else SwinTransformerStage
        stages = []
        res = self.grid
        for i in range(n):
            stage = stage_cls(
                dim=self.out_dims[max(i - 1, 0)],
                out_dim=self.out_dims[i],
                input_resolution=res,
                depth=depths[i],
                downsample=i > 0,
                num_heads=num_heads[i],
                window_size=windows[i],
                mlp_ratio=mlp_ratio,
                drop_path=dpr[i],
            )
            res = stage.output_resolution
            stages.append(stage)
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.out_dims[-1])
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.mask_token, std=0.02)
        named_apply(init_weights_vit_timm, self.stages)
        if self.v2:
            for stage in self.stages:
                stage._init_respostnorm()

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``tokens`` (B, h, w, D), ``mask`` bool (B, h, w) True = masked -> [(B, h_i, w_i, D_i)]."""
        if tuple(tokens.shape[1:3]) != self.grid:
            raise ValueError(f"token grid {tuple(tokens.shape[1:3])} != encoder grid {self.grid}")
        x = tokens
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        feats[-1] = self.norm(feats[-1])
        return feats


class ViTEncoder(nn.Module):
    """Plain ViT trunk (timm ``Block``s) with fixed 2-D sin-cos positions and no cls token.

    Positions are added before MAE drops tokens, so each kept token still knows where it
    sits. There is no cls token: pooled or dense heads read the token grid directly.
    """

    def __init__(
        self,
        num_tokens: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        grid: tuple[int, int] | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.grid = grid = token_grid(num_tokens, grid)
        self.num_tokens = num_tokens
        self.embed_dim = embed_dim
        self.register_buffer(
            "pos_embed", build_sincos2d_pos_embed(list(grid), embed_dim).unsqueeze(0), persistent=False
        )
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i]) for i in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        named_apply(init_weights_vit_timm, self)

    def forward(self, tokens: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` (B, N, D); ``keep_idx`` (B, K) from ``random_masking`` -> (B, K or N, D)."""
        if tokens.shape[1] != self.num_tokens:
            raise ValueError(f"{tokens.shape[1]} tokens != encoder's {self.num_tokens}")
        x = tokens + self.pos_embed.to(tokens.dtype)
        if keep_idx is not None:
            x = x.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_grids(self, tokens: torch.Tensor, num_outputs: int = 4) -> list[torch.Tensor]:
        """Outputs of ``num_outputs`` evenly spaced blocks as (B, h, w, D) grids, for dense heads.

        All share stride ``patch_size``; a head builds its own pyramid from them (ViTDet-style).
        The last one is layer-normed, so it equals ``forward(tokens)`` reshaped.
        """
        if not 0 < num_outputs <= len(self.blocks):
            raise ValueError(f"num_outputs must be in 1..{len(self.blocks)}")
        take = {len(self.blocks) * (i + 1) // num_outputs - 1 for i in range(num_outputs)}
        x = tokens + self.pos_embed.to(tokens.dtype)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in take:
                out.append(x)
        out[-1] = self.norm(out[-1])
        return [o.reshape(o.shape[0], *self.grid, o.shape[-1]) for o in out]
