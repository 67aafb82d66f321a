"""Per-sensor patch embeddings: the only sensor-specific part of a shared encoder.

Sensors differ in band count (1 for a DEM, 224 for EnMAP), so each gets its own
convolutional projection into the shared token width; everything after it is shared.
Outputs are channels-last grids ``(B, h, w, D)``, the layout timm's Swin stages take.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.layers import PatchEmbed
from torch import nn

from earthray.errors import NotFound


class SensorPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` (strided conv + LayerNorm) for one sensor, any image size.

    ``img_size`` is left unset so one embedding serves every chip size divisible by
    ``patch_size``: the encoder, not the embedding, decides which sizes it accepts.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm: bool = True):
        super().__init__(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm if norm else None,
            output_fmt="NHWC",
        )
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if x.shape[-2] % p[0] or x.shape[-1] % p[1]:
            raise ValueError(f"image {tuple(x.shape[-2:])} is not divisible by patch size {p}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} bands, got {x.shape[1]}")
        return super().forward(x)


class MultiSensorPatchEmbed(nn.Module):
    """One ``SensorPatchEmbed`` per sensor name, all into the same width ``embed_dim``."""

    def __init__(self, channels: Mapping[str, int], embed_dim: int, patch_size: int, norm: bool = True):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.embeds = nn.ModuleDict(
            {name: SensorPatchEmbed(c, embed_dim, patch_size, norm=norm) for name, c in channels.items()}
        )

    def forward(self, x: torch.Tensor, sensor: str) -> torch.Tensor:
        if sensor not in self.embeds:
            raise NotFound(f"no patch embedding for sensor {sensor!r}; have {', '.join(self.embeds)}")
        return self.embeds[sensor](x)
