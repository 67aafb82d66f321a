"""The pretraining job spec: one YAML file that reproduces a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from earthray.config import InputPath, RuntimeSpec, StrictModel, load_yaml
from earthray.config import TrackingSpec as BaseTrackingSpec
from earthray.tasks import TaskSpec


class DataSpec(StrictModel):
    root: InputPath = Field(description="an ingest output folder (holds manifest.json)")
    groups: dict[str, int] = Field(min_length=1, description="shard group -> per-worker batch size")
    split: str = "train"
    label: str | None = Field(None, description="fine-tuning: the label layer to learn (default: each group's first)")
    sensors: list[str] | None = Field(None, min_length=1, description="train on these of the groups' sensors only "
                                      "(default: all), e.g. one modality of co-located pairs")
    max_dates: int = Field(8, ge=1, description="dates sampled per time series")
    augment: bool = True
    shuffle_buffer: int = Field(1024, ge=0, description="rows per worker and group mixed before batching, with an "
                                "order drawn anew each epoch (shards keep chips in scene order: without it a batch "
                                "is one small area); 0: shard order")
    decode_cpus: float = Field(0.25, gt=0, description="CPUs per Ray Data read task (batches are decoded by the worker that consumes them)")
    cache_mb: float = Field(512, ge=0, description="per worker and group: keep a group's batches in memory after "
                            "one epoch when they fit (small sets skip a stream restart per epoch); 0: never")


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


class TrackingSpec(BaseTrackingSpec):
    experiment: str = "earthray-pretrain"
    log_every: int = Field(10, ge=1)
    preview_every: int = Field(0, ge=0, description="reconstruction preview PNGs every N steps (0: off)")


class TrainSpec(RuntimeSpec):
    """What every training job has: data, optimiser, distribution, workers, tracking, steps, checkpoints."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="run name: starting it again resumes it")
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

    @model_validator(mode="after")
    def _precision_available(self) -> TrainSpec:
        if self.strategy.precision == "fp16" and not self.workers.use_gpu:
            raise ValueError("strategy.precision: fp16 needs GPUs; on CPU use bf16 or fp32")
        return self

    @property
    def storage_path(self) -> str:
        return str(Path(self.workdir, "runs").resolve())

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri(self.workdir)


class PretrainSpec(TrainSpec):
    recipe: str
    preset: str = "tiny"
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the recipe preset")


class EvalSpec(StrictModel):
    split: str = Field("val", description="held-out split the metrics are computed on")
    every: int = Field(0, ge=0, description="also evaluate every N steps (0: only at the end)")
    batch_size: int = Field(32, ge=1)


class RegisterSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="registered model name in the MLflow registry")
    aliases: list[str] = Field(default_factory=lambda: ["latest-finetune"],
                               description="aliases pointing at the new version, e.g. champion")


class FinetuneSpec(TrainSpec):
    bundle: InputPath = Field(description="pretrained bundle: a folder or a models:/NAME@ALIAS registry URI")
    task: TaskSpec
    eval: EvalSpec = EvalSpec()
    registry: RegisterSpec | None = Field(None, description="register the result in the MLflow Model Registry")
    tracking: TrackingSpec = TrackingSpec(experiment="earthray-finetune")


def load_train_spec(path: str | Path, cls: type[TrainSpec]) -> TrainSpec:
    """Load a spec; ``workdir``, ``data.root`` and a bundle folder are relative to the spec file."""
    return load_yaml(path, cls)


def load_pretrain_spec(path: str | Path) -> PretrainSpec:
    return load_train_spec(path, PretrainSpec)


def load_finetune_spec(path: str | Path) -> FinetuneSpec:
    return load_train_spec(path, FinetuneSpec)
