"""What each fine-tuning task is: its head, per pixel or per scene, classes or bands, dates per sample.

Apart from ``earthray.tasks`` (the models for them) so that code reading or checking inputs, such as
batch inference's read tasks, knows the tasks without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Task = Literal["classification", "multilabel", "segmentation", "change", "regression", "translation"]


@dataclass(frozen=True)
class TaskType:
    """What a task is, once: the head it gets, whether it answers per pixel or per scene, whether
    its outputs are classes (scored with ``ignore_index`` skipped) or a target sensor's bands."""

    head: str
    dense: bool
    classes: bool
    dates: int = 1
    """Dates per sample the model reads (change detection: two)."""


TASKS: dict[str, TaskType] = {
    "classification": TaskType("classification", dense=False, classes=True),
    "multilabel": TaskType("classification", dense=False, classes=True),
    "segmentation": TaskType("fpn", dense=True, classes=True),
    "change": TaskType("change", dense=True, classes=True, dates=2),
    "regression": TaskType("fpn", dense=True, classes=False),
    "translation": TaskType("fpn", dense=True, classes=False),
}
