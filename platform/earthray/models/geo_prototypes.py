"""SkySense geo-context prototypes and the Sinkhorn-Knopp assignment they are learned with.

The globe is cut into a lat/lon grid of regions; each region owns ``N_p`` prototype
vectors. A sample's fused features attend to its region's prototypes (Eq. 3), which
adds regional context a single chip cannot see. The prototypes are never trained by
gradients: each step assigns the features to them with Sinkhorn-Knopp (balanced, so no
prototype is left empty and none takes everything; Eq. 11) and moves them towards the
assignment-weighted means by EMA (Eqs. 12-13). Updates are collected during ``forward``
and applied by :meth:`GeoPrototypes.step`, which the recipe calls after the optimiser
step; across data-parallel ranks every rank applies the same, gathered update.

Between two steps the queued updates are folded into one sum and one count per region
touched, so what is held grows with the distinct regions seen, never with the number of
micro-batches, and no dense all-regions accumulator is ever allocated (the paper's
4096 regions x 100 prototypes x 1024 dims would be 1.6 GB).
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
    """``region_grid`` regions x ``num_prototypes`` prototype vectors of width ``dim``.

    The prototypes are a *buffer*, not a parameter. No gradient ever reaches them, and
    every read of them (``attend``, ``assign``) happens in methods the recipe calls from its
    own ``forward``, outside this module's ``forward``: as a ZeRO-3 parameter they would be
    partitioned and those reads would see an empty shard, since ZeRO-3 gathers a module's
    parameters only around that module's ``forward``. Gathering them explicitly instead would
    all-gather the whole table (the paper's is 419 M values) every micro-batch to read the
    few regions a batch touches. As a buffer each rank holds the whole table, updates it
    identically from the gathered update, and it stays float32 under bf16 mixed precision
    (DeepSpeed's bf16 mode casts parameters, not buffers), so the momentum-0.99 EMA is not
    lost to rounding. The paper counts them in its model size:
    ``SkySense.comparable_parameters`` adds them.
    """

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
        self.register_buffer("prototypes", torch.randn(math.prod(self.region_grid), num_prototypes, dim))
        self._reset_pending()

    def _reset_pending(self) -> None:
        """Queued updates: touched regions (R,), per-region sums of updates (R, N_p, d) and counts (R,)."""
        self._regions = torch.zeros(0, dtype=torch.long)
        self._sums = torch.zeros(0, *self.prototypes.shape[1:])
        self._counts = torch.zeros(0)

    def _take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queue (regions, sums, counts), emptied."""
        queue = self._regions, self._sums, self._counts
        self._reset_pending()
        return queue

    def held_bytes(self) -> int:
        """Bytes of the queued updates: one sum and one count per region touched since the last step."""
        return sum(t.numel() * t.element_size() for t in (self._regions, self._sums, self._counts))

    def regions(self, lonlat: torch.Tensor) -> torch.Tensor:
        return region_index(lonlat, self.region_grid)

    def attend(self, features: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """Eq. 3: ``softmax(F P_r^T / sqrt(d)) P_r`` for features (B, N, d) and regions (B,)."""
        protos = self.prototypes[region].to(features.dtype)
        weights = torch.softmax(features @ protos.transpose(1, 2) / math.sqrt(features.shape[-1]), dim=-1)
        return weights @ protos

    def assign(self, features: torch.Tensor, region: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Sinkhorn assignment (B, N, N_p) of features (B, N, d) to their region's prototypes (Eq. 11)."""
        protos = self.prototypes[region].to(features.dtype)
        cosine = F.normalize(features, dim=-1) @ F.normalize(protos, dim=-1).transpose(1, 2)
        return sinkhorn(cosine, self.sinkhorn_epsilon, self.sinkhorn_iterations, weight)

    @torch.no_grad()
    def collect(self, features: torch.Tensor, region: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Queue this batch's update; ``weight`` (B, N) leaves out invalid cells.

        Each sample's update (its assignment-weighted mean per prototype) is added to its
        region's running sum, and the region's count goes up by one.
        """
        features = features.detach().float()
        assignment = self.assign(features, region, weight)
        # Column-normalised, so an update is a weighted mean and stays on the features' scale.
        mass = assignment.sum(dim=1).unsqueeze(-1)
        update = assignment.transpose(1, 2) @ features / mass.clamp_min(1e-6)
        seen = mass.squeeze(-1).sum(dim=-1) > 0
        self._fold(region[seen], update[seen], torch.ones(int(seen.sum()), device=update.device))

    def _fold(self, region: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Merge (region, sum, count) rows into the queue, one row per distinct region."""
        if region.numel() == 0:
            return
        device = sums.device
        regions = torch.cat([self._regions.to(device), region.to(device)])
        touched, slot = torch.unique(regions, return_inverse=True)
        merged = sums.new_zeros((len(touched), *sums.shape[1:]))
        merged.index_add_(0, slot, torch.cat([self._sums.to(device, sums.dtype), sums]))
        total = counts.new_zeros(len(touched)).index_add_(0, slot, torch.cat([self._counts.to(device), counts]))
        self._regions, self._sums, self._counts = touched, merged, total

    @torch.no_grad()
    def step(self) -> None:
        """Apply the queued updates (Eq. 13); a region seen k times moves towards the mean of its k updates."""
        protos = self.prototypes
        region, sums, counts = self._take()
        # Every rank takes part in the gather, even with nothing queued, or the others would wait forever.
        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (region.cpu(), sums.cpu(), counts.cpu()))
            for rank_queue in gathered:
                self._fold(*rank_queue)
            region, sums, counts = self._take()
        if region.numel() == 0:
            return
        region, sums, counts = region.to(protos.device), sums.to(protos.device), counts.to(protos.device)
        target = sums / counts[:, None, None]
        protos[region] = (protos[region] * self.momentum + target * (1.0 - self.momentum)).to(protos.dtype)
