"""OFA-Net (Xiong et al., "One for All", IGARSS 2024): one ViT for every sensor, MAE pretraining.

Each sensor has its own patch embedding (the only place band counts differ) and its own
light MAE decoder; the ViT between them is shared. Every chip is resized to one size
(224 px in the paper) and masked independently, so sensors need not be paired: each
sensor in a batch adds its own masked-patch MSE, and the total is their mean, so a
sensor's weight does not depend on which others share its batch.

The paper names the backbone only "a Vision Transformer" and gives neither its size nor
the decoder's. The ``base`` preset is ViT-B/16 (the ViT its MAE baseline and the
authors' follow-up DOFA use) with MAE's default decoder (512 wide, 8 blocks), one per sensor.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from earthray.data import batch as layout
from earthray.errors import ConfigError, DataError, NotFound
from earthray.models.backbones import ViTEncoder
from earthray.models.decoders import MAEDecoder, patchify, unpatchify
from earthray.models.masking import random_masking
from earthray.models.patch_embed import MultiSensorPatchEmbed
from earthray.recipes.base import Batch, Recipe, RecipeConfig, register_recipe
from earthray.sensors import Sensor


class OFAConfig(RecipeConfig):
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    """False: the target is the batch's pixels, each band already z-scored by its sensor's
    statistics, which keeps every sensor's term on one scale. True: MAE's per-patch
    normalised target (each patch to zero mean, unit variance)."""


def masked_patch_mse(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    valid: torch.Tensor | None = None,
    norm_pix: bool = False,
) -> torch.Tensor:
    """MSE over the valid pixels of masked patches only: visible patches are free to copy.

    ``pred`` (B, N, p*p*C) in ``patchify`` layout, ``images`` (B, C, H, W), ``mask`` (B, N)
    True = masked, ``valid`` (B, H, W) False on nodata pixels.
    """
    target = patchify(images, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    weight = mask[..., None].to(pred.dtype).expand_as(pred)
    if valid is not None:
        pix = valid[:, None].expand(-1, images.shape[1], -1, -1).to(pred.dtype)
        weight = weight * patchify(pix, patch_size)
    return ((pred - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


@register_recipe
class OFA(Recipe):
    name: ClassVar[str] = "ofa"
    Config: ClassVar[type[RecipeConfig]] = OFAConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3,
            decoder_dim=32, decoder_depth=1, decoder_heads=2,
        ),
        "base": dict(
            img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
            decoder_dim=512, decoder_depth=8, decoder_heads=16,
        ),
    }
    # The paper states no parameter count. For its five inputs (S1 2 bands, S2 9, NAIP 3,
    # Gaofen 4, EnMAP 224) the base preset stores 292.5 M: ViT-B/16 trunk 85.1 M, five MAE
    # decoders 159.9 M (EnMAP's 55.0 M), five patch embeddings 47.6 M (EnMAP's 44.0 M).
    paper_sensors: ClassVar[dict[str, list[str] | None]] = {
        "s1_grd": None,
        "s2_l1c": ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B11", "B12"],
        "naip": ["R", "G", "B"],
        "gaofen2": None,
        "enmap": None,
    }

    def __init__(self, config: OFAConfig, sensors: list[Sensor]):
        super().__init__(config, sensors)
        c = config
        if c.img_size % c.patch_size:
            raise ConfigError(f"img_size {c.img_size} is not divisible by patch_size {c.patch_size}")
        self.grid = (c.img_size // c.patch_size,) * 2
        num_tokens = self.grid[0] * self.grid[1]
        channels = {name: len(s.bands) for name, s in self.sensors.items()}
        self.patch_embed = MultiSensorPatchEmbed(channels, c.embed_dim, c.patch_size, norm=False)
        self.encoder = ViTEncoder(
            num_tokens, c.embed_dim, c.depth, c.num_heads, c.mlp_ratio, drop_path_rate=c.drop_path_rate
        )
        self.decoders = nn.ModuleDict({
            name: MAEDecoder(
                c.embed_dim, c.decoder_dim, c.decoder_depth, c.decoder_heads, num_tokens, c.patch_size, ch
            )
            for name, ch in channels.items()
        })

    def _inputs(self, batch: Batch, only_present: bool):
        """(sensor, image at img_size, valid at img_size or None) for each recipe sensor in the batch."""
        unknown = [k for k in batch if "." not in k and k != "lonlat" and k not in self.sensors]
        if unknown:
            raise NotFound(f"batch has sensors {unknown} this recipe was not built for ({', '.join(self.sensors)})")
        size = (self.config.img_size,) * 2
        for name in self.sensors:
            if name not in batch:
                continue
            x = batch[name]
            if x.ndim != 4:
                raise DataError(f"{name}: OFA-Net takes single-date chips (B, C, H, W), got {tuple(x.shape)}")
            valid = layout.valid(batch, name)
            if only_present:
                present = layout.present(batch, name)
                x, valid = x[present], valid[present]
                if x.shape[0] == 0:
                    continue
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
                valid = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
            yield name, x, valid

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = self.config
        terms: dict[str, torch.Tensor] = {}
        for name, x, valid in self._inputs(batch, only_present=True):
            tokens = self.patch_embed(x, name).flatten(1, 2)
            keep, mask, restore = random_masking(x.shape[0], tokens.shape[1], c.mask_ratio, device=x.device)
            pred = self.decoders[name](self.encoder(tokens, keep), restore)
            terms[f"recon/{name}"] = masked_patch_mse(pred, x, mask, c.patch_size, valid, c.norm_pix_loss)
        if not terms:
            raise DataError(f"batch holds none of this recipe's sensors ({', '.join(self.sensors)})")
        terms["loss"] = torch.stack(list(terms.values())).mean()
        return terms

    def reconstruct(self, batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
        c = self.config
        out = {}
        for name, x, _ in self._inputs(batch, only_present=True):
            tokens = self.patch_embed(x, name).flatten(1, 2)
            keep, mask, restore = random_masking(x.shape[0], tokens.shape[1], c.mask_ratio, device=x.device)
            pred = self.decoders[name](self.encoder(tokens, keep), restore)
            grid = (c.img_size // c.patch_size,) * 2
            pixels = mask.view(-1, *grid).repeat_interleave(c.patch_size, 1).repeat_interleave(c.patch_size, 2)
            out[name] = {"image": x, "mask": pixels, "recon": unpatchify(pred, c.patch_size, grid, x.shape[1])}
        return out

    def encode(self, batch: Batch) -> dict[str, list[torch.Tensor]]:
        """Four evenly spaced ViT block outputs per sensor as (B, D, h, w), stride ``patch_size``."""
        return {
            name: [g.permute(0, 3, 1, 2) for g in self.encoder.forward_grids(self.patch_embed(x, name).flatten(1, 2))]
            for name, x, _ in self._inputs(batch, only_present=False)
        }
