"""Fine-tuning: a pretrained recipe's encoder plus a task head, as one module the training loop runs.

Tasks, as in the papers' downstream evaluations:

- ``classification`` / ``multilabel``: scene labels; derived from a land-cover chip when the data
  has per-pixel labels (``label_from: majority`` or ``presence``).
- ``segmentation``: per-pixel classes (``label``, -1 = unlabelled).
- ``change``: a siamese encoder over the first and last date of a time series; labels come from
  the data or are derived where the physical change exceeds ``change_threshold``.
- ``regression`` / ``translation``: a target sensor's pixels (elevation from optical; SAR to
  optical, cloud removal), loss and metrics on the target's valid pixels only.

A multi-sensor model predicts whatever subset of its input sensors a sample has
(``fuse_sensors`` averages the present ones: MaRS's missing-modality setting).
The encoder is ``frozen``, ``partial`` (its last ``train_layers`` blocks train) or ``full``, with
layer-wise learning-rate decay via ``layer_ids``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from earthray.data import batch as layout
from earthray.data import schema
from earthray.errors import ConfigError, DataError
from earthray.metrics import class_metrics
from earthray.models.heads import create_head, fuse_sensors
from earthray.recipes.base import Batch, Recipe
from earthray.task_types import TASKS, Task

_EMBED = ("patch_embed", "pos_embed", "cls_token", "mask_token", ".embed.", "embeds.")


class TaskSpec(BaseModel):
    """What to predict and how much of the encoder trains; stored in the bundle as its ``head_spec``."""

    model_config = ConfigDict(extra="forbid")

    task: Task
    classes: list[str] | None = Field(None, description="class names (default: the labelled data's)")
    inputs: list[str] | None = Field(None, description="sensors the encoder sees (default: all but the target)")
    target: str | None = Field(None, description="regression/translation: the sensor whose pixels are predicted")
    target_bands: list[str] | None = Field(None, description="filled from the data: the target's bands")
    target_stats: dict[str, list[float]] | None = Field(None, description="the target's mean/std (de-normalising)")
    data_range: float | None = Field(None, gt=0, description="translation PSNR/SSIM span (default: 8 std)")
    label_from: Literal["label", "majority", "presence"] = "label"
    presence_min: float = Field(0.05, gt=0, le=1, description="multilabel from a chip: class share to count")
    ignore_index: int = Field(schema.IGNORE, description="the label losses and metrics skip")
    change_threshold: float = Field(3.0, gt=0, description="derived change: mean |after - before|, physical units")
    head_channels: int = Field(64, ge=8)
    dropout: float = Field(0.0, ge=0, lt=1)
    encoder: Literal["frozen", "partial", "full"] = "full"
    train_layers: int = Field(2, ge=1, description="partial: how many of the encoder's last blocks train")
    layer_decay: float = Field(1.0, gt=0, le=1, description="lr x layer_decay^(depth from the top)")

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if not TASKS[self.task].classes and not self.target:
            raise ValueError(f"task {self.task!r} needs a target sensor")
        return self

    @property
    def outputs(self) -> int:
        if self.task == "change":
            return 2
        if not TASKS[self.task].classes:
            if not self.target_bands:
                raise ConfigError("target_bands unknown: the target sensor's bands come from the data")
            return len(self.target_bands)
        if not self.classes:
            raise ConfigError(f"task {self.task!r} needs classes (from the spec or the data's labels)")
        return len(self.classes)


class TaskModel(nn.Module):
    def __init__(self, encoder: Recipe, spec: TaskSpec, input_size: int):
        super().__init__()
        unknown = [s for s in (spec.inputs or []) if s not in encoder.sensors]
        if unknown:
            raise ConfigError(f"inputs {unknown} are not sensors of the encoder ({', '.join(encoder.sensors)})")
        self.encoder, self.spec, self.input_size = encoder, spec, input_size
        self.inputs = spec.inputs or [s for s in encoder.sensors if s != spec.target]
        if not self.inputs:
            raise ConfigError(f"no input sensors: the encoder has only {list(encoder.sensors)} and the target is "
                             f"{spec.target!r}")
        used, dims = self._probe()
        self.in_dims = dims
        self.head = create_head(TASKS[spec.task].head, dims, spec.outputs, **self._head_kwargs())
        self._layers = self._layer_ids()
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(name in used and self._trains(name))

    def _head_kwargs(self) -> dict[str, Any]:
        if TASKS[self.spec.task].head == "classification":
            return {"dropout": self.spec.dropout}
        return {"channels": self.spec.head_channels}

    @property
    def head_spec(self) -> dict[str, Any]:
        return {**self.spec.model_dump(), "in_dims": self.in_dims, "input_size": self.input_size}

    @classmethod
    def from_bundle(cls, bundle, spec: TaskSpec | None = None) -> TaskModel:
        """The bundle's encoder with its own fine-tuned head, or with a new head for ``spec``."""
        stored = None
        if bundle.head_spec:
            stored = TaskSpec.model_validate({k: v for k, v in bundle.head_spec.items()
                                              if k not in ("in_dims", "input_size")})
        if spec is None and stored is None:
            raise ConfigError(f"{bundle.path}: the bundle has no head; give a task spec to fine-tune one")
        spec = spec or stored
        model = cls(bundle.model, spec, bundle.input_size)
        if bundle.head is not None and spec == stored:
            model.head.load_state_dict(bundle.head)
        return model

    # ------------------------------------------------------------------------------------- structure

    def _dummy(self) -> dict[str, torch.Tensor]:
        device = next(self.encoder.parameters()).device
        return {s: torch.zeros(1, len(self.encoder.sensors[s].bands), self.input_size, self.input_size,
                               device=device) for s in self.inputs}

    def _probe(self) -> tuple[set[str], list[int]]:
        """Which encoder parameters ``encode`` reaches for these inputs, and the feature dims per level.

        Decoders, projectors and other sensors' embeddings are not reached; they stay frozen
        (no optimiser state, nothing for DDP to wait for)."""
        was = self.encoder.training
        self.encoder.eval()
        with torch.enable_grad():
            feats = self.features(self._dummy(), frozen=False)
            sum(f.float().sum() for f in feats).backward()
        used = {n for n, p in self.encoder.named_parameters() if p.grad is not None}
        self.encoder.zero_grad(set_to_none=True)
        self.encoder.train(was)
        return used, [f.shape[1] for f in feats]

    def _layer_ids(self) -> dict[str, int]:
        """Encoder depth per parameter: embeddings 0, then each transformer block in order (counted
        per encoder, so two-encoder recipes decay each from its own top), everything else on top."""
        ids: dict[str, int] = {}
        counters: dict[str, dict[str, int]] = {}
        for name, _ in self.encoder.named_parameters():
            block = re.search(r"^(.*?)((?:stages|layers)\.\d+\.)?blocks\.\d+\.", name)
            if any(k in name for k in _EMBED) and not block:
                ids[name] = 0
            elif block:
                seen = counters.setdefault(block.group(1), {})
                ids[name] = seen.setdefault(block.group(0), len(seen) + 1)
            else:
                ids[name] = -1
        depth = max([len(c) for c in counters.values()] or [0]) + 1
        return {n: (depth if i < 0 else i) for n, i in ids.items()} | {"__depth__": depth}

    def _trains(self, name: str) -> bool:
        mode = self.spec.encoder
        if mode == "frozen":
            return False
        return mode == "full" or self._layers[name] > self._layers["__depth__"] - self.spec.train_layers

    def lr_scales(self) -> dict[str, float]:
        """Per trainable parameter: the learning-rate factor (layer-wise decay; head at 1)."""
        depth, decay = self._layers["__depth__"], self.spec.layer_decay
        scales = {f"encoder.{n}": decay ** (depth - self._layers[n])
                  for n, p in self.encoder.named_parameters() if p.requires_grad}
        return scales | {f"head.{n}": 1.0 for n, _ in self.head.named_parameters()}

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        if self.spec.encoder == "frozen":
            self.encoder.eval()
        return self

    # ------------------------------------------------------------------------------------- forward

    def features(self, batch: Batch, frozen: bool | None = None) -> list[torch.Tensor]:
        """The encoder's feature pyramid, fused over the input sensors and their dates: what the head
        reads, and what serving returns as embeddings. ``frozen`` defaults to the spec's choice."""
        view = {k: v for k, v in batch.items() if k.split(".")[0] in self.inputs or k == "lonlat"}
        frozen = self.spec.encoder == "frozen" if frozen is None else frozen
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            enc = self.encoder.encode(view)
        feats = {s: [_date_mean(f, layout.tmask(batch, s)) for f in enc[s]] for s in self.inputs if s in enc}
        if not feats:
            raise DataError(f"the batch has none of the input sensors {self.inputs}")
        present = {s: layout.present(batch, s) for s in feats}
        return fuse_sensors(feats, present)

    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits (classification: (B, K); dense tasks: (B, K, H, W)) or normalised target values."""
        if self.spec.task == "change":
            before, after = _two_dates(batch, self.inputs)
            size = before[self.inputs[0]].shape[-2:]
            return self.head(self.features(before), self.features(after), size)
        feats = self.features(batch)
        if self.spec.task in ("classification", "multilabel"):
            return self.head(feats)
        size = next(batch[s] for s in self.inputs if s in batch).shape[-2:]
        return self.head(feats, size)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self.predict(batch)
        target, mask = self.targets(batch)
        return {"loss": self.loss(out, target, mask)}

    def targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The task's target and, for pixel regression, its valid mask."""
        s, task = self.spec, self.spec.task
        if task in ("regression", "translation"):
            y = batch[s.target]
            return y, layout.valid(batch, s.target) & layout.present(batch, s.target).view(-1, 1, 1)
        if task == "change" and "label" not in batch:
            return self._derived_change(batch), None
        label = batch["label"]
        if task == "classification" and label.dim() == 3:
            return _majority(label, len(s.classes), s.ignore_index), None
        if task == "multilabel" and label.dim() == 3:
            return _presence(label, len(s.classes), s.presence_min), None
        return label, None

    def _derived_change(self, batch: Batch) -> torch.Tensor:
        before, after = _two_dates(batch, self.inputs)
        s = self.inputs[0]
        std = torch.tensor([b.std for b in self.encoder.sensors[s].bands], device=before[s].device)
        change = ((after[s] - before[s]).abs() * std.view(1, -1, 1, 1)).mean(1) > self.spec.change_threshold
        label = change.long()
        valid = layout.valid(before, s) & layout.valid(after, s)
        return label.masked_fill(~valid, self.spec.ignore_index)

    def loss(self, out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        task = self.spec.task
        if task == "multilabel":
            return F.binary_cross_entropy_with_logits(out, target.float())
        if task in ("regression", "translation"):
            err = F.smooth_l1_loss(out, target, reduction="none").mean(1)
            return (err * mask).sum() / mask.sum().clamp_min(1)
        if (target != self.spec.ignore_index).any():
            return F.cross_entropy(out, target, ignore_index=self.spec.ignore_index)
        return out.sum() * 0.0  # nothing labelled in this batch: a zero that keeps the graph

    # ------------------------------------------------------------------------------------- metrics

    def metrics(self):
        """torchmetrics for the task; ``compute()`` reduces across Ray Train workers (torch.distributed)."""
        import torchmetrics as tm
        from torchmetrics import classification as C
        from torchmetrics import image as I
        from torchmetrics import regression as R
        from torchmetrics.wrappers import ClasswiseWrapper

        task, s = self.spec.task, self.spec
        if task in ("classification", "segmentation", "change"):
            # the definitions evaluation shares: per-class IoU is NaN for a class neither labelled nor predicted
            m = class_metrics(s.outputs, ignore_index=s.ignore_index, iou=task != "classification")
            if "iou" in m:
                labels = s.classes if task == "segmentation" else ["unchanged", "changed"]
                m["iou"] = ClasswiseWrapper(m["iou"], labels=[str(c) for c in labels], prefix="iou_")
        elif task == "multilabel":
            k = s.outputs
            m = {"map": C.MultilabelAveragePrecision(k, average="macro"),
                 "f1": C.MultilabelF1Score(k, average="macro")}
        else:
            m = {"rmse": R.MeanSquaredError(squared=False), "mae": R.MeanAbsoluteError()}
            if task == "translation":
                span = s.data_range or 8.0 * sum((s.target_stats or {"std": [1.0]})["std"]) / s.outputs
                m |= {"psnr": I.PeakSignalNoiseRatio(data_range=span),
                      "ssim": I.StructuralSimilarityIndexMeasure(data_range=span)}
        return tm.MetricCollection(m)

    @torch.no_grad()
    def update_metrics(self, metrics, batch: Batch) -> None:
        out = self.predict(batch).float()
        target, mask = self.targets(batch)
        task = self.spec.task
        if task == "multilabel":
            metrics.update(out.sigmoid(), target.long())
        elif task in ("regression", "translation"):
            pixels = mask.unsqueeze(1).expand_as(out)
            phys_out, phys_target = self.denormalise(out), self.denormalise(target.float())
            for name, metric in metrics.items():
                if name in ("rmse", "mae"):
                    metric.update(phys_out[pixels], phys_target[pixels])
                else:  # image metrics need whole images: invalid pixels count as perfect
                    metric.update(torch.where(pixels, phys_out, phys_target), phys_target)
        else:
            metrics.update(out, target)

    def denormalise(self, y: torch.Tensor) -> torch.Tensor:
        """Normalised target values -> the target sensor's physical units."""
        stats = self.spec.target_stats
        if not stats:
            return y
        shape = (1, -1) + (1,) * (y.dim() - 2)
        mean = torch.tensor(stats["mean"], device=y.device, dtype=y.dtype).view(shape)
        std = torch.tensor(stats["std"], device=y.device, dtype=y.dtype).view(shape)
        return y * std + mean


def _date_mean(f: torch.Tensor, tmask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D, h, w) time-series features -> (B, D, h, w), averaged over the real dates."""
    if f.dim() == 4:
        return f
    w = torch.ones(f.shape[:2], device=f.device) if tmask is None else tmask.to(f.dtype)
    w = w.view(*w.shape, 1, 1, 1)
    return (f * w).sum(1) / w.sum(1).clamp_min(1.0)


def _two_dates(batch: Batch, sensors: list[str]) -> tuple[dict, dict]:
    """The first and the last real date of each sample's series, as two single-date views."""
    before, after = {}, {}
    for s in sensors:
        x = batch[s]
        if x.dim() != 5:
            raise DataError(f"change detection needs a time series for {s!r}, got shape {tuple(x.shape)}")
        tmask = layout.tmask(batch, s)
        idx = torch.arange(len(x), device=x.device)
        last = (tmask.long().cumsum(1).argmax(1))
        before[s], after[s] = x[:, 0], x[idx, last]
        valid = layout.valid(batch, s)
        before[s + layout.VALID], after[s + layout.VALID] = valid[:, 0], valid[idx, last]
    return before, after


def _class_counts(label: torch.Tensor, k: int) -> torch.Tensor:
    onehot = F.one_hot(label.clamp(0, k - 1).flatten(1), k) * (label >= 0).flatten(1).unsqueeze(-1)
    return onehot.sum(1)


def _majority(label: torch.Tensor, k: int, ignore: int) -> torch.Tensor:
    """A land-cover chip's scene label: its most frequent class (``ignore`` where nothing is labelled)."""
    counts = _class_counts(label, k)
    return counts.argmax(1).masked_fill(counts.sum(1) == 0, ignore)


def _presence(label: torch.Tensor, k: int, share: float) -> torch.Tensor:
    """Multi-hot: the classes covering at least ``share`` of a chip's labelled pixels."""
    counts = _class_counts(label, k).float()
    return (counts / counts.sum(1, keepdim=True).clamp_min(1) >= share).long()
