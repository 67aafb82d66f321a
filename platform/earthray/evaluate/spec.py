"""The evaluation spec (``jobs/evaluate-*.yaml``): data, probes, feature extraction, tracking, seed."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from earthray.config import InputPath, RuntimeSpec, StrictModel, TrackingSpec, load_yaml

Method = Literal["linear", "knn"]


class EvalDataSpec(StrictModel):
    root: InputPath = Field(description="an ingest output folder (holds manifest.json)")
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


class EvalTrackingSpec(TrackingSpec):
    experiment: str = "earthray-evaluate"


class EvaluateSpec(RuntimeSpec):
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
    seed: int = 0

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"methods must not repeat, got {v}")
        return v

    @property
    def tracking_uri(self) -> str:
        """Where runs are logged and ``models:/`` URIs are looked up (as pretraining's ``tracking_uri``)."""
        return self.tracking.uri(self.workdir)


def load_evaluate_spec(path: str | Path) -> EvaluateSpec:
    """Load a spec; ``workdir`` and ``data.root`` are relative to the spec file."""
    return load_yaml(path, EvaluateSpec)
