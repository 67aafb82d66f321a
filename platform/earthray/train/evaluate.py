"""Representation quality of a bundle's frozen encoder: a linear probe and a weighted kNN on its features.

Features come from the bundle's own ``encode``, fused over sensors, at the last (most
semantic) level by default: that is what linear-probe and kNN protocols (MAE, DINO) measure,
and early ViT levels of an untrained encoder are little more than re-embedded pixels.
``features: concat`` adds every level, pooled to the coarsest grid.

Per-pixel label chips are scored per feature cell: each cell takes the majority label of
the pixels it covers (cells less than ``min_labelled`` labelled are dropped), so a few
chips give many samples and the score measures spatial representation. Scalar or
multi-hot labels use the globally pooled feature of each chip.

The shards are normalised with the manifest's statistics; the model is fed the
statistics it was trained with (the bundle's), matched band by band by name.
Features are extracted by one Ray Data actor holding the model and collected on the
driver, where the probes run; each evaluation is a new MLflow run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from earthray.bundle import Bundle, load_bundle
from earthray.config import ConfigError, StrictModel, load_yaml, resolve_path
from earthray.data.manifest import label_layer, load_manifest
from earthray.data.pipeline import GroupReader, read_group
from earthray.models.heads import fuse_sensors
from earthray.runtime import ensure_ray
from earthray.train import tracking

Method = Literal["linear", "knn"]


# ------------------------------------------------------------------------------------------------ spec


class EvalDataSpec(StrictModel):
    root: str = Field(description="an ingest output folder (holds manifest.json)")
    group: str = Field(description="a labelled shard group")
    label: str | None = Field(None, description="the group's label layer to probe (default: its first)")
    inputs: list[str] | None = Field(None, min_length=1, description="the group's sensors fed to the encoder "
                                     "(default: all): probe a multi-sensor model with a modality missing")
    train_split: str = "train"
    eval_split: str = "val"
    max_dates: int = Field(8, ge=1, description="dates sampled per time series")
    decode_cpus: float = Field(0.25, gt=0, description="CPUs per Ray Data decode task")

    @model_validator(mode="after")
    def _distinct_splits(self) -> EvalDataSpec:
        if self.train_split == self.eval_split:
            raise ValueError(f"eval_split must differ from train_split ({self.train_split!r}): "
                             "a probe scored on its own training samples measures nothing")
        return self


class KnnSpec(StrictModel):
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0, description="votes weigh exp(cosine / temperature), as in DINO")


class LinearSpec(StrictModel):
    epochs: int = Field(100, ge=1)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(256, ge=1)


class EvalTrackingSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db")
    experiment: str = "earthray-evaluate"


class EvaluateSpec(StrictModel):
    data: EvalDataSpec
    methods: list[Method] = Field(default_factory=lambda: ["linear", "knn"], min_length=1)
    features: Literal["last", "concat"] = Field("last", description="last level, or all levels at the coarsest grid")
    min_labelled: float = Field(0.5, gt=0, le=1, description="per-pixel labels: least labelled share of a cell")
    knn: KnnSpec = KnnSpec()
    linear: LinearSpec = LinearSpec()
    batch_size: int = Field(32, ge=1, description="chips per feature-extraction batch")
    num_cpus: float = Field(0.5, gt=0, description="CPUs of the feature-extraction actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the feature-extraction actor (>0: encode on CUDA)")
    tracking: EvalTrackingSpec = EvalTrackingSpec()
    workdir: str = "work"
    seed: int = 0
    address: str | None = Field(None, description="Ray cluster address; None starts or joins a local Ray")

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"methods must not repeat, got {v}")
        return v

    @property
    def tracking_uri(self) -> str:
        """Where runs are logged and ``models:/`` URIs are looked up (as pretraining's ``tracking_uri``)."""
        return (self.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{Path(self.workdir, 'mlflow.db').resolve()}")


def load_evaluate_spec(path: str | Path) -> EvaluateSpec:
    """Load a spec; ``workdir`` and ``data.root`` are relative to the spec file."""
    spec = load_yaml(path, EvaluateSpec)
    for obj, attr in ((spec, "workdir"), (spec.data, "root")):
        setattr(obj, attr, resolve_path(getattr(obj, attr), Path(path).parent))
    return spec


# ------------------------------------------------------------------------------------------- features


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


@dataclass
class BandMap:
    """Manifest-normalised bands -> the bundle's: pick the bundle's bands, then ``x * scale + shift``."""

    index: list[int]
    scale: np.ndarray
    shift: np.ndarray


def input_mapping(bundle: Bundle, manifest: dict, group: str, inputs: list[str] | None = None) -> dict[str, BandMap]:
    """How to turn each sensor of ``group`` (or its ``inputs``) as ``read_group`` delivers it into what
    the bundle was trained on; sensors left out are not fed to the encoder.

    The bundle's bands are picked from the group's by name; a sensor or band the bundle needs but
    the group lacks, or a different value transform, is a ConfigError naming them.
    """
    reader = GroupReader.from_manifest(manifest, group)
    unknown = [s for s in inputs or [] if s not in reader.sensors]
    if unknown:
        raise ConfigError(f"data.inputs: group {group!r} has no sensors {unknown}; it has {list(reader.sensors)}")
    sensors = {s.name: s for s in bundle.sensors}
    source = str(bundle.path)
    out = {}
    for name, norm in reader.sensors.items():
        if inputs is not None and name not in inputs:
            continue
        if name not in sensors:
            raise ConfigError(f"data.group {group!r}: sensor {name!r} is not one the bundle {source} was trained on "
                              f"(its sensors: {', '.join(sensors)})")
        have = manifest["groups"][group]["bands"][name]
        want = sensors[name].band_names
        missing = [b for b in want if b not in have]
        if missing:
            raise ConfigError(f"data.group {group!r}: sensor {name!r} lacks bands {missing} the bundle {source} "
                              f"needs (group bands {have}, bundle bands {want})")
        if norm.transform != sensors[name].transform:
            raise ConfigError(f"data.group {group!r}: sensor {name!r} was ingested with value transform "
                              f"{norm.transform.model_dump()}, the bundle {source} expects "
                              f"{sensors[name].transform.model_dump()}")
        index = [have.index(b) for b in want]
        mean = np.asarray(bundle.normalisation[name]["mean"], np.float32)
        std = np.asarray(bundle.normalisation[name]["std"], np.float32)
        out[name] = BandMap(index, norm.std[index] / std, (norm.mean[index] - mean) / std)
    return out


def model_inputs(batch: dict[str, np.ndarray], mapping: dict[str, BandMap]) -> dict[str, torch.Tensor]:
    """A decoded batch (manifest-normalised) -> the recipe batch the bundle expects (its bands, its statistics)."""
    out = {}
    for name, r in mapping.items():
        x = batch[name][..., r.index, :, :] * r.scale.reshape(-1, 1, 1) + r.shift.reshape(-1, 1, 1)
        valid = np.asarray(batch[f"{name}.valid"], bool)
        out[name] = torch.from_numpy(np.where(np.expand_dims(valid, -3), x, 0).astype(np.float32))
        out[f"{name}.valid"] = torch.from_numpy(valid.copy())
        out[f"{name}.present"] = torch.from_numpy(np.array(batch[f"{name}.present"], bool))
        for key in (f"{name}.doy", f"{name}.tmask"):
            if key in batch:
                out[key] = torch.from_numpy(np.array(batch[key]))
    out["lonlat"] = torch.from_numpy(np.array(batch["lonlat"], np.float32))
    return out


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
        return torch.where(seen, label, -1)

    def _cells(self, grid: torch.Tensor, label: torch.Tensor):
        """Features, majority labels, chip and cell indices of the cells labelled enough."""
        b, _, h, w = grid.shape
        k = max(self.num_classes, int(label.max()) + 1 if label.numel() else 0, 1)
        onehot = F.one_hot(label.clamp_min(0), k).permute(0, 3, 1, 2).float() * (label >= 0).unsqueeze(1)
        share = F.adaptive_avg_pool2d(onehot, (h, w))  # (B, K, h, w): share of each class in each cell
        keep = share.sum(1) >= self.min_labelled - 1e-6
        chip, row, col = keep.nonzero(as_tuple=True)
        return grid.permute(0, 2, 3, 1)[keep], share.argmax(1)[keep], chip, row * w + col


def _label_task(manifest: dict, spec: EvaluateSpec) -> tuple[str, list[str] | None]:
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
    kind, classes = _label_task(manifest, spec)
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
        raise ValueError(f"{d.root}: group {d.group!r} gave no labelled samples")
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
            raise ValueError(f"{d.root}: group {d.group!r}, split {split!r}: no labelled samples "
                             f"(min_labelled {spec.min_labelled})")
    n_classes = y.shape[1] if kind == "multilabel" else int(y[keep].max()) + 1
    names = list(classes or [])
    names += [f"class_{i}" for i in range(len(names), n_classes)]
    return Features(x[train & keep], y[train & keep], x[held & keep], y[held & keep], names,
                    multilabel=kind == "multilabel", per_pixel=kind == "pixel")


# --------------------------------------------------------------------------------------------- probes


def standardise(train_x: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """Every array standardised with the training features' per-dimension mean and std."""
    train = torch.as_tensor(train_x, dtype=torch.float32)
    mean, std = train.mean(0), train.std(0, unbiased=False).clamp_min(1e-6)
    return [(torch.as_tensor(a, dtype=torch.float32) - mean) / std for a in (train_x, *others)]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, num_classes: int,
                 spec: LinearSpec = LinearSpec(), *, multilabel: bool = False, seed: int = 0) -> torch.Tensor:
    """Class probabilities (N_eval, K) of a linear layer fitted with AdamW; the same seed gives the same result."""
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        bound = 1 / train_x.shape[1] ** 0.5
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    target = train_y.float() if multilabel else train_y.long()
    n = len(train_x)
    with torch.enable_grad():
        for _ in range(spec.epochs):
            for idx in torch.randperm(n, generator=gen).split(spec.batch_size):
                loss = loss_fn(layer(train_x[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        logits = layer(eval_x)
    return torch.sigmoid(logits) if multilabel else logits.softmax(-1)


def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, num_classes: int,
                 spec: KnnSpec = KnnSpec(), *, multilabel: bool = False, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (DINO): cosine top-k neighbours vote exp(sim / T); returns vote shares (N_eval, K)."""
    train = F.normalize(train_x, dim=1)
    votes_of = train_y.float() if multilabel else F.one_hot(train_y.long(), num_classes).float()
    k = min(spec.k, len(train))
    out = []
    for block in F.normalize(eval_x, dim=1).split(chunk):
        sim, idx = (block @ train.T).topk(k, dim=1)
        w = ((sim - 1) / spec.temperature).exp()  # exp(sim / T), shifted: the shares are the same, never inf
        out.append((w.unsqueeze(-1) * votes_of[idx]).sum(1) / w.sum(1, keepdim=True))
    return torch.cat(out)


def majority_baseline(train_y: torch.Tensor, n_eval: int, num_classes: int, *, multilabel: bool = False
                      ) -> torch.Tensor:
    """Always the most frequent training class (multi-label: each class's training prevalence)."""
    if multilabel:
        return train_y.float().mean(0).expand(n_eval, -1).clone()
    probs = torch.zeros(n_eval, num_classes)
    probs[:, torch.bincount(train_y.long(), minlength=num_classes).argmax()] = 1.0
    return probs


def predict(features: Features, spec: EvaluateSpec) -> dict[str, torch.Tensor]:
    """Class scores on the eval split per method (and ``majority``), from standardised features."""
    train_x, eval_x = standardise(features.train_x, features.eval_x)
    train_y = torch.as_tensor(features.train_y)
    k, ml = len(features.classes), features.multilabel
    out = {}
    if "linear" in spec.methods:
        out["linear"] = linear_probe(train_x, train_y, eval_x, k, spec.linear, multilabel=ml, seed=spec.seed)
    if "knn" in spec.methods:
        out["knn"] = knn_classify(train_x, train_y, eval_x, k, spec.knn, multilabel=ml)
    out["majority"] = majority_baseline(train_y, len(eval_x), k, multilabel=ml)
    return out


def classification_scores(probs: torch.Tensor, target: torch.Tensor, num_classes: int, *,
                          multilabel: bool = False) -> dict[str, float]:
    """Single label: ``oa`` (micro accuracy), ``miou`` and ``f1`` (macro over the classes present in the
    targets or the predictions: a class absent from both says nothing). Multi-label: ``map`` (macro over
    classes with positives) and ``f1`` (threshold 0.5, macro over classes present)."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_jaccard_index,
        multilabel_average_precision,
        multilabel_f1_score,
    )

    target = torch.as_tensor(target).long()
    if multilabel:
        positive = target.sum(0) > 0
        seen = positive | (probs >= 0.5).any(0)
        with warnings.catch_warnings():  # classes with no positives are left out below
            warnings.filterwarnings("ignore", message="No positive samples")
            ap = multilabel_average_precision(probs, target, num_classes, average=None)
        f1 = multilabel_f1_score(probs, target, num_classes, average=None)
        return {"map": float(ap[positive].mean()) if positive.any() else float("nan"),
                "f1": float(f1[seen].mean()) if seen.any() else float("nan")}
    pred = probs.argmax(1)
    return {
        "oa": float(multiclass_accuracy(pred, target, num_classes, average="micro")),
        # torchmetrics' macro IoU and F1 already leave out classes with no prediction and no target
        "miou": float(multiclass_jaccard_index(pred, target, num_classes, average="macro")),
        "f1": float(multiclass_f1_score(pred, target, num_classes, average="macro")),
    }


def per_class_iou(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float | None]:
    """IoU of each class (None where the class is neither predicted nor present)."""
    pred, target = probs.argmax(1), torch.as_tensor(target).long()
    out: list[float | None] = []
    for c in range(num_classes):
        inter = int(((pred == c) & (target == c)).sum())
        union = int(((pred == c) | (target == c)).sum())
        out.append(inter / union if union else None)
    return out


# ------------------------------------------------------------------------------------------- evaluate


@dataclass
class EvalResult:
    scores: dict[str, float]
    """``<method>/<metric>``: linear/knn/majority x oa/miou/f1 (multi-label: map/f1)."""
    n_train: int
    n_eval: int
    run_id: str | None
    tracking_uri: str | None = None
    classes: list[str] = field(default_factory=list)
    per_class: dict[str, list[float | None]] = field(default_factory=dict)
    """``<method>/iou`` per class (single label only)."""
    feature_dim: int = 0


def _source(bundle: str | Path | Bundle) -> str:
    return str(bundle.path) if isinstance(bundle, Bundle) else str(bundle)


def _run_name(source: str, group: str) -> str:
    """A fresh name per evaluation: ``open_run`` reopens a run of the same name, re-evaluating must not."""
    base = Path(source.rstrip("/")).name or source
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    clean = re.sub(r"[^A-Za-z0-9_.+@-]+", "-", f"eval-{base}-{group}")
    return f"{clean}-{stamp}-{uuid.uuid4().hex[:6]}"


def evaluate(bundle: str | Path | Bundle, spec: EvaluateSpec, *, log: bool = True) -> EvalResult:
    """Linear-probe and kNN scores of ``bundle``'s frozen features on ``spec.data.group``.

    ``bundle`` is a loaded Bundle or anything ``load_bundle`` takes (a path, a registry URI).
    With ``log``, one new MLflow run records the spec, the bundle and the scores.
    """
    source = _source(bundle)
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(str(bundle), tracking_uri=spec.tracking_uri)
    manifest = load_manifest(spec.data.root)
    _label_task(manifest, spec)
    input_mapping(loaded, manifest, spec.data.group, spec.data.inputs)  # mismatches fail before a run is opened

    run_id = uri = None
    if log:
        uri = spec.tracking_uri
        params = {"bundle": source, "recipe": loaded.recipe, "preset": loaded.meta.get("preset"),
                  **spec.model_dump()}
        run_id = tracking.open_run(uri, spec.tracking.experiment, _run_name(source, spec.data.group), params,
                                   Path(spec.workdir) / "mlartifacts")
    ok = False
    try:
        features = extract_features(loaded, spec, manifest)
        k = len(features.classes)
        target = torch.as_tensor(features.eval_y)
        scores, per_class = {}, {}
        for method, probs in predict(features, spec).items():
            for name, value in classification_scores(probs, target, k, multilabel=features.multilabel).items():
                scores[f"{method}/{name}"] = value
            if not features.multilabel:
                per_class[f"{method}/iou"] = per_class_iou(probs, target, k)
        result = EvalResult(scores, len(features.train_x), len(features.eval_x), run_id, uri, features.classes,
                            per_class, features.train_x.shape[1])
        if log:
            _log(result, loaded, source, spec)
        ok = True
        return result
    finally:
        if log:
            tracking.close_run(uri, run_id, ok)


def _log(result: EvalResult, bundle: Bundle, source: str, spec: EvaluateSpec) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result.tracking_uri)
    provenance = bundle.meta.get("provenance") or {}
    tags = {"earthray.bundle": source, "earthray.bundle.recipe": f"{bundle.recipe}/{bundle.meta.get('preset')}",
            "earthray.bundle.run_id": str(provenance.get("mlflow_run_id") or ""),
            "earthray.bundle.run_name": str(provenance.get("run_name") or ""), "earthray.eval.group": spec.data.group}
    for key, value in tags.items():
        client.set_tag(result.run_id, key, value)
    metrics = {k: v for k, v in result.scores.items() if v == v}  # MLflow takes no NaN
    metrics.update(n_train=result.n_train, n_eval=result.n_eval, feature_dim=result.feature_dim)
    tracking.log_metrics(result.tracking_uri, result.run_id, metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "evaluation.json")
        path.write_text(json.dumps({"bundle": source, "group": spec.data.group, "classes": result.classes,
                                    "scores": result.scores, "per_class": result.per_class,
                                    "n_train": result.n_train, "n_eval": result.n_eval}, indent=2))
        tracking.log_artifact(result.tracking_uri, result.run_id, path)
