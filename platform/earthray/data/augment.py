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
    """Per sample: a random multiple of 90 degrees and a random horizontal flip, same for all its views."""
    keys = _spatial_keys(batch, sensors)
    if not keys:
        return batch
    n = batch[keys[0]].shape[0]
    k = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    out = dict(batch)
    for key in keys:
        x = batch[key]
        rows = []
        for i in range(n):
            xi = torch.rot90(x[i], int(k[i]), dims=(-2, -1))
            rows.append(torch.flip(xi, dims=(-1,)) if flip[i] else xi)
        out[key] = torch.stack(rows)
    return out
