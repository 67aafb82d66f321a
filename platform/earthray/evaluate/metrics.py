"""Scores of the probes' class scores against the eval labels.

Single-label scores are the shared definitions of :mod:`earthray.metrics` (the ones fine-tuning
reports): ``oa``, ``miou``, ``f1`` and the per-class IoU, NaN for a class neither labelled nor
predicted.
"""

from __future__ import annotations

import warnings

import torch

from earthray.metrics import class_metrics, per_class_iou


def classification_scores(probs: torch.Tensor, target: torch.Tensor, num_classes: int, *,
                          multilabel: bool = False) -> dict[str, float]:
    """Single label: ``oa`` (micro accuracy), ``miou`` and ``f1`` (macro over the classes present in the
    targets or the predictions: a class absent from both says nothing). Multi-label: ``map`` (macro over
    classes with positives) and ``f1`` (threshold 0.5, macro over classes present)."""
    target = torch.as_tensor(target).long()
    if multilabel:
        return _multilabel_scores(probs, target, num_classes)
    pred = probs.argmax(1)
    metrics = class_metrics(num_classes, iou=True)
    return {name: float(metrics[name](pred, target)) for name in ("oa", "miou", "f1")}


def class_iou(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> list[float]:
    """IoU of each class of the argmax prediction (NaN where the class is neither predicted nor present)."""
    return per_class_iou(num_classes)(probs.argmax(1), torch.as_tensor(target).long()).tolist()


def _multilabel_scores(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    from torchmetrics.functional.classification import multilabel_average_precision, multilabel_f1_score

    positive = target.sum(0) > 0
    seen = positive | (probs >= 0.5).any(0)
    with warnings.catch_warnings():  # classes with no positives are left out below
        warnings.filterwarnings("ignore", message="No positive samples")
        ap = multilabel_average_precision(probs, target, num_classes, average=None)
    f1 = multilabel_f1_score(probs, target, num_classes, average=None)
    return {"map": float(ap[positive].mean()) if positive.any() else float("nan"),
            "f1": float(f1[seen].mean()) if seen.any() else float("nan")}
