"""One evaluation: extract features, run the probes, score them; each evaluation is a new MLflow run."""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from earthray import tracking
from earthray.bundle import Bundle, load_bundle
from earthray.data.manifest import load_manifest
from earthray.evaluate.features import extract_features, label_task
from earthray.evaluate.inputs import input_mapping
from earthray.evaluate.metrics import class_iou, classification_scores
from earthray.evaluate.probes import predict
from earthray.evaluate.spec import EvaluateSpec


@dataclass
class EvalResult:
    scores: dict[str, float]
    """``<method>/<metric>``: linear/knn/majority x oa/miou/f1 (multi-label: map/f1)."""
    n_train: int
    n_eval: int
    run_id: str | None
    tracking_uri: str | None = None
    classes: list[str] = field(default_factory=list)
    per_class: dict[str, list[float]] = field(default_factory=dict)
    """``<method>/iou`` per class (single label only; NaN for a class neither labelled nor predicted)."""
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
    label_task(manifest, spec)
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
                per_class[f"{method}/iou"] = class_iou(probs, target, k)
        result = EvalResult(scores, len(features.train_x), len(features.eval_x), run_id, uri, features.classes,
                            per_class, features.train_x.shape[1])
        if log:
            _log(result, loaded, source, spec)
        ok = True
        return result
    finally:
        if log:
            tracking.close_run(uri, run_id, ok)


def _nan_to_null(per_class: dict[str, list[float]]) -> dict[str, list[float | None]]:
    """JSON has no NaN: a class without an IoU is ``null`` in ``evaluation.json``."""
    return {k: [None if math.isnan(v) else v for v in values] for k, values in per_class.items()}


def _log(result: EvalResult, bundle: Bundle, source: str, spec: EvaluateSpec) -> None:
    provenance = bundle.meta.get("provenance") or {}
    tags = {"earthray.bundle": source, "earthray.bundle.recipe": f"{bundle.recipe}/{bundle.meta.get('preset')}",
            "earthray.bundle.run_id": str(provenance.get("mlflow_run_id") or ""),
            "earthray.bundle.run_name": str(provenance.get("run_name") or ""), "earthray.eval.group": spec.data.group}
    tracking.set_tags(result.tracking_uri, result.run_id, tags)
    metrics = {k: v for k, v in result.scores.items() if v == v}  # MLflow takes no NaN
    metrics.update(n_train=result.n_train, n_eval=result.n_eval, feature_dim=result.feature_dim)
    tracking.log_metrics(result.tracking_uri, result.run_id, metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "evaluation.json")
        path.write_text(json.dumps({"bundle": source, "group": spec.data.group, "classes": result.classes,
                                    "scores": result.scores, "per_class": _nan_to_null(result.per_class),
                                    "n_train": result.n_train, "n_eval": result.n_eval}, indent=2))
        tracking.log_artifact(result.tracking_uri, result.run_id, path)
