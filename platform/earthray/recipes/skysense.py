"""SkySense (Guo et al., CVPR 2024): factorised multi-modal spatio-temporal pretraining.

Three roles, each filled by one of the given sensors:

- ``hr``: a static high-resolution optical image (optical, GSD < 10 m), Swin encoder;
- ``ms``: a multispectral time series (optical, GSD >= 10 m, e.g. Sentinel-2), ViT per date;
- ``sar``: a SAR time series (e.g. Sentinel-1), ViT per date.

``hr_sensor`` / ``ms_sensor`` / ``sar_sensor`` name a role's sensor explicitly (e.g.
``hr_sensor: s2_l2a_10m`` lets Sentinel-2's 10 m bands stand in for the HR view where no
finer image exists); sensors not named go by the kind/GSD rule above.

Spatial features of every image are projected to one width and resized to one grid; each
grid cell's sequence ``[HR, MS_t + DOY, SAR_t + DOY]`` goes through the temporal fusion
transformer (padded dates and absent modalities masked out), and the fused feature is
concatenated with attention over its region's geo-context prototypes.

Pretraining is teacher-student: the teacher is an EMA of the student and sees a second
augmentation of the same sample. The teacher, the geo prototypes and the DINO centres move
in ``on_step_end``, which the training loop runs once after every optimiser step (on
gathered weights under ZeRO-3); ``stateful_tensors`` lists them. Multi-granularity
contrastive learning (MGCL) matches student to teacher with DINO's loss at pixel level,
object level (cells clustered per image with Sinkhorn-Knopp) and image level, on every
modality's features and on the fused ones; cross-modal alignment is InfoNCE between the
student's pooled features of different modalities of the same sample.
``loss = alpha * mgcl + beta * align``. The prototypes learn without a loss term.

The two views differ photometrically (band gain/offset jitter, noise) and in their
acquisition dates (jittered day of year); they stay pixel-aligned so that pixel and object
features have their counterparts, so the paper's multi-crop of the HR image is not used.
After pretraining the paper fine-tunes from the teacher: exporting a pretraining bundle
calls ``prepare_downstream``, which copies the teacher into the student (``adopt_teacher``),
the branch ``encode`` runs, so fine-tuning, frozen-feature evaluation, sweep probes and
serving all start from the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from earthray.data import batch as layout
from earthray.errors import ConfigError
from earthray.models.backbones import SwinEncoder, ViTEncoder
from earthray.models.contrastive import DINOHead, DINOLoss, cluster_assignment, info_nce
from earthray.models.ema import ema_update_, frozen_copy
from earthray.models.geo_prototypes import GeoPrototypes
from earthray.models.patch_embed import SensorPatchEmbed
from earthray.models.temporal import DAYS_PER_YEAR, TemporalFusion
from earthray.recipes.base import Batch, Recipe, RecipeConfig, register_recipe
from earthray.sensors import Sensor

GRANULARITIES = ("pix", "obj", "img")
FUSION = "fusion"


class SkySenseConfig(RecipeConfig):
    hr_img_size: int = 512
    hr_patch_size: int = 4
    hr_embed_dim: int = 352
    hr_depths: tuple[int, ...] = (2, 2, 18, 2)
    hr_num_heads: tuple[int, ...] = (11, 22, 44, 88)
    hr_window_size: int = 8
    ts_img_size: int = 16
    ts_patch_size: int = 4
    ts_embed_dim: int = 1024
    ts_depth: int = 24
    ts_num_heads: int = 16
    grid_size: int = 16
    """Side of the common grid, in cells, every modality's features are resized to."""
    dim: int = 1024
    fusion_depth: int = 24
    fusion_heads: int = 16
    region_grid: tuple[int, int] = (64, 64)
    num_prototypes: int = 100
    prototype_momentum: float = 0.99
    head_out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    num_objects: int = 8
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    """Constant EMA momentum of the teacher (DINO's starting value; DINO anneals it to 1)."""
    align_dim: int = 256
    align_temperature: float = 0.07
    jitter: float = 0.1
    noise: float = 0.05
    doy_jitter: int = 7
    """Each view shifts every acquisition date by up to this many days ("random disturbances")."""
    alpha: float = 1.0
    beta: float = 1.0
    hr_sensor: str | None = None
    """The sensor in the HR role (Swin); None: the optical sensor with GSD < 10 m, if any."""
    ms_sensor: str | None = None
    """The sensor in the multispectral time-series role; None: the optical sensor with GSD >= 10 m, if any."""
    sar_sensor: str | None = None
    """The sensor in the SAR time-series role; None: the sensor of kind "sar", if any."""


ROLES = ("hr", "ms", "sar")


def assign_roles(sensors: Sequence[Sensor], named: dict[str, str | None] | None = None) -> dict[str, str]:
    """Role -> sensor name, in the sensors' order; one sensor per role at most, every sensor in a role.

    ``named`` (role -> sensor name or None) puts those sensors in those roles; every other
    sensor goes by kind and GSD: SAR -> ``sar``, optical finer than 10 m -> ``hr``, other
    optical -> ``ms``.
    """
    names = [s.name for s in sensors]
    explicit: dict[str, str] = {}
    for role, name in (named or {}).items():
        if role not in ROLES:
            raise ConfigError(f"skysense has no role {role!r}; roles: {', '.join(ROLES)}")
        if name is None:
            continue
        if name not in names:
            raise ConfigError(f"skysense: {role}_sensor {name!r} is not among the sensors {names}")
        if name in explicit:
            raise ConfigError(f"skysense: sensor {name!r} is named for two roles, {explicit[name]} and {role}")
        explicit[name] = role
    roles: dict[str, str] = {}
    for s in sensors:
        if s.name in explicit:
            role = explicit[s.name]
        elif s.kind == "sar":
            role = "sar"
        elif s.kind == "optical":
            role = "hr" if s.gsd < 10 else "ms"
        else:
            raise ConfigError(f"skysense has no role for {s.kind} sensor {s.name!r}")
        if role in roles:
            raise ConfigError(f"skysense takes one {role} sensor, got {roles[role]!r} and {s.name!r}")
        roles[role] = s.name
    return roles


class SkySenseNet(nn.Module):
    """Everything the EMA teacher mirrors: spatial encoders, fusion, projection heads."""

    def __init__(self, c: SkySenseConfig, roles: dict[str, str], channels: dict[str, int]):
        super().__init__()
        self.grid = (c.grid_size, c.grid_size)
        self.embed = nn.ModuleDict()
        self.spatial = nn.ModuleDict()
        self.to_dim = nn.ModuleDict()
        for role, sensor in roles.items():
            if role == "hr":
                self.embed[sensor] = SensorPatchEmbed(channels[sensor], c.hr_embed_dim, c.hr_patch_size)
                encoder = SwinEncoder(
                    c.hr_img_size, c.hr_patch_size, c.hr_embed_dim, c.hr_depths, c.hr_num_heads,
                    c.hr_window_size, v2=True,
                )
                # SkySense never masks its input, so the SimMIM token has nothing to learn.
                encoder.mask_token.requires_grad_(False)
                width = encoder.out_dims[-1]
            else:
                self.embed[sensor] = SensorPatchEmbed(channels[sensor], c.ts_embed_dim, c.ts_patch_size)
                tokens = (c.ts_img_size // c.ts_patch_size) ** 2
                encoder = ViTEncoder(tokens, c.ts_embed_dim, c.ts_depth, c.ts_num_heads)
                width = c.ts_embed_dim
            self.spatial[sensor] = encoder
            self.to_dim[sensor] = nn.Linear(width, c.dim)
        self.fusion = TemporalFusion(c.dim, c.fusion_depth, c.fusion_heads)
        head = dict(out_dim=c.head_out_dim, hidden_dim=c.head_hidden_dim, bottleneck_dim=c.head_bottleneck_dim)
        self.heads = nn.ModuleDict({s: DINOHead(c.dim, **head) for s in roles.values()})
        self.heads[FUSION] = DINOHead(2 * c.dim, **head)

    def stages(self, sensor: str, images: torch.Tensor) -> list[torch.Tensor]:
        """One image per row (N, C, H, W) -> the encoder's feature maps, channels-last."""
        tokens = self.embed[sensor](images)
        encoder = self.spatial[sensor]
        if isinstance(encoder, SwinEncoder):
            return encoder(tokens)
        return encoder.forward_grids(tokens.flatten(1, 2), num_outputs=min(4, len(encoder.blocks)))

    def cells(self, sensor: str, last: torch.Tensor) -> torch.Tensor:
        """Last-stage features (N, h, w, D) -> (N, g, g, dim) on the common grid."""
        x = self.to_dim[sensor](last).permute(0, 3, 1, 2)
        if tuple(x.shape[-2:]) != self.grid:
            x = F.interpolate(x, size=self.grid, mode="bilinear", align_corners=False)
        return x.permute(0, 2, 3, 1)


@dataclass
class _View:
    """One view of a batch, per sensor: images (B, T, C, H, W), day of year (B, T) (0 = undated),
    which dates count (B, T) and which grid cells are valid (B, T, g, g)."""

    images: dict[str, torch.Tensor] = field(default_factory=dict)
    doy: dict[str, torch.Tensor] = field(default_factory=dict)
    dates: dict[str, torch.Tensor] = field(default_factory=dict)
    cells: dict[str, torch.Tensor] = field(default_factory=dict)


@register_recipe
class SkySense(Recipe):
    name = "skysense"
    Config = SkySenseConfig
    presets = {
        "tiny": dict(
            hr_img_size=64, hr_embed_dim=16, hr_depths=(1, 1, 1), hr_num_heads=(1, 2, 4), hr_window_size=4,
            ts_embed_dim=32, ts_depth=1, ts_num_heads=2, grid_size=4, dim=32, fusion_depth=1, fusion_heads=2,
            region_grid=(2, 4), num_prototypes=4, head_out_dim=64, head_hidden_dim=64, head_bottleneck_dim=16,
            num_objects=4, teacher_momentum=0.9, align_dim=16,
        ),
        # Not in the paper: Swin-B and ViT-B encoders, a ViT-B sized fusion, 512 regions.
        "base": dict(
            hr_embed_dim=128, hr_num_heads=(4, 8, 16, 32), ts_embed_dim=768, ts_depth=12, ts_num_heads=12,
            dim=768, fusion_depth=12, fusion_heads=12, region_grid=(16, 32),
        ),
        # The paper's: Swin-H (SwinV2's C=352), ViT-L per date, 4096 regions x 100 prototypes.
        "huge": dict(),
    }
    paper_params = {"huge": 2.06e9}
    paper_sensors = {
        "vhr_rgb": None,
        "s2_l2a": ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"],
        "s1_grd": None,
    }

    def __init__(self, config: SkySenseConfig, sensors: Sequence[Sensor]):
        super().__init__(config, sensors)
        c = config
        self.roles = assign_roles(sensors, {"hr": c.hr_sensor, "ms": c.ms_sensor, "sar": c.sar_sensor})
        self.student = SkySenseNet(c, self.roles, {s.name: len(s.bands) for s in sensors})
        self.teacher = frozen_copy(self.student)
        self.prototypes = GeoPrototypes(c.region_grid, c.num_prototypes, c.dim, c.prototype_momentum)
        self.align = nn.ModuleDict({s: nn.Linear(c.dim, c.align_dim) for s in self.roles.values()})
        dino = (c.head_out_dim, c.student_temp, c.teacher_temp, c.center_momentum)
        self.dino = nn.ModuleDict(
            {
                source: nn.ModuleDict({g: DINOLoss(*dino) for g in GRANULARITIES})
                for source in [*self.roles.values(), FUSION]
            }
        )

    def train(self, mode: bool = True) -> SkySense:
        super().train(mode)
        self.teacher.eval()
        return self

    # ----- inputs -------------------------------------------------------------------------

    def _inputs(self, batch: Batch, augment: bool) -> _View:
        view = _View()
        c = self.config
        for sensor in self.roles.values():
            if sensor not in batch:
                continue
            x = batch[sensor]
            if x.dim() == 4:
                x = x.unsqueeze(1)
            b, t = x.shape[:2]
            doy = layout.doy(batch, sensor)
            dates = layout.tmask(batch, sensor) & layout.present(batch, sensor)[:, None]
            valid = layout.valid(batch, sensor).reshape(b, t, *x.shape[-2:]).float()
            cells = (F.adaptive_avg_pool2d(valid, self.student.grid) > 0.5) & dates[:, :, None, None]
            if augment:
                gain = 1 + c.jitter * torch.randn(b, t, x.shape[2], 1, 1, device=x.device, dtype=x.dtype)
                offset = c.jitter * torch.randn(b, t, x.shape[2], 1, 1, device=x.device, dtype=x.dtype)
                x = x * gain + offset + c.noise * torch.randn_like(x)
                shift = torch.randint(-c.doy_jitter, c.doy_jitter + 1, doy.shape, device=doy.device)
                doy = torch.where(doy > 0, (doy - 1 + shift) % DAYS_PER_YEAR + 1, doy)
            view.images[sensor], view.doy[sensor], view.dates[sensor], view.cells[sensor] = x, doy, dates, cells
        return view

    # ----- one branch (student or teacher) --------------------------------------------------

    def _stages(self, net: SkySenseNet, view: _View) -> dict[str, list[torch.Tensor]]:
        """Per sensor, the encoder's maps (B, T, h, w, D); only dates that count are encoded, the rest are 0."""
        out = {}
        for sensor, x in view.images.items():
            b, t = x.shape[:2]
            keep = view.dates[sensor].flatten()
            if not keep.any():
                continue
            levels = []
            for kept in net.stages(sensor, x.flatten(0, 1)[keep]):
                full = kept.new_zeros(b * t, *kept.shape[1:])
                full[keep] = kept
                levels.append(full.view(b, t, *kept.shape[1:]))
            out[sensor] = levels
        return out

    def _cells(self, net: SkySenseNet, stages: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per sensor (B, T, g, g, dim) on the common grid."""
        return {s: net.cells(s, maps[-1].flatten(0, 1)).unflatten(0, maps[-1].shape[:2]) for s, maps in stages.items()}

    def _fuse(
        self, net: SkySenseNet, cells: dict[str, torch.Tensor], view: _View, region: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> F_mm (B, g, g, dim) from the temporal fusion, and F_fus (B, g, g, 2 dim) with geo-context."""
        sensors = list(cells)
        b = next(iter(cells.values())).shape[0]
        g = net.grid
        seq = torch.cat([cells[s] for s in sensors], dim=1)
        valid = torch.cat([view.cells[s] for s in sensors], dim=1)
        doy = torch.cat([view.doy[s] for s in sensors], dim=1)
        length = seq.shape[1]
        mm = net.fusion(
            seq.permute(0, 2, 3, 1, 4).reshape(b * g[0] * g[1], length, -1),
            doy[:, None, None, :].expand(-1, *g, -1).reshape(-1, length),
            valid.permute(0, 2, 3, 1).reshape(-1, length),
        ).view(b, *g, -1)
        if region is None:
            context = torch.zeros_like(mm)
        else:
            context = self.prototypes.attend(mm.flatten(1, 2), region).view_as(mm)
        return mm, torch.cat([mm, context], dim=-1)

    # ----- losses -----------------------------------------------------------------------------

    def _fgcl(
        self, source: str, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """Pixel + object + image DINO losses for features (M, N, d) of M images of N cells each."""
        s_head, t_head = self.student.heads[source], self.teacher.heads[source]
        losses = self.dino[source]
        keep = weight > 0
        total = losses["pix"](s_head(student[keep]), t_head(teacher[keep]))

        assign = cluster_assignment(teacher, self.config.num_objects, weight.float())
        images = keep.any(dim=1)
        s_obj = (assign.transpose(1, 2) @ student)[images].flatten(0, 1)
        t_obj = (assign.transpose(1, 2) @ teacher)[images].flatten(0, 1)
        total = total + losses["obj"](s_head(s_obj), t_head(t_obj))

        w = weight.float().unsqueeze(-1)
        s_img = (student * w).sum(1) / w.sum(1).clamp_min(1e-6)
        t_img = (teacher * w).sum(1) / w.sum(1).clamp_min(1e-6)
        return total + losses["img"](s_head(s_img[images]), t_head(t_img[images]))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = self.config
        region = self.prototypes.regions(batch["lonlat"]) if "lonlat" in batch else None
        u, v = self._inputs(batch, augment=True), self._inputs(batch, augment=True)
        s_cells = self._cells(self.student, self._stages(self.student, u))
        s_mm, s_fus = self._fuse(self.student, s_cells, u, region)
        with torch.no_grad():
            t_cells = self._cells(self.teacher, self._stages(self.teacher, v))
            _, t_fus = self._fuse(self.teacher, t_cells, v, region)

        losses: dict[str, torch.Tensor] = {}
        for sensor, cells in s_cells.items():
            weight = u.cells[sensor].flatten(2).flatten(0, 1)
            losses[f"mgcl_{sensor}"] = self._fgcl(
                sensor, cells.flatten(0, 1).flatten(1, 2), t_cells[sensor].flatten(0, 1).flatten(1, 2), weight
            )
        fused_weight = torch.cat([u.cells[s] for s in s_cells], dim=1).any(dim=1).flatten(1)
        losses[f"mgcl_{FUSION}"] = self._fgcl(FUSION, s_fus.flatten(1, 2), t_fus.flatten(1, 2), fused_weight)
        losses["mgcl"] = sum(losses[f"mgcl_{s}"] for s in [*s_cells, FUSION])

        pooled, has = {}, {}
        for sensor, cells in s_cells.items():
            w = u.cells[sensor].unsqueeze(-1).float()
            pooled[sensor] = self.align[sensor]((cells * w).sum((1, 2, 3)) / w.sum((1, 2, 3)).clamp_min(1e-6))
            has[sensor] = u.cells[sensor].flatten(1).any(dim=1)
        align = s_fus.new_zeros(())
        for i in pooled:
            for j in pooled:
                both = has[i] & has[j]
                if i != j and both.any():
                    align = align + info_nce(pooled[i][both], pooled[j][both], c.align_temperature)
        losses["align"] = align
        losses["loss"] = c.alpha * losses["mgcl"] + c.beta * align

        if self.training and region is not None:
            self.prototypes.collect(s_mm.flatten(1, 2), region, fused_weight)
        return losses

    def comparable_parameters(self) -> int:
        """The student and the heads plus the geo prototypes (a buffer here, counted in the paper's 2.06 B)."""
        return super().comparable_parameters() + self.prototypes.prototypes.numel()

    def _dino_losses(self) -> list[DINOLoss]:
        return [loss for per_source in self.dino.values() for loss in per_source.values()]

    def on_step_end(self, step: int) -> None:
        """EMA of the student into the teacher, the queued prototype updates, the DINO centres."""
        ema_update_(self.teacher, self.student, self.config.teacher_momentum)
        self.prototypes.step()
        for loss in self._dino_losses():
            loss.update_center()

    def stateful_tensors(self) -> dict[str, torch.Tensor]:
        """The EMA teacher's weights, the geo prototypes and every DINO centre."""
        state = {f"teacher.{k}": v for k, v in self.teacher.state_dict(keep_vars=True).items()}
        state["prototypes.prototypes"] = self.prototypes.prototypes
        for source, per_granularity in self.dino.items():
            state.update({f"dino.{source}.{g}.center": loss.center for g, loss in per_granularity.items()})
        return state

    def held_bytes(self) -> int:
        """The prototypes' queued updates and the DINO losses' running sums of teacher outputs."""
        return self.prototypes.held_bytes() + sum(loss.held_bytes() for loss in self._dino_losses())

    def prepare_downstream(self) -> str:
        """Downstream tasks start from the EMA teacher, as in the paper: it is copied into the student."""
        self.adopt_teacher()
        return "ema_teacher"

    @torch.no_grad()
    def adopt_teacher(self) -> None:
        """Copy the EMA teacher into the student: the weights the paper fine-tunes from."""
        for name, param in self.student.named_parameters():
            param.copy_(self.teacher.get_buffer(name))

    def encode(self, batch: Batch) -> dict[str, list[torch.Tensor]]:
        """Features of whichever sensors the batch has, channels-first, from the student (which holds
        the EMA teacher's weights once ``prepare_downstream`` has run, as in every exported bundle).

        Per sensor, its encoder's feature maps: (B, D, h, w) for a single image, (B, T, D, h, w)
        for a time series (padded dates are zeros). ``"fusion"``: [(B, dim, g, g)], the fused
        multi-modal spatio-temporal feature; ``"fusion_geo"``: [(B, 2 dim, g, g)], the same
        with its geo-context, when the batch has ``"lonlat"``.
        """
        view = self._inputs(batch, augment=False)
        stages = self._stages(self.student, view)
        out: dict[str, list[torch.Tensor]] = {
            s: [m.permute(0, 1, 4, 2, 3) if batch[s].dim() == 5 else m[:, 0].permute(0, 3, 1, 2) for m in maps]
            for s, maps in stages.items()
        }
        if stages:
            region = self.prototypes.regions(batch["lonlat"]) if "lonlat" in batch else None
            mm, fus = self._fuse(self.student, self._cells(self.student, stages), view, region)
            out[FUSION] = [mm.permute(0, 3, 1, 2)]
            if region is not None:
                out[f"{FUSION}_geo"] = [fus.permute(0, 3, 1, 2)]
        return out
