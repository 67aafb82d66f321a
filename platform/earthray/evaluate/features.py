"""Frozen features of a labelled group: one Ray Data actor runs the bundle's encoder, the driver
collects the rows in a repeatable order (by chip centre, then feature cell)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from earthray.bundle import Bundle
from earthray.config import ConfigError
from earthray.data.manifest import label_layer, load_manifest
from earthray.data.schema import IGNORE
from earthray.data.stream import read_group
from earthray.errors import DataError
from earthray.evaluate.inputs import BandMap, input_mapping, model_inputs
from earthray.evaluate.spec import EvaluateSpec
from earthray.models.heads import fuse_sensors
from earthray.runtime import ensure_ray


@dataclass
class Features:
    """Frozen features and their labels: (N, D) float32 and (N,) class ids or (N, K) multi-hot."""

    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    classes: list[str]
    multilabel: bool = False
    per_pixel: bool = False



class FeatureExtractor:
    """Decoded batches -> feature rows: one per chip, or one per labelled feature cell (per-pixel labels).

    A callable class, so Ray Data builds the model once per actor. Each output row carries its
    chip centre, its cell index and the ``part`` column it came with, to order and split the rows.
    """

    def __init__(self, model: torch.nn.Module, mapping: dict[str, BandMap], label_kind: str, num_classes: int,
                 levels: str = "last", min_labelled: float = 0.5, use_gpu: bool = False):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.inputs = mapping
        self.label_kind = label_kind
        self.num_classes = num_classes
        self.levels = levels
        self.min_labelled = min_labelled

    def _batch(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in model_inputs(batch, self.inputs).items()}

    def _grid(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.levels == "last":
            return features[-1]
        size = min((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        return torch.cat([F.adaptive_avg_pool2d(f, size) for f in features], dim=1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = self._batch(batch)
        with torch.inference_mode():
            present = {n: inputs[f"{n}.present"] for n in self.inputs}
            grid = self._grid(fuse_sensors(self.model.encode(inputs), present)).float()  # (B, D, h, w)
        label = torch.from_numpy(np.array(batch["label"], np.int64)).to(grid.device)
        if self.label_kind == "pixel":
            x, label, chip, cell = self._cells(grid, self._mask_invalid(label, inputs))
        else:
            x, chip, cell = grid.mean(dim=(-2, -1)), torch.arange(len(grid)), torch.zeros(len(grid), dtype=torch.int64)
        chip = chip.cpu().numpy()
        part = np.asarray(batch["part"] if "part" in batch else np.zeros(len(grid), np.int64))
        return {"feature": x.cpu().numpy(), "label": label.cpu().numpy(), "lonlat": np.asarray(batch["lonlat"])[chip],
                "part": part[chip], "cell": cell.cpu().numpy()}

    def _mask_invalid(self, label: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pixels no present sensor sees carry no information about the imagery: unlabelled."""
        seen = torch.zeros_like(label, dtype=torch.bool)
        for name in self.inputs:
            valid = inputs[f"{name}.valid"]
            if valid.ndim == 4:
                valid = valid.any(1)
            if valid.shape[-2:] != label.shape[-2:]:
                return label
            seen |= valid & inputs[f"{name}.present"].view(-1, 1, 1)
        return torch.where(seen, label, IGNORE)

    def _cells(self, grid: torch.Tensor, label: torch.Tensor):
        """Features, majority labels, chip and cell indices of the cells labelled enough."""
        b, _, h, w = grid.shape
        k = max(self.num_classes, int(label.max()) + 1 if label.numel() else 0, 1)
        onehot = F.one_hot(label.clamp_min(0), k).permute(0, 3, 1, 2).float() * (label >= 0).unsqueeze(1)
        share = F.adaptive_avg_pool2d(onehot, (h, w))  # (B, K, h, w): share of each class in each cell
        keep = share.sum(1) >= self.min_labelled - 1e-6
        chip, row, col = keep.nonzero(as_tuple=True)
        return grid.permute(0, 2, 3, 1)[keep], share.argmax(1)[keep], chip, row * w + col



def label_task(manifest: dict, spec: EvaluateSpec) -> tuple[str, list[str] | None]:
    """("pixel" | "class" | "multilabel", class names) of the group; splits checked."""
    group = spec.data.group
    if group not in manifest["groups"]:
        raise ConfigError(f"data.group: no group {group!r} in {spec.data.root}; groups: "
                          f"{', '.join(manifest['groups'])}")
    g = manifest["groups"][group]
    try:
        layer = label_layer(g, spec.data.label, f"data.label (group {group!r})")
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    if layer is None:
        labelled = [n for n, x in manifest["groups"].items() if x.get("labels")]
        raise ConfigError(f"data.group: group {group!r} has no labels; labelled groups: {', '.join(labelled) or 'none'}")
    for attr in ("train_split", "eval_split"):
        split = getattr(spec.data, attr)
        if not g["by_split"].get(split):
            raise ConfigError(f"data.{attr}: group {group!r} has no chips in split {split!r}; "
                              f"splits: {g['by_split']}")
    shape = g["tensors"][layer["column"]]["shape"]
    kind = {0: "class", 1: "multilabel"}.get(len(shape), "pixel")
    return kind, layer.get("classes")


def extract_features(bundle: Bundle, spec: EvaluateSpec, manifest: dict | None = None) -> Features:
    """Frozen features of the train and eval splits, in a repeatable order (by chip centre, then cell)."""
    import ray.data
    from ray.data.expressions import lit

    manifest = manifest or load_manifest(spec.data.root)
    kind, classes = label_task(manifest, spec)
    inputs = input_mapping(bundle, manifest, spec.data.group, spec.data.inputs)
    ensure_ray(spec.address)
    d = spec.data
    parts = [read_group(d.root, d.group, split, max_dates=d.max_dates, seed=spec.seed, num_cpus=d.decode_cpus,
                        manifest=manifest, label=d.label).with_column("part", lit(i))
             for i, split in enumerate((d.train_split, d.eval_split))]
    ds = parts[0].union(parts[1]).map_batches(
        FeatureExtractor,
        fn_constructor_kwargs=dict(model=bundle.model, mapping=inputs, label_kind=kind, num_classes=len(classes or []),
                                   levels=spec.features, min_labelled=spec.min_labelled, use_gpu=spec.num_gpus > 0),
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=spec.batch_size, batch_format="numpy",
        num_cpus=spec.num_cpus, num_gpus=spec.num_gpus or None)
    rows: dict[str, list[np.ndarray]] = {"feature": [], "label": [], "lonlat": [], "cell": [], "part": []}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key in rows:
            rows[key].append(batch[key])
    if not rows["feature"]:
        raise DataError(f"{d.root}: group {d.group!r} gave no labelled samples")
    cat = {k: np.concatenate(v) for k, v in rows.items()}
    order = np.lexsort((cat["cell"], cat["lonlat"][:, 1], cat["lonlat"][:, 0], cat["part"]))
    cat = {k: v[order] for k, v in cat.items()}
    train, held = cat["part"] == 0, cat["part"] == 1
    x, y = cat["feature"].astype(np.float32), cat["label"]
    if kind == "multilabel":
        keep = (y >= 0).all(1)
        y = y.clip(0, 1).astype(np.int64)
    else:
        keep = y >= 0
    for name, mask in (("train", train & keep), ("eval", held & keep)):
        if not mask.any():
            split = d.train_split if name == "train" else d.eval_split
            raise DataError(f"{d.root}: group {d.group!r}, split {split!r}: no labelled samples "
                             f"(min_labelled {spec.min_labelled})")
    n_classes = y.shape[1] if kind == "multilabel" else int(y[keep].max()) + 1
    names = list(classes or [])
    names += [f"class_{i}" for i in range(len(names), n_classes)]
    return Features(x[train & keep], y[train & keep], x[held & keep], y[held & keep], names,
                    multilabel=kind == "multilabel", per_pixel=kind == "pixel")

