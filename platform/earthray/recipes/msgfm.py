"""msGFM (Han et al., CVPR 2024): one Swin with sparse MoE for many sensors, SimMIM with cross-sensor targets.

Each sensor has its own patch embedding and its own SimMIM decoder (1x1 conv +
PixelShuffle back to that sensor's bands); the Swin between them is shared, with the MLP
of every other block replaced by top-1 experts so sensors can route to different
weights. Each sensor's chips get their own SimMIM mask (32 px blocks, 60 %), shared by
all its bands. Where a row of the batch holds two sensors of the same place (both
``.present``), that row reconstructs, with probability ``cross_sensor_ratio``, the
paired sensor through the paired sensor's decoder instead of itself (the paper's Eq. 1);
the L1 loss is over masked, valid pixels in both cases. Rows lacking a partner always
reconstruct themselves (Eq. 2), so unpaired data trains the same model.

Loss = mean over sensors of their recon terms + aux_weight * MoE balance loss
(+ distill_weight * GFM distillation if ``distill``). Per-sensor batch sizes come from
the data pipeline (sensor-homogeneous batches); the recipe takes whatever rows it gets.
Which experts get tokens and which decoder a row reconstructs differ between
data-parallel ranks, but DeepSpeed reduces gradients parameter by parameter in the order
they arrive, so every expert runs (on no tokens if need be) and every candidate decoder
runs (on one row weighted 0 if no row drew it): every rank computes the same gradients
in the same order.

Optional GFM-style distillation (off in ``base``: the paper's Table 5 finds training from
scratch better): a frozen timm Swin (ImageNet-22k Swin-B in GFM) sees the unmasked RGB
bands of optical sensors (z-scored by sensor statistics, close to the ImageNet scaling it
was trained on; sensors without RGB bands are not distilled); the student's pooled
stage-3 features of the masked image, through a linear projector, are pulled to the
teacher's by a cosine loss. The teacher's weights come from a local file
(``teacher_weights``: a safetensors file of the ``teacher_model``'s timm state dict) or a
hub download (``teacher_pretrained``); ``distill`` with neither is an error, since a random
teacher teaches nothing. The teacher never changes, so the recipe has no step-end state.
"""

from __future__ import annotations

from typing import Any, ClassVar

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter
from torch import nn

from earthray.data import batch as layout
from earthray.errors import ConfigError, DataError, NotFound
from earthray.models.backbones import SwinEncoder
from earthray.models.decoders import SimMIMDecoder
from earthray.models.masking import simmim_mask
from earthray.models.moe import convert_swin_mlp_to_moe, moe_aux_loss
from earthray.models.patch_embed import MultiSensorPatchEmbed
from earthray.models.pretrained import HEAD_PREFIX, load_strict, read_weights
from earthray.recipes.base import Batch, Recipe, RecipeConfig, register_recipe
from earthray.sensors import Sensor

_RGB_NM = (665.0, 560.0, 490.0)
_RGB_TOLERANCE_NM = 50.0


class MsGFMConfig(RecipeConfig):
    img_size: int
    patch_size: int
    embed_dim: int
    depths: list[int]
    num_heads: list[int]
    window_size: int
    v2: bool = False
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    mask_patch: int = 32
    mask_ratio: float = 0.6
    num_experts: int = 8
    top_k: int = 1
    capacity_factor: float = 1.25
    moe_every: int = 2
    moe_stages: list[int] | None = None
    """Stages whose blocks get experts; None = all."""
    aux_weight: float = 0.01
    cross_sensor_ratio: float = 0.5
    distill: bool = False
    distill_weight: float = 1.0
    distill_stage: int = 2
    teacher_model: str = "swin_base_patch4_window7_224.ms_in22k"
    teacher_pretrained: bool = False
    """True downloads the timm weights (GFM's ImageNet-22k teacher) when the model is built."""
    teacher_weights: str | None = None
    """A local safetensors file with the ``teacher_model``'s timm state dict (its classifier is
    ignored; Swin position-bias tables are resized to the window as timm does)."""
    teacher_kwargs: dict[str, Any] = {}


def _rgb_bands(sensor: Sensor) -> list[int] | None:
    """Indices of the bands nearest red, green, blue (within 50 nm), or None if the sensor has no RGB."""
    if sensor.kind != "optical":
        return None
    out = []
    for nm in _RGB_NM:
        dist = [abs(b.wavelength - nm) for b in sensor.bands]
        i = min(range(len(dist)), key=dist.__getitem__)
        if dist[i] > _RGB_TOLERANCE_NM:
            return None
        out.append(i)
    return out


@register_recipe
class MsGFM(Recipe):
    name: ClassVar[str] = "msgfm"
    Config: ClassVar[type[RecipeConfig]] = MsGFMConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(
            img_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=4,
            mask_patch=16, num_experts=4,
            teacher_model="swin_tiny_patch4_window7_224",
            teacher_kwargs=dict(embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8]),
        ),
        # Swin-B as in SimMIM/GFM (image 192, window 6). The paper's "patch size of 16x16"
        # cannot be Swin-B's embedding patch (a 12x12 grid cannot go through four stages);
        # SimMIM's Swin-B embeds 4 px patches and its final stride (32) is the mask patch.
        # Experts in blocks 1, 3, ..., 17 (Table 10): the odd blocks of stage 3, the only
        # stage with that many blocks.
        "base": dict(
            img_size=192, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
            window_size=6, moe_stages=[2],
        ),
    }
    paper_params: ClassVar[dict[str, float]] = {
        # Table 11: 89 M "trainable parameters", the same as GFM's dense Swin-B. With top-1
        # routing that is the encoder each token uses (one expert per MoE block), which is
        # what ``comparable_parameters`` counts. Stored in total for the paper's four sensors:
        # 239 M (Swin-B 86.7 M, seven extra experts in 9 blocks 132.3 M, four SimMIM decoders
        # 19.9 M, routers and patch embeddings 0.1 M).
        "base": 89e6,
    }
    paper_sensors: ClassVar[dict[str, list[str] | None]] = {"vhr_rgb": None, "s2_l1c": None, "s1_grd": None, "dem": None}

    def comparable_parameters(self) -> int:
        """The encoder one token runs through: all of it but the experts it is not routed to."""
        encoder = sum(p.numel() for p in self.encoder.parameters())
        return encoder - sum(p.numel() for m in self.moe_layers for e in m.experts[1:] for p in e.parameters())

    def __init__(self, config: MsGFMConfig, sensors: list[Sensor]):
        super().__init__(config, sensors)
        c = config
        channels = {name: len(s.bands) for name, s in self.sensors.items()}
        self.patch_embed = MultiSensorPatchEmbed(channels, c.embed_dim, c.patch_size)
        self.encoder = SwinEncoder(
            c.img_size, c.patch_size, c.embed_dim, c.depths, c.num_heads, c.window_size,
            v2=c.v2, drop_path_rate=c.drop_path_rate, mlp_ratio=c.mlp_ratio,
        )
        self.moe_layers = convert_swin_mlp_to_moe(
            self.encoder, every=c.moe_every, stages=c.moe_stages,
            num_experts=c.num_experts, capacity_factor=c.capacity_factor, top_k=c.top_k,
        )
        stride = self.encoder.out_strides[-1]
        if c.mask_patch % stride:
            raise ConfigError(f"mask_patch {c.mask_patch} must be a multiple of the encoder's final stride {stride}")
        self.decoders = nn.ModuleDict(
            {name: SimMIMDecoder(self.encoder.out_dims[-1], ch, stride) for name, ch in channels.items()}
        )
        self.teacher: nn.Module | None = None
        if c.distill:
            self.rgb_bands = {name: _rgb_bands(s) for name, s in self.sensors.items()}
            self.teacher = timm.create_model(
                c.teacher_model, pretrained=c.teacher_pretrained, num_classes=0,
                img_size=c.img_size, window_size=c.window_size, **c.teacher_kwargs,
            )
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            teacher_dim = self.teacher.feature_info[c.distill_stage]["num_chs"]
            self.projector = nn.Linear(self.encoder.out_dims[c.distill_stage], teacher_dim)

    def load_initial_weights(self) -> None:
        """The distillation teacher from ``teacher_weights``; an error if it would stay random."""
        c = self.config
        if self.teacher is None:
            return
        if c.teacher_weights is None:
            if not c.teacher_pretrained:
                raise ConfigError("msgfm: distill needs a teacher's weights: teacher_weights (a local timm "
                                 "safetensors file) or teacher_pretrained (a hub download)")
            return
        tensors = {k: v for k, v in read_weights(c.teacher_weights).items() if not k.startswith(HEAD_PREFIX)}
        if isinstance(self.teacher, SwinTransformer):
            tensors = swin_checkpoint_filter(tensors, self.teacher)
        load_strict(self.teacher, tensors, c.teacher_weights)

    def train(self, mode: bool = True) -> MsGFM:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _sensors_in(self, batch: Batch) -> list[str]:
        unknown = [k for k in batch if "." not in k and k != "lonlat" and k not in self.sensors]
        if unknown:
            raise NotFound(f"batch has sensors {unknown} this recipe was not built for ({', '.join(self.sensors)})")
        names = [n for n in self.sensors if n in batch]
        size = (self.config.img_size,) * 2
        for n in names:
            if batch[n].ndim != 4 or tuple(batch[n].shape[-2:]) != size:
                raise DataError(f"{n}: msGFM takes (B, C, {size[0]}, {size[1]}) chips, got {tuple(batch[n].shape)}")
        return names

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = self.config
        names = self._sensors_in(batch)
        present = {n: layout.present(batch, n) for n in names}
        terms: dict[str, torch.Tensor] = {}
        aux, distill = [], []
        for name in names:
            rows = present[name].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            x = batch[name][rows]
            tokens = self.patch_embed(x, name)
            mask = simmim_mask(len(rows), self.encoder.grid, c.mask_patch, c.patch_size, c.mask_ratio, device=x.device)
            feats = self.encoder(tokens, mask)
            aux.append(moe_aux_loss(self.encoder))
            terms[f"recon/{name}"] = self._recon_loss(batch, names, present, name, rows, feats[-1], mask)
            if self.teacher is not None and self.rgb_bands[name] is not None:
                distill.append(self._distill_loss(x[:, self.rgb_bands[name]], feats[c.distill_stage]))
        if not terms:
            raise DataError(f"batch holds no present rows of this recipe's sensors ({', '.join(self.sensors)})")
        terms["moe_aux"] = torch.stack(aux).mean()
        total = torch.stack([v for k, v in terms.items() if k.startswith("recon/")]).mean()
        total = total + c.aux_weight * terms["moe_aux"]
        if self.teacher is not None:
            terms["distill"] = torch.stack(distill).mean() if distill else total.new_zeros(())
            total = total + c.distill_weight * terms["distill"]
        terms["loss"] = total
        return terms

    def reconstruct(self, batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
        """Each present sensor rebuilding itself (the cross-sensor target is a training-time choice)."""
        c, out = self.config, {}
        for name in self._sensors_in(batch):
            x = batch[name][layout.present(batch, name)]
            if len(x) == 0:
                continue
            mask = simmim_mask(len(x), self.encoder.grid, c.mask_patch, c.patch_size, c.mask_ratio, device=x.device)
            latent = self.encoder(self.patch_embed(x, name), mask)[-1]
            pixels = mask.repeat_interleave(c.patch_size, 1).repeat_interleave(c.patch_size, 2)
            out[name] = {"image": x, "mask": pixels, "recon": self.decoders[name](latent)}
        return out

    def _recon_loss(
        self,
        batch: Batch,
        names: list[str],
        present: dict[str, torch.Tensor],
        name: str,
        rows: torch.Tensor,
        latent: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """L1 over masked valid pixels; each row's target is itself or, sometimes, its paired sensor."""
        p = self.config.patch_size
        n = len(rows)
        partners = [t for t in names if t != name and batch[t].shape[0] == batch[name].shape[0]]
        target = torch.full((n,), -1, dtype=torch.long, device=rows.device)
        if partners and self.config.cross_sensor_ratio > 0:
            avail = torch.stack([present[t][rows] for t in partners], dim=1)
            pick = torch.rand(avail.shape, device=rows.device).masked_fill(~avail, -1.0).argmax(dim=1)
            cross = (torch.rand(n, device=rows.device) < self.config.cross_sensor_ratio) & avail.any(dim=1)
            target = torch.where(cross, pick, target)
        pix = mask.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)[:, None]
        total, count = latent.new_zeros(()), latent.new_zeros(())
        for ti, t in [(-1, name), *enumerate(partners)]:
            sel = target == ti
            if not sel.any():
                # Every candidate decoder runs, here on one row weighted 0, so that every data-parallel rank
                # computes gradients for the same parameters (DeepSpeed reduces them rank by rank, in order).
                total = total + 0.0 * self.decoders[t](latent[:1]).sum()
                continue
            src = rows[sel]
            pred = self.decoders[t](latent[sel])
            weight = pix[sel].to(pred.dtype) * layout.valid(batch, t)[src][:, None].to(pred.dtype)
            total = total + ((pred - batch[t][src]).abs() * weight).sum() / pred.shape[1]
            count = count + weight.sum()
        return total / count.clamp_min(1e-5)

    def _distill_loss(self, rgb: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """1 - cosine(projected pooled student stage, pooled frozen-teacher stage) on the unmasked image."""
        with torch.no_grad():
            teacher = self.teacher.forward_intermediates(
                rgb, indices=[self.config.distill_stage], intermediates_only=True
            )[0].mean(dim=(2, 3))
        z = self.projector(student.mean(dim=(1, 2)))
        return 1.0 - F.cosine_similarity(z, teacher, dim=-1).mean()

    def encode(self, batch: Batch) -> dict[str, list[torch.Tensor]]:
        """Every Swin stage per sensor as (B, D_i, h_i, w_i), strides ``encoder.out_strides``."""
        return {
            name: [f.permute(0, 3, 1, 2) for f in self.encoder(self.patch_embed(batch[name], name))]
            for name in self._sensors_in(batch)
        }
