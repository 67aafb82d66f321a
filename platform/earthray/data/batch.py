"""The batch layout the pipeline delivers and every recipe, head and server reads: one definition.

A batch is a flat dict (as Ray Data batches are). Per sensor ``S``:

- ``batch[S]``: float32, normalised; ``(B, C, H, W)`` for single-date sensors, ``(B, T, C, H, W)`` for
  time series;
- ``batch[f"{S}.valid"]``: bool ``(B, H, W)`` / ``(B, T, H, W)``; optional (all valid);
- ``batch[f"{S}.present"]``: bool ``(B,)``; False where the sample lacks that sensor; optional (all present);
- ``batch[f"{S}.doy"]``: int64 ``(B, T)`` day of year (1..366, 0 undated); time series only, optional (0);
- ``batch[f"{S}.tmask"]``: bool ``(B, T)``, False on padded dates; time series only, optional (all True).

Beside them: ``batch["lonlat"]`` float32 ``(B, 2)`` chip centres in degrees (optional) and
``batch["label"]`` (class ids, a label chip, or a multi-hot vector). The readers below fill the defaults,
so a recipe never spells out what a missing key means.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

VALID, PRESENT, DOY, TMASK = ".valid", ".present", ".doy", ".tmask"
COMPANIONS = (VALID, PRESENT, DOY, TMASK)
"""The suffixes of a sensor's companion keys."""
LONLAT, LABEL = "lonlat", "label"


def sensors_in(batch: Mapping) -> list[str]:
    """The sensors a batch holds (its keys that are neither a companion nor ``lonlat``/``label``)."""
    return [k for k in batch if "." not in k and k not in (LONLAT, LABEL)]


def _dates(x: torch.Tensor) -> tuple[int, int]:
    return x.shape[0], (x.shape[1] if x.dim() == 5 else 1)


def present(batch: Mapping, sensor: str) -> torch.Tensor:
    """(B,) bool: which samples hold ``sensor``."""
    x = batch[sensor]
    found = batch.get(sensor + PRESENT)
    return torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if found is None else found.bool()


def valid(batch: Mapping, sensor: str) -> torch.Tensor:
    """(B, H, W) or (B, T, H, W) bool: which pixels of ``sensor`` hold data."""
    x = batch[sensor]
    found = batch.get(sensor + VALID)
    if found is None:
        return torch.ones(*x.shape[:-3], *x.shape[-2:], dtype=torch.bool, device=x.device)
    return found.bool()


def tmask(batch: Mapping, sensor: str) -> torch.Tensor:
    """(B, T) bool: which dates of a series are real (False on padding); (B, 1) for a single date."""
    b, t = _dates(batch[sensor])
    found = batch.get(sensor + TMASK)
    return torch.ones(b, t, dtype=torch.bool, device=batch[sensor].device) if found is None else \
        found.bool().reshape(b, t)


def doy(batch: Mapping, sensor: str) -> torch.Tensor:
    """(B, T) int64 day of year of each date (0 where undated)."""
    b, t = _dates(batch[sensor])
    found = batch.get(sensor + DOY)
    return torch.zeros(b, t, dtype=torch.long, device=batch[sensor].device) if found is None else \
        found.long().reshape(b, t)
