"""Contrastive objectives: InfoNCE, MaRS cross-granularity contrast, and the DINO-style
self-distillation SkySense uses at pixel, object and image level.

Every similarity here is cosine over the feature (last) axis.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from earthray.models.geo_prototypes import sinkhorn


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row ``i`` of ``query`` (M, D) must pick row ``i`` of ``key`` (M, D) among all rows."""
    logits = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def cgcl_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperatures: tuple[float, float, float] = (0.1, 0.05, 0.07),
    weights: tuple[float, float, float] = (0.5, 0.3, 0.2),
) -> dict[str, torch.Tensor]:
    """MaRS cross-granularity contrastive learning between two modalities' patch tokens (B, N, D).

    - ``patch``: each patch matches the patch at the same place of the same sample in the
      other modality, among that sample's N patches;
    - ``image``: each sample's mean token matches its pair's among the B samples;
    - ``cross`` (patch-to-global): each patch matches the mean token of *its own sample* in
      the other modality among the B samples, logits (B*N, B), target the patch's sample.

    Every term is symmetric (a->b and b->a averaged). Returns the three terms and their
    weighted sum under ``"cgcl"``.
    """
    t_patch, t_image, t_cross = temperatures
    batch, tokens, _ = z_a.shape
    a, b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
    ga, gb = F.normalize(z_a.mean(dim=1), dim=-1), F.normalize(z_b.mean(dim=1), dim=-1)

    same_place = torch.arange(tokens, device=z_a.device).repeat(batch)
    logits = a @ b.transpose(1, 2) / t_patch
    patch = 0.5 * (
        F.cross_entropy(logits.flatten(0, 1), same_place)
        + F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), same_place)
    )

    same_sample = torch.arange(batch, device=z_a.device)
    logits = ga @ gb.T / t_image
    image = 0.5 * (F.cross_entropy(logits, same_sample) + F.cross_entropy(logits.T, same_sample))

    owner = same_sample.repeat_interleave(tokens)
    cross = 0.5 * (
        F.cross_entropy(a.flatten(0, 1) @ gb.T / t_cross, owner)
        + F.cross_entropy(b.flatten(0, 1) @ ga.T / t_cross, owner)
    )
    w_patch, w_image, w_cross = weights
    return {
        "patch": patch,
        "image": image,
        "cross": cross,
        "cgcl": w_patch * patch + w_image * image + w_cross * cross,
    }


class DINOHead(nn.Module):
    """DINO projection head: MLP to a bottleneck, then cosine similarity to ``out_dim`` prototypes.

    Cosine against unit-norm prototype rows is DINO's weight-normalised last layer with its
    gain fixed to 1 (the default ``norm_last_layer``), written without a parametrisation so
    a frozen copy of the head is an ordinary module.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


class DINOLoss(nn.Module):
    """Cross-entropy from the centred, sharpened teacher distribution to the student's.

    The centre (a running mean of teacher outputs) is what keeps one prototype from taking
    every sample. Batch means are queued by ``forward`` and folded in by :meth:`update_center`
    after the optimiser step, averaged over data-parallel ranks.
    """

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04, center_momentum: float = 0.9
    ):
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(out_dim))
        self.register_buffer("_pending", torch.zeros(out_dim + 1), persistent=False)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``student``/``teacher`` logits (M, K); ``weight`` (M,) counts each row (0 drops it)."""
        weight = torch.ones(len(student), device=student.device) if weight is None else weight.float()
        teacher = teacher.detach().float()
        target = torch.softmax((teacher - self.center) / self.teacher_temp, dim=-1)
        per_row = -(target * torch.log_softmax(student.float() / self.student_temp, dim=-1)).sum(dim=-1)
        if self.training:
            with torch.no_grad():
                self._pending[:-1] += (teacher * weight[:, None]).sum(dim=0)
                self._pending[-1] += weight.sum()
        return (per_row * weight).sum() / weight.sum().clamp_min(1e-6)

    def held_bytes(self) -> int:
        """Bytes of the running sum of teacher outputs kept between steps (fixed: ``out_dim + 1`` floats)."""
        return self._pending.numel() * self._pending.element_size()

    @torch.no_grad()
    def update_center(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._pending)
        if self._pending[-1] > 0:
            batch_center = self._pending[:-1] / self._pending[-1]
            self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
        self._pending.zero_()


def cluster_assignment(
    features: torch.Tensor, num_clusters: int, weight: torch.Tensor | None = None, iterations: int = 3
) -> torch.Tensor:
    """Soft clustering of each image's cells into objects (SkySense object level), batched.

    ``features`` (B, N, D) -> (B, N, C) column-normalised weights: ``weights^T @ features``
    gives C object features per image. Centroids start at C evenly spaced cells and cells
    are assigned by Sinkhorn-Knopp, the same balanced assignment the geo prototypes use;
    computing it once (from the teacher) and pooling both branches with it pairs the
    student's objects with the teacher's.
    """
    start = torch.linspace(0, features.shape[1] - 1, num_clusters, device=features.device).round().long()
    unit = F.normalize(features.detach().float(), dim=-1)
    assignment = sinkhorn(unit @ unit[:, start].transpose(1, 2), iterations=iterations, row_weight=weight)
    return assignment / assignment.sum(dim=1, keepdim=True).clamp_min(1e-6)
