"""Reconstruction previews: input | masked input | reconstruction, as one PNG per sensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _to_rgb(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) normalised -> (H, W, 3) uint8: first three bands (or one, as grey), 2-98 % stretch."""
    a = x.detach().float().cpu().numpy()
    a = a[:3] if a.shape[0] >= 3 else np.repeat(a[:1], 3, axis=0)
    lo, hi = np.percentile(a, 2), np.percentile(a, 98)
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
    return (a.transpose(1, 2, 0) * 255).astype(np.uint8)


def save_previews(recons: dict[str, dict[str, torch.Tensor]], folder: Path, step: int, rows: int = 4) -> list[Path]:
    """Write one PNG per sensor (up to ``rows`` samples); returns the files written."""
    from PIL import Image

    paths = []
    for sensor, r in recons.items():
        tiles = []
        for i in range(min(rows, len(r["image"]))):
            image, recon = _to_rgb(r["image"][i]), _to_rgb(r["recon"][i])
            masked = image.copy()
            masked[r["mask"][i].cpu().numpy().astype(bool)] = 128
            tiles.append(np.concatenate([image, masked, recon], axis=1))
        if not tiles:
            continue
        grid = np.concatenate(tiles, axis=0)
        scale = max(1, 256 // grid.shape[1])
        path = folder / f"step{step:07d}-{sensor}.png"
        Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
        paths.append(path)
    return paths
