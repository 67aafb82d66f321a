"""MaRS (Yang et al., AAAI 2026): paired VHR optical + SAR pretraining.

Two SwinV2 encoders, one per modality (SAR's layover and speckle make a shared one a poor
fit), see SimMIM-masked images. Their last-stage tokens go through Meta-Modality
Attention (alternating per-modality and joint blocks) into one light SimMIM decoder per
modality, scored by L1 on the masked pixels. Cross-granularity contrastive learning
(CGCL) aligns the encoders' tokens across modalities at patch, image and patch-to-image
level, so SAR's local distortions are tied to stable scene semantics; it reads the
masked encoders' tokens (each modality masked independently). An optional frozen
teacher (the paper's continual-pretraining guidance, GFM-style) sees the unmasked optical
image and the optical student, through a linear projector, matches its last-stage tokens
by cosine.

The optical sensor is the one of kind "optical" (e.g. ``vhr_rgb``), SAR the one of kind
"sar" (e.g. ``vhr_sar_x``, or ``s1_grd_db`` restricted to one band). Samples lacking
one of them (``"{sensor}.present"`` False) still train the other's reconstruction; the
joint attention and CGCL use only complete pairs.

Pretrained weights come from local files (no hub downloads): ``init_weights`` names a
safetensors file holding a timm SwinV2's state dict, which initialises both encoders and
their patch embeddings; ``teacher_weights`` names one for the teacher, which has the
optical branch's architecture and is frozen (buffers, never updated: the recipe has no
step-end state). What is loaded and what is not: ``earthray.models.pretrained.load_timm_swinv2``.
Without ``teacher_weights`` no teacher is built and there is no distillation term
(``teacher_weight`` is then unused): a frozen copy of the random initialisation would only
pull the student toward its own random features. The paper gives no parameter count for
MaRS (its backbones are SwinV2-B, 88 M each), so ``paper_params`` is empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from earthray.data import batch as layout
from earthray.errors import ConfigError
from earthray.models.backbones import SwinEncoder
from earthray.models.contrastive import cgcl_loss
from earthray.models.decoders import SimMIMDecoder
from earthray.models.ema import frozen_copy
from earthray.models.masking import simmim_mask
from earthray.models.meta_attention import MetaModalityAttention
from earthray.models.patch_embed import SensorPatchEmbed
from earthray.models.pretrained import load_timm_swinv2
from earthray.recipes.base import Batch, Recipe, RecipeConfig, register_recipe
from earthray.sensors import Sensor


class MaRSConfig(RecipeConfig):
    img_size: int = 512
    patch_size: int = 4
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 16
    drop_path_rate: float = 0.1
    mask_ratio: float = 0.6
    mask_patch_size: int = 32
    mma_depth: int = 2
    """L, the number of MMA blocks (odd ones intra-modality, even ones joint); the paper does not state it."""
    mma_heads: int = 16
    contrast_dim: int = 256
    cgcl_temperatures: tuple[float, float, float] = (0.1, 0.05, 0.07)
    cgcl_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)
    cgcl_weight: float = 1.0
    init_weights: str | None = None
    """A local safetensors file with a timm SwinV2 state dict (``swinv2_*``) both encoders and their
    patch embeddings start from (the kernel adapted to each sensor's bands); None: random."""
    teacher_weights: str | None = None
    """A local safetensors file with a timm SwinV2 state dict for the frozen teacher; None: no teacher."""
    teacher_weight: float = 1.0
    """Weight of the teacher's cosine loss when ``teacher_weights`` is given (0 builds no teacher);
    unused without ``teacher_weights``."""
    optical_sensor: str | None = None
    """Which sensor is the optical branch; default: the one sensor of kind "optical"."""
    sar_sensor: str | None = None
    """Which sensor is the SAR branch; default: the one sensor of kind "sar" (name another co-registered
    sensor, e.g. a DSM, to run the recipe where no SAR pair exists)."""


def _sensor_of_kind(sensors: Sequence[Sensor], kind: str) -> Sensor:
    found = [s for s in sensors if s.kind == kind]
    if len(found) != 1:
        raise ConfigError(f"mars needs exactly one {kind} sensor, got {[s.name for s in found]}")
    return found[0]


def _masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the pixels where ``mask`` (B, H, W) is True, all bands."""
    weight = mask.unsqueeze(1).to(pred.dtype)
    return ((pred - target).abs() * weight).sum() / (weight.sum() * pred.shape[1]).clamp_min(1.0)


@register_recipe
class MaRS(Recipe):
    name = "mars"
    Config = MaRSConfig
    presets = {
        "tiny": dict(
            img_size=64, embed_dim=16, depths=(1, 1, 1), num_heads=(1, 2, 4), window_size=4,
            drop_path_rate=0.0, mask_patch_size=16, mma_depth=2, mma_heads=2, contrast_dim=32,
        ),
        # The paper's setting: SwinV2-B encoders, 512 px, 60 % of 32 px blocks masked.
        "base": dict(),
    }
    paper_params: dict[str, float] = {}
    paper_sensors = {"vhr_rgb": None, "vhr_sar_x": None}

    def __init__(self, config: MaRSConfig, sensors: Sequence[Sensor]):
        super().__init__(config, sensors)
        c = config
        self.optical = c.optical_sensor or _sensor_of_kind(sensors, "optical").name
        self.sar = c.sar_sensor or _sensor_of_kind(sensors, "sar").name
        for role, name in (("optical", self.optical), ("sar", self.sar)):
            if name not in self.sensors:
                raise ConfigError(f"mars: {role}_sensor {name!r} is not among the sensors {list(self.sensors)}")
        self.modalities = (self.optical, self.sar)
        self.embed = nn.ModuleDict(
            {m: SensorPatchEmbed(len(self.sensors[m].bands), c.embed_dim, c.patch_size) for m in self.modalities}
        )
        self.encoders = nn.ModuleDict(
            {
                m: SwinEncoder(
                    c.img_size, c.patch_size, c.embed_dim, c.depths, c.num_heads, c.window_size,
                    v2=True, drop_path_rate=c.drop_path_rate,
                )
                for m in self.modalities
            }
        )
        dim = self.encoders[self.optical].out_dims[-1]
        stride = self.encoders[self.optical].out_strides[-1]
        self.mma = MetaModalityAttention(dim, c.mma_depth, c.mma_heads)
        self.decoders = nn.ModuleDict(
            {m: SimMIMDecoder(dim, len(self.sensors[m].bands), stride) for m in self.modalities}
        )
        self.contrast = nn.ModuleDict({m: nn.Linear(dim, c.contrast_dim) for m in self.modalities})
        if c.teacher_weights is not None and c.teacher_weight > 0:
            # Built from the optical branch for its architecture; load_initial_weights fills it.
            self.teacher = frozen_copy(self._branch(self.optical))
            self.distill = nn.Linear(dim, dim)

    def _branch(self, modality: str) -> nn.ModuleDict:
        return nn.ModuleDict({"embed": self.embed[modality], "encoder": self.encoders[modality]})

    def load_initial_weights(self) -> None:
        """``init_weights`` into both encoders and patch embeddings, ``teacher_weights`` into the teacher."""
        c = self.config
        if c.init_weights is not None:
            for m in self.modalities:
                load_timm_swinv2(c.init_weights, self._branch(m))
        if hasattr(self, "teacher"):
            load_timm_swinv2(c.teacher_weights, self.teacher)

    def train(self, mode: bool = True) -> MaRS:
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()
        return self

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = self.config
        images = {m: batch[m] for m in self.modalities}
        present = {m: layout.present(batch, m) for m in self.modalities}
        first = images[self.optical]
        grid = self.encoders[self.optical].grid
        masks = {
            m: simmim_mask(first.shape[0], grid, c.mask_patch_size, c.patch_size, c.mask_ratio, device=first.device)
            for m in self.modalities
        }
        last = {m: self.encoders[m](self.embed[m](images[m]), masks[m])[-1] for m in self.modalities}

        refined = self.mma([last[m].flatten(1, 2) for m in self.modalities], [present[m] for m in self.modalities])
        losses: dict[str, torch.Tensor] = {}
        for m, tokens in zip(self.modalities, refined):
            recon = self.decoders[m](tokens.view_as(last[m]))
            pixels = masks[m].repeat_interleave(c.patch_size, 1).repeat_interleave(c.patch_size, 2)
            pixels = pixels & present[m][:, None, None] & layout.valid(batch, m)
            losses[f"mim_{m}"] = _masked_l1(recon, images[m], pixels)

        pairs = present[self.optical] & present[self.sar]
        if pairs.any():
            z = [self.contrast[m](last[m][pairs].flatten(1, 2)) for m in self.modalities]
            terms = cgcl_loss(*z, temperatures=c.cgcl_temperatures, weights=c.cgcl_weights)
        else:
            terms = {k: first.new_zeros(()) for k in ("patch", "image", "cross", "cgcl")}
        losses.update({k if k == "cgcl" else f"cgcl_{k}": v for k, v in terms.items()})
        total = sum(losses[f"mim_{m}"] for m in self.modalities) + c.cgcl_weight * losses["cgcl"]

        if hasattr(self, "teacher"):
            seen = present[self.optical]
            with torch.no_grad():
                target = self.teacher["encoder"](self.teacher["embed"](images[self.optical][seen]))[-1]
            student = self.distill(last[self.optical][seen])
            cosine = F.cosine_similarity(student, target, dim=-1)
            losses["distill"] = (1.0 - cosine).mean() if seen.any() else first.new_zeros(())
            total = total + c.teacher_weight * losses["distill"]
        losses["loss"] = total
        return losses

    def encode(self, batch: Batch) -> dict[str, list[torch.Tensor]]:
        """Each given modality's encoder stages, (B, D_i, H/s_i, W/s_i); the encoders are
        what MaRS hands to downstream tasks, and either works alone."""
        return {
            m: [f.permute(0, 3, 1, 2) for f in self.encoders[m](self.embed[m](batch[m]))]
            for m in self.modalities
            if m in batch
        }
