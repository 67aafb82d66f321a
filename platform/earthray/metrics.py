"""Single-label metric definitions shared by fine-tuning (``earthray.tasks``) and
frozen-encoder evaluation (``earthray.evaluate``), so that an IoU means the same in both.

They are torchmetrics modules: ``compute()`` reduces across Ray Train workers (torch.distributed),
and a single process calls them on whole tensors. This module depends on torch and torchmetrics
only, so every layer may import it; torchmetrics (seconds to import) loads on the first call.

A class neither labelled nor predicted has no IoU: its per-class IoU is NaN (torchmetrics'
``zero_division``), and the macro ``miou`` (and ``f1``) leave it out. A class predicted but never
labelled (or labelled but never predicted) scores 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torchmetrics import Metric
    from torchmetrics.classification import MulticlassJaccardIndex


def per_class_iou(num_classes: int, *, ignore_index: int | None = None) -> MulticlassJaccardIndex:
    """IoU of each class, shape (num_classes,); NaN where the class is neither labelled nor predicted."""
    from torchmetrics.classification import MulticlassJaccardIndex

    return MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index, zero_division=float("nan"))


def class_metrics(num_classes: int, *, ignore_index: int | None = None, iou: bool = True) -> dict[str, Metric]:
    """``oa`` (micro accuracy) and ``f1`` (macro); with ``iou`` also ``miou`` (macro) and ``iou``
    (:func:`per_class_iou`). Macro averages leave out classes neither labelled nor predicted."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

    metrics: dict[str, Metric] = {
        "oa": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        "f1": MulticlassF1Score(num_classes, average="macro", ignore_index=ignore_index),
    }
    if iou:
        # zero_division stays 0 here: a NaN class would make the whole macro average NaN
        metrics["miou"] = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=ignore_index)
        metrics["iou"] = per_class_iou(num_classes, ignore_index=ignore_index)
    return metrics
