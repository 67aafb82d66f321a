"""SkySense multi-modal temporal fusion: one transformer over each pixel's sequence of dates.

The factorised encoder extracts spatial features per image; this module then sees, for
every grid cell, the sequence ``[HR, S2_1..S2_T, S1_1..S1_T']`` (Eq. 1), adds a learnable
day-of-year embedding to each dated token (Eq. 2: seasons matter, e.g. for crops),
prepends an extra token and returns that token's output as the cell's multi-modal
spatio-temporal feature. Padded dates and missing modalities are keys no query can see.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

DAYS_PER_YEAR = 366


class TemporalFusion(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.extra_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.date_embed = nn.Parameter(torch.zeros(DAYS_PER_YEAR, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        trunc_normal_(self.extra_token, std=0.02)
        trunc_normal_(self.date_embed, std=0.02)

    def forward(self, tokens: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``tokens`` (N, L, D), ``doy`` (N, L) int64 day of year, 0 for undated tokens,
        ``valid`` (N, L) bool -> (N, D), the extra token's output."""
        dated = (doy > 0).unsqueeze(-1)
        table = self.date_embed[(doy.clamp(1, DAYS_PER_YEAR) - 1)]
        x = tokens + torch.where(dated, table, torch.zeros_like(table))
        x = torch.cat([self.extra_token.expand(x.shape[0], -1, -1), x], dim=1)
        keys = torch.cat([valid.new_ones(valid.shape[0], 1), valid], dim=1)[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask=keys)
        return self.norm(x[:, 0])
