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

Modules: ``spec`` (the YAML spec), ``inputs`` (bands and statistics the encoder is fed),
``features`` (the Ray Data feature extractor), ``probes`` (linear, kNN, majority), ``metrics``
(scores; the single-label definitions are :mod:`earthray.metrics`, shared with fine-tuning)
and ``run`` (``evaluate``: one MLflow run per evaluation).
"""

from earthray.evaluate.features import FeatureExtractor, Features, extract_features, label_task
from earthray.evaluate.inputs import BandMap, input_mapping, model_inputs
from earthray.evaluate.metrics import class_iou, classification_scores
from earthray.evaluate.probes import knn_classify, linear_probe, majority_baseline, predict, standardise
from earthray.evaluate.run import EvalResult, evaluate
from earthray.evaluate.spec import (
    EvalDataSpec,
    EvalTrackingSpec,
    EvaluateSpec,
    KnnSpec,
    LinearSpec,
    Method,
    load_evaluate_spec,
)

__all__ = [
    "BandMap",
    "EvalDataSpec",
    "EvalResult",
    "EvalTrackingSpec",
    "EvaluateSpec",
    "FeatureExtractor",
    "Features",
    "KnnSpec",
    "LinearSpec",
    "Method",
    "class_iou",
    "classification_scores",
    "evaluate",
    "extract_features",
    "input_mapping",
    "knn_classify",
    "label_task",
    "linear_probe",
    "load_evaluate_spec",
    "majority_baseline",
    "model_inputs",
    "predict",
    "standardise",
]
