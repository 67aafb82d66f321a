"""Geometric augmentation applied identically to every co-registered view of a sample.

Runs on the training worker on torch batches, with a generator seeded from the step,
so a resumed run replays the same augmentations and each epoch sees new ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

SPATIAL_SUFFIXES = ("", ".valid")


def _spatial_keys(batch: Mapping[str, torch.Tensor], sensors: list[str]) -> list[str]:
    keys = [f"{s}{suffix}" for s in sensors for suffix in SPATIAL_SUFFIXES if f"{s}{suffix}" in batch]
    return keys + (["label"] if "label" in batch and batch["label"].dim() == 3 else [])


def flip_rotate(batch: dict[str, torch.Tensor], sensors: list[str], generator: torch.Generator) -> dict:
    """Per sample: a random multiple of 90 degrees and a random horizontal flip, same for all its views.

    The 8 combinations are the 8 symmetries of the square; views are ``(B, ..., H, W)`` with H == W
    (sensor tensors, their ``.valid`` masks, series, a ``(B, H, W)`` label chip). Other keys pass through.
    """
    keys = _spatial_keys(batch, sensors)
    if not keys:
        return batch
    n = batch[keys[0]].shape[0]
    k = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    if n == 0:
        return dict(batch)
    out = dict(batch)
    for key in keys:
        x = batch[key]
        if x.shape[0] != n or x.shape[-1] != x.shape[-2]:
            raise ValueError(f"flip_rotate: {key} has shape {tuple(x.shape)}; expected ({n}, ..., S, S)")
        y = torch.empty_like(x)
        # One rot90/flip per variant present in the batch, not one per sample.
        for kk in range(4):
            for ff in (False, True):
                sel = ((k == kk) & (flip == ff)).to(x.device)
                if sel.any():
                    v = torch.rot90(x[sel], kk, dims=(-2, -1))
                    y[sel] = torch.flip(v, dims=(-1,)) if ff else v
        out[key] = y
    return out
