"""Task heads on an encoder's multi-scale features, for fine-tuning.

Every recipe's ``encode`` gives, per sensor, a list of channels-first feature maps
(B, D_i, h_i, w_i). ``fuse_sensors`` averages the sensors a sample has (a missing
modality simply drops out, as in MaRS's EarthMiss setting); the heads take the fused list.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from earthray.errors import NotFound

FUSED = ("fusion", "fusion_geo")
"""Keys of a recipe's own fused multi-modal feature (SkySense's temporal fusion), beside the per-sensor maps."""


def fuse_sensors(features: dict[str, list[torch.Tensor]], present: dict[str, torch.Tensor] | None = None
                 ) -> list[torch.Tensor]:
    """Per level, the mean over the sensors present in each sample.

    When the per-sensor maps cannot be averaged (time series, or sensors on different grids) and the
    recipe fuses its inputs itself (``"fusion"``: SkySense's spatio-temporal feature), that fused
    feature is the representation."""
    names = [n for n in features if n not in FUSED] or list(features)
    shapes = {tuple(tuple(f.shape) for f in features[n]) for n in names}
    if "fusion" in features and (len(shapes) > 1 or any(f.dim() != 4 for n in names for f in features[n])):
        return features["fusion"]
    levels = len(features[names[0]])
    fused = []
    for i in range(levels):
        stack = torch.stack([features[n][i] for n in names])  # (S, B, D, h, w)
        if present is None:
            fused.append(stack.mean(0))
            continue
        w = torch.stack([present.get(n, torch.ones(stack.shape[1], dtype=torch.bool, device=stack.device))
                         for n in names]).to(stack.dtype)  # (S, B)
        w = w.view(*w.shape, 1, 1, 1)
        fused.append((stack * w).sum(0) / w.sum(0).clamp_min(1.0))
    return fused


class ClassificationHead(nn.Module):
    """Global-average-pooled last level -> logits; multi-label heads are trained with BCE, single with CE."""

    def __init__(self, in_dims: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(in_dims[-1])
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dims[-1], num_classes)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.fc(self.drop(self.norm(features[-1].mean(dim=(-2, -1)))))


class FPNHead(nn.Module):
    """Feature-pyramid decoder: lateral 1x1, top-down sum, 3x3 smoothing, all levels merged at the finest.

    ``out_channels`` classes for segmentation, 1 (or more) for pixel regression; outputs are
    resized to ``size``, the input image's, so labels are compared at full resolution.
    GroupNorm, not BatchNorm: no running statistics that differ between data-parallel workers
    (rank 0's would be exported) or between training and inference batch sizes.
    """

    def __init__(self, in_dims: list[int], out_channels: int, channels: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(d, channels, 1) for d in in_dims])
        self.smooth = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(8, channels), nn.ReLU(inplace=True))
            for _ in in_dims])
        self.classifier = nn.Conv2d(channels * len(in_dims), out_channels, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear",
                                                    align_corners=False)
        finest = lat[0].shape[-2:]
        merged = torch.cat([F.interpolate(s(x), size=finest, mode="bilinear", align_corners=False)
                            for s, x in zip(self.smooth, lat)], dim=1)
        return F.interpolate(self.classifier(merged), size=size, mode="bilinear", align_corners=False)


class ChangeHead(nn.Module):
    """Siamese change decoder: per level, the two dates' features and their absolute difference,
    then an FPN to per-pixel change logits (both dates pass through the same encoder)."""

    def __init__(self, in_dims: list[int], out_channels: int = 2, channels: int = 64):
        super().__init__()
        self.fpn = FPNHead([2 * d for d in in_dims], out_channels, channels)

    def forward(self, before: list[torch.Tensor], after: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.fpn([torch.cat([(a - b).abs(), (a + b) / 2], dim=1) for b, a in zip(before, after)], size)


HEADS = {"classification": ClassificationHead, "fpn": FPNHead, "change": ChangeHead}


def create_head(kind: str, in_dims: list[int], out_channels: int, **kwargs) -> nn.Module:
    """A head by name (``classification``, ``fpn``, ``change``): what a bundle's ``head_spec`` rebuilds."""
    try:
        cls = HEADS[kind]
    except KeyError:
        raise NotFound(f"unknown head {kind!r}; known: {', '.join(HEADS)}") from None
    return cls(in_dims, out_channels, **kwargs)
