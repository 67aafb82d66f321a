"""The pretraining job spec: one YAML file that reproduces a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from earthray.config import StrictModel, load_yaml


class DataSpec(StrictModel):
    root: str = Field(description="an ingest output folder (holds manifest.json)")
    groups: dict[str, int] = Field(min_length=1, description="shard group -> per-worker batch size")
    split: str = "train"
    max_dates: int = Field(8, ge=1, description="dates sampled per time series")
    augment: bool = True
    decode_cpus: float = Field(0.25, gt=0, description="CPUs per Ray Data decode task")


class OptimSpec(StrictModel):
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    clip_grad: float | None = Field(1.0, gt=0)


class StrategySpec(StrictModel):
    name: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[1, 2, 3] = 2
    offload: bool = Field(False, description="ZeRO-Offload of optimizer states (and params at stage 3) to CPU")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class WorkersSpec(StrictModel):
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional on small machines, so Ray Data keeps CPUs")
    use_gpu: bool = False
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="extra Ray resources per worker, e.g. to pin workers to a node pool")


class TrackingSpec(StrictModel):
    tracking_uri: str | None = Field(None, description="default: sqlite:///<workdir>/mlflow.db")
    experiment: str = "earthray-pretrain"
    log_every: int = Field(10, ge=1)
    preview_every: int = Field(0, ge=0, description="reconstruction preview PNGs every N steps (0: off)")


class PretrainSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="run name: starting it again resumes it")
    workdir: str = "work"
    recipe: str
    preset: str = "tiny"
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the recipe preset")
    data: DataSpec
    optim: OptimSpec = OptimSpec()
    strategy: StrategySpec = StrategySpec()
    workers: WorkersSpec = WorkersSpec()
    tracking: TrackingSpec = TrackingSpec()
    max_steps: int = Field(ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=0, description="worker failures survived by resuming from the last checkpoint")
    seed: int = 0
    address: str | None = Field(None, description="Ray cluster address; None starts or joins a local Ray")

    @model_validator(mode="after")
    def _precision_available(self) -> PretrainSpec:
        if self.strategy.precision == "fp16" and not self.workers.use_gpu:
            raise ValueError("strategy.precision: fp16 needs GPUs; on CPU use bf16 or fp32")
        return self

    @property
    def storage_path(self) -> str:
        return str(Path(self.workdir, "runs").resolve())

    @property
    def tracking_uri(self) -> str:
        return self.tracking.tracking_uri or f"sqlite:///{Path(self.workdir, 'mlflow.db').resolve()}"


def load_pretrain_spec(path: str | Path) -> PretrainSpec:
    """Load a spec; ``workdir`` and ``data.root`` are relative to the spec file."""
    spec = load_yaml(path, PretrainSpec)
    base = Path(path).resolve().parent
    for obj, attr in ((spec, "workdir"), (spec.data, "root")):
        value = getattr(obj, attr)
        if "://" not in value:
            setattr(obj, attr, str((base / value).resolve()))
    return spec
