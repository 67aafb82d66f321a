"""SkySense geo-context prototypes and the Sinkhorn-Knopp assignment they are learned with.

The globe is cut into a lat/lon grid of regions; each region owns ``N_p`` prototype
vectors. A sample's fused features attend to its region's prototypes (Eq. 3), which
adds regional context a single chip cannot see. The prototypes are never trained by
gradients: each step assigns the features to them with Sinkhorn-Knopp (balanced, so no
prototype is left empty and none takes everything; Eq. 11) and moves them towards the
assignment-weighted means by EMA (Eqs. 12-13). Updates are collected during ``forward``
and applied by :meth:`GeoPrototypes.step`, which the recipe calls after the optimiser
step; across data-parallel ranks every rank applies the same, gathered update.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Balanced soft assignment of N rows to K columns, batched over leading dims.

    ``scores`` (..., N, K) similarities -> (..., N, K), each row summing to 1 and each
    column receiving (close to) the same total, N / K. Rows with ``row_weight`` 0 (padding,
    nodata) get all-zero rows and take no share of the columns. Runs in float32 whatever
    the input dtype: ``exp(score / epsilon)`` overflows half precision.
    """
    s = scores.float() / epsilon
    q = torch.exp(s - s.amax(dim=(-2, -1), keepdim=True))
    if row_weight is None:
        row_weight = torch.ones(q.shape[:-1], device=q.device)
    rows = row_weight.float()
    rows = rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    q = q * (rows > 0).unsqueeze(-1)
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(iterations):
        q = q / q.sum(dim=-2, keepdim=True).clamp_min(tiny) / q.shape[-1]
        q = q / q.sum(dim=-1, keepdim=True).clamp_min(tiny) * rows.unsqueeze(-1)
    return (q / rows.unsqueeze(-1).clamp_min(tiny)).to(scores.dtype)


def region_index(lonlat: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``lonlat`` (B, 2) degrees -> (B,) int64 index into an equal-angle ``(n_lat, n_lon)`` grid."""
    n_lat, n_lon = grid
    lon = torch.remainder(lonlat[:, 0].float() + 180.0, 360.0)
    lat = lonlat[:, 1].float().clamp(-90.0, 90.0) + 90.0
    row = (lat / 180.0 * n_lat).long().clamp(0, n_lat - 1)
    col = (lon / 360.0 * n_lon).long().clamp(0, n_lon - 1)
    return row * n_lon + col


class GeoPrototypes(nn.Module):
    def __init__(
        self,
        region_grid: tuple[int, int],
        num_prototypes: int,
        dim: int,
        momentum: float = 0.99,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
    ):
        super().__init__()
        self.region_grid = tuple(region_grid)
        self.momentum = momentum
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        # A parameter (the paper counts it in the model size) that no gradient ever reaches.
        self.prototypes = nn.Parameter(
            torch.randn(math.prod(self.region_grid), num_prototypes, dim), requires_grad=False
        )
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def regions(self, lonlat: torch.Tensor) -> torch.Tensor:
        return region_index(lonlat, self.region_grid)

    def attend(self, features: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """Eq. 3: ``softmax(F P_r^T / sqrt(d)) P_r`` for features (B, N, d) and regions (B,)."""
        protos = self.prototypes[region].to(features.dtype)
        weights = torch.softmax(features @ protos.transpose(1, 2) / math.sqrt(features.shape[-1]), dim=-1)
        return weights @ protos

    def assign(self, features: torch.Tensor, region: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Sinkhorn assignment (B, N, N_p) of features (B, N, d) to their region's prototypes (Eq. 11)."""
        cosine = F.normalize(features, dim=-1) @ F.normalize(self.prototypes[region], dim=-1).transpose(1, 2)
        return sinkhorn(cosine, self.sinkhorn_epsilon, self.sinkhorn_iterations, weight)

    @torch.no_grad()
    def collect(self, features: torch.Tensor, region: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Queue this batch's update; ``weight`` (B, N) leaves out invalid cells."""
        features = features.detach().float()
        assignment = self.assign(features, region, weight)
        # Column-normalised, so an update is a weighted mean and stays on the features' scale.
        mass = assignment.sum(dim=1).unsqueeze(-1)
        update = assignment.transpose(1, 2) @ features / mass.clamp_min(1e-6)
        seen = mass.squeeze(-1).sum(dim=-1) > 0
        self._pending.append((region[seen], update[seen]))

    @torch.no_grad()
    def step(self) -> None:
        """Apply the queued updates (Eq. 13); a region seen k times moves towards the mean of its k updates."""
        protos = self.prototypes.data
        pending, self._pending = self._pending, []
        region = torch.cat([r for r, _ in pending]) if pending else protos.new_zeros(0, dtype=torch.long)
        update = torch.cat([u for _, u in pending]) if pending else protos.new_zeros(0, *protos.shape[1:])
        # Every rank takes part in the gather, even with nothing queued, or the others would wait forever.
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (region.cpu(), update.cpu()))
            region = torch.cat([r for r, _ in gathered]).to(protos.device)
            update = torch.cat([u for _, u in gathered]).to(protos.device)
        if region.numel() == 0:
            return
        touched, slot = torch.unique(region, return_inverse=True)
        sums = update.new_zeros((len(touched), *update.shape[1:])).index_add_(0, slot, update)
        target = sums / torch.bincount(slot, minlength=len(touched)).to(sums.dtype)[:, None, None]
        protos[touched] = (protos[touched] * self.momentum + target * (1.0 - self.momentum)).to(protos.dtype)
