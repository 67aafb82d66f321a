"""Sparse mixture-of-experts feed-forward (Switch/V-MoE style) and its Swin retrofit.

msGFM replaces the MLP of every other Swin block with 8 experts so that sensors with
very different statistics can use different weights inside one shared encoder. Each
token goes to its top-k experts, each expert takes at most ``capacity`` tokens per
forward (so compute is bounded whatever the router does), and tokens over capacity
skip the layer: their MLP output is zero and the block's residual carries them on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models import named_apply
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn


class MoEFFN(nn.Module):
    """Top-k routed experts with capacity; ``self.aux_loss`` holds the last forward's balance loss.

    The auxiliary loss is Switch Transformer's ``E * sum_e f_e * P_e`` (f: fraction of
    tokens whose first choice is e, P: mean router probability of e): 1 when routing is
    uniform, up to E when one expert takes everything. ``tokens_per_expert`` records how
    many tokens each expert actually processed in the last forward.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int = 8,
        capacity_factor: float = 1.25,
        top_k: int = 1,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in 1..{num_experts}")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList([Mlp(dim, hidden_dim, act_layer=act_layer) for _ in range(num_experts)])
        named_apply(init_weights_vit_timm, self)
        self.aux_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None

    def capacity(self, num_tokens: int) -> int:
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        e, k = self.num_experts, self.top_k
        probs = self.router(x).float().softmax(dim=-1)
        gate, idx = probs.topk(k, dim=-1)
        if k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)

        first = F.one_hot(idx[:, 0], e).float()
        self.aux_loss = e * (first.mean(0) * probs.mean(0)).sum()

        # Slots are filled first choices first (all tokens' rank 0, then rank 1, ...), in token order.
        choice = F.one_hot(idx.t().reshape(-1), e)
        slot = ((choice.cumsum(0) - 1) * choice).sum(-1).view(k, -1).t()
        routed = slot < self.capacity(x.shape[0])

        out = torch.zeros_like(x)
        counts = []
        # Every expert runs, on no tokens if none were routed to it, so that every data-parallel rank
        # computes gradients for the same parameters in the same order: DeepSpeed reduces them across
        # ranks in the order they arrive.
        for j, expert in enumerate(self.experts):
            tok, rank = ((idx == j) & routed).nonzero(as_tuple=True)
            counts.append(tok.numel())
            y = expert(x[tok]) * gate[tok, rank].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, tok, y)
        self.tokens_per_expert = torch.tensor(counts)
        return out.reshape(shape)


def convert_swin_mlp_to_moe(
    encoder: nn.Module,
    every: int = 2,
    stages: list[int] | None = None,
    **moe_kwargs: Any,
) -> list[MoEFFN]:
    """Replace the MLP of blocks ``every-1, 2*every-1, ...`` of each chosen stage with a ``MoEFFN``.

    With ``every=2`` that is blocks 1, 3, 5, ... of a stage, the numbering msGFM's Table 10
    uses. ``stages`` (indices into ``encoder.stages``) defaults to all. The experts start
    fresh (not copies of the MLP): this is applied before pretraining from scratch.
    """
    replaced = []
    for si, stage in enumerate(encoder.stages):
        if stages is not None and si not in stages:
            continue
        for bi, block in enumerate(stage.blocks):
            if bi % every != every - 1:
                continue
            mlp = block.mlp
            moe = MoEFFN(mlp.fc1.in_features, mlp.fc1.out_features, act_layer=type(mlp.act), **moe_kwargs)
            block.mlp = moe
            replaced.append(moe)
    return replaced


def moe_aux_loss(module: nn.Module) -> torch.Tensor:
    """Sum of the load-balancing losses the MoE layers inside ``module`` set on their last forward."""
    losses = [m.aux_loss for m in module.modules() if isinstance(m, MoEFFN) and m.aux_loss is not None]
    if losses:
        return torch.stack(losses).sum()
    device = next(module.parameters()).device
    return torch.zeros((), device=device)
