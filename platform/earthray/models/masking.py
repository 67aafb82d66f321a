"""Masks for masked image modelling: SimMIM block masks (Swin) and MAE token dropping (ViT).

Both draw from an optional ``torch.Generator`` so a run (or a test) can replay exactly
the same masks; without one they use the global RNG that ``torch.manual_seed`` sets.
"""

from __future__ import annotations

import math

import torch


def simmim_mask(
    batch_size: int,
    grid: tuple[int, int],
    mask_patch: int,
    patch_size: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool ``(B, h, w)`` over the token grid, True = masked.

    Masking whole ``mask_patch``-pixel blocks (32 px over 4 px tokens in SimMIM) rather
    than single tokens stops the model from solving the task by copying a neighbour.
    Every sample gets exactly ``ceil(ratio * blocks)`` masked blocks, as in SimMIM.
    """
    if mask_patch % patch_size:
        raise ValueError(f"mask_patch {mask_patch} must be a multiple of patch_size {patch_size}")
    scale = mask_patch // patch_size
    h, w = grid
    if h % scale or w % scale:
        raise ValueError(f"token grid {grid} is not divisible into {scale}x{scale}-token mask blocks")
    mh, mw = h // scale, w // scale
    n_blocks = mh * mw
    n_masked = math.ceil(n_blocks * ratio)
    noise = torch.rand(batch_size, n_blocks, generator=generator, device=generator.device if generator else device)
    rank = noise.argsort(dim=1).argsort(dim=1)
    blocks = (rank < n_masked).view(batch_size, mh, mw)
    mask = blocks.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return mask.to(device) if device is not None else mask


def random_masking(
    batch_size: int,
    num_tokens: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random token drop.

    Returns ``keep_idx`` (B, K) long (tokens the encoder sees, K = N * (1 - ratio)),
    ``mask`` (B, N) bool (True = dropped, the tokens the loss is computed on) and
    ``restore_idx`` (B, N) long, which puts ``[kept, mask tokens]`` back in grid order.
    """
    keep = int(num_tokens * (1.0 - ratio))
    if not 0 < keep <= num_tokens:
        raise ValueError(f"ratio {ratio} keeps {keep} of {num_tokens} tokens")
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=generator.device if generator else device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    keep_idx = shuffle[:, :keep]
    mask = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=noise.device)
    mask[:, :keep] = False
    mask = mask.gather(1, restore)
    if device is not None:
        keep_idx, mask, restore = keep_idx.to(device), mask.to(device), restore.to(device)
    return keep_idx, mask, restore
