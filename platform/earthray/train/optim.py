"""Optimiser parameter groups and the learning-rate schedule the papers use."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """No weight decay on biases, norms, embeddings, tokens and position tables (MAE/SimMIM/Swin rule).

    A model with ``lr_scales()`` (fine-tuning's layer-wise decay) gets one group per scale, each
    with its own ``lr`` (``lr`` times the scale), which the schedule then multiplies.
    """
    scales = model.lr_scales() if hasattr(model, "lr_scales") else {}
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or any(
            k in name for k in ("pos_embed", "mask_token", "cls_token", "relative_position", "logit_scale", "token")
        )
        groups.setdefault((not skip, scales.get(name, 1.0)), []).append(p)
    out = []
    for (decay, scale), params in sorted(groups.items(), key=lambda kv: (-kv[0][1], not kv[0][0])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if scales and lr is not None:
            group["lr"] = lr * scale
        out.append(group)
    return out


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, lr: float,
                  min_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    floor = min_lr / lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
