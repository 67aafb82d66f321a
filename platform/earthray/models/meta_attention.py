"""MaRS Meta-Modality Attention (MMA): alternating intra-modality and joint self-attention.

Block ``l`` (1-based) of ``L`` attends within each modality alone when ``l`` is odd and
over the concatenated tokens of all modalities when ``l`` is even (MaRS, Eqs. 2-4). The
odd blocks learn modality-specific patterns, the even ones carry information across
modalities; alternating them is what the paper credits for a shared "meta-modality"
representation. As in Eq. 2, one block serves every modality in an intra step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn


class MetaModalityAttention(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, tokens: Sequence[torch.Tensor], present: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Tokens ``(B, N_m, D)`` per modality -> refined tokens, same shapes.

        ``present`` (``(B,)`` bool per modality) keeps a sample's missing modality out of
        the joint steps, so zeros standing in for an absent image never leak into the other.
        """
        sizes = [t.shape[1] for t in tokens]
        joint_mask = None
        if present is not None:
            keep = torch.cat([p[:, None].expand(-1, n) for p, n in zip(present, sizes)], dim=1)
            # A sample with nothing present would have no key left to attend to.
            keep = keep | ~keep.any(dim=1, keepdim=True)
            joint_mask = keep[:, None, None, :]
        out = list(tokens)
        for index, block in enumerate(self.blocks, start=1):
            if index % 2:
                out = [block(t) for t in out]
            else:
                out = list(block(torch.cat(out, dim=1), attn_mask=joint_mask).split(sizes, dim=1))
        return [self.norm(t) for t in out]
