"""The sweep spec: a search space over any field of a pretraining job, and how each trial's encoder is scored.

A field is named by its dotted path in the job spec (``optim.lr``, ``data.groups.vhr_rgbn``);
``model.<field>`` is a field of the recipe's config, whether the job sets it or leaves it at its
preset, and a numeric segment indexes a sequence (``model.cgcl_weights.0`` is MaRS's alpha).
Every path and every value a sweep can produce is checked against the base job when the spec
is loaded, so a typo fails before any trial starts.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from earthray.config import (
    ConfigError,
    InputPath,
    OutputPath,
    StrictModel,
    TrackingSpec,
    format_validation_error,
    load_yaml,
    resolve_paths,
    validate,
)
from earthray.data.manifest import load_manifest
from earthray.evaluate import EvaluateSpec, load_evaluate_spec
from earthray.recipes import get_recipe_class, resolve_config
from earthray.train.run import sensors_of
from earthray.train.spec import PretrainSpec, load_pretrain_spec

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SET_BY_SWEEP = ("name", "workdir", "address", "tracking.tracking_uri", "tracking.experiment")
"""Job fields every trial gets from the sweep (its own name and folder, the sweep's Ray and MLflow)."""
SCORES = ("oa", "miou", "f1", "map")


class Distribution(StrictModel):
    """One field's values: exactly one of the kinds. ``randint`` includes both ends."""

    grid: list[Any] | None = Field(None, min_length=1, description="every value, in every sample (random search)")
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        if self.kind in ("uniform", "loguniform", "randint"):
            lo, hi = self.value
            if not lo < hi:
                raise ValueError(f"{self.kind}: the lower bound {lo} must be below the upper bound {hi}")
            if self.kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: bounds must be positive (got {lo})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    def candidates(self) -> list[Any]:
        """Values to check against the job spec: every listed value, or both bounds."""
        return list(self.value)

    def to_tune(self):
        from ray import tune

        v = self.value
        return {"grid": lambda: tune.grid_search(list(v)), "choice": lambda: tune.choice(list(v)),
                "uniform": lambda: tune.uniform(*v), "loguniform": lambda: tune.loguniform(*v),
                "randint": lambda: tune.randint(v[0], v[1] + 1)}[self.kind]()


class HeldoutSpec(StrictModel):
    """The recipe's own loss terms on a held-out split: the objective where no labelled group fits the model."""

    group: str = Field(description="a shard group the model encodes")
    split: str = "val"
    root: InputPath | None = Field(None, description="ingest output folder; default: the base job's data.root")
    batch_size: int = Field(8, ge=1)
    seed: int = Field(0, description="fixes the masks, so every trial is scored on the same ones")
    decode_cpus: float = Field(0.25, gt=0)


class ObjectiveSpec(StrictModel):
    evaluate: InputPath | dict[str, Any] | None = Field(
        None, description="linear probe / kNN evaluation spec: a path (relative to the sweep file) or inline")
    heldout: HeldoutSpec | None = None
    metric: str = Field(description="evaluate: <method>/<score>, e.g. knn/miou; heldout: heldout/<loss term>")
    mode: Literal["max", "min"] | None = Field(None, description="default: max for scores, min for losses")

    @model_validator(mode="after")
    def _one_kind(self) -> ObjectiveSpec:
        if (self.evaluate is None) == (self.heldout is None):
            raise ValueError("give exactly one of evaluate (probe scores on labels) or heldout (held-out loss terms)")
        if self.heldout is not None and not self.metric.startswith("heldout/"):
            raise ValueError(f"metric: with heldout, name a loss term as heldout/<term> (got {self.metric!r})")
        if self.mode is None:
            self.mode = "min" if self.heldout is not None else "max"
        return self


class SearchSpec(StrictModel):
    algorithm: Literal["random", "optuna"] = "random"
    num_samples: int = Field(4, ge=1, description="trials (random search with grid: repeats of the grid)")
    seed: int = 0


class SchedulerSpec(StrictModel):
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: steps before a trial can be stopped (the first rung)")
    reduction_factor: int = Field(2, ge=2, description="ASHA: rungs at grace_period * reduction_factor**k steps")


class ResourcesSpec(StrictModel):
    """What Tune reserves per trial; the Train workers reserve their own (the base job's ``workers``)."""

    trial_cpus: float = Field(0.1, gt=0, description="the trial driver (builds and fits the TorchTrainer)")
    probe_cpus: float = Field(0.1, gt=0, description="the task that scores checkpoints (export, features, probes)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster's CPUs fit")


class SweepTrackingSpec(TrackingSpec):
    experiment: str = "earthray-sweep"


class SweepSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="sweep name: running it again resumes it")
    workdir: OutputPath = "work"
    base: InputPath = Field(description="the pretraining job spec every trial starts from (relative to the sweep file)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="fixed values for every trial, by field path")
    space: dict[str, Distribution] = Field(min_length=1, description="field path -> distribution")
    objective: ObjectiveSpec
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: SweepTrackingSpec = SweepTrackingSpec()
    address: str | None = Field(None, description="Ray cluster address; None starts or joins a local Ray")

    @field_validator("space", "overrides")
    @classmethod
    def _no_empty_segments(cls, v: dict) -> dict:
        for path in v:
            if not path or any(not p for p in path.split(".")):
                raise ValueError(f"{path!r} is not a dotted field path")
        return v


# ------------------------------------------------------------------------------------------- field paths


def _recipe_defaults(job: dict) -> dict:
    return resolve_config(job["recipe"], job["preset"], **job["model"]).model_dump(mode="json")


def check_path(job: dict, path: str) -> str | None:
    """Why ``path`` names no field of the job (plain data of a PretrainSpec), or None."""
    for fixed in SET_BY_SWEEP:
        if path == fixed or path.startswith(fixed + ".") or fixed.startswith(path + "."):
            return f"{fixed} is set by the sweep for each trial"
    keys = path.split(".")
    node: Any = job
    for i, key in enumerate(keys):
        where = ".".join(keys[:i]) or "the job spec"
        if i == 1 and keys[0] == "model":
            fields = get_recipe_class(job["recipe"]).Config.model_fields
            if key not in fields:
                return f"recipe {job['recipe']!r} has no config field {key!r}; its fields: {', '.join(fields)}"
            node = job["model"].get(key, _recipe_defaults(job)[key])
        elif isinstance(node, dict):
            if key not in node:
                return f"{where} has no field {key!r}; it has: {', '.join(map(str, node)) or 'nothing'}"
            node = node[key]
        elif isinstance(node, list | tuple):
            if not key.isdigit() or int(key) >= len(node):
                return f"{where} is a list of {len(node)}; {key!r} is not an index in it"
            node = node[int(key)]
        else:
            return f"{where} is a single value ({node!r}); it has no field {key!r}"
    return None


def assign(job: dict, path: str, value: Any) -> None:
    """Set ``path`` (already checked) in the job's plain data, in place."""
    keys = path.split(".")
    if keys[0] == "model" and len(keys) > 2 and keys[1] not in job["model"]:
        job["model"][keys[1]] = _recipe_defaults(job)[keys[1]]
    node = job
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def job_data(spec: PretrainSpec) -> dict:
    return spec.model_dump(mode="json")


def build_job(data: dict, values: dict[str, Any], **fixed: Any) -> PretrainSpec:
    """The job spec with ``values`` (by field path) and ``fixed`` top-level fields applied; validated."""
    job = copy.deepcopy(data)
    for path, value in values.items():
        assign(job, path, value)
    job.update(fixed)
    spec = PretrainSpec.model_validate(job)
    resolve_config(spec.recipe, spec.preset, **spec.model)
    return spec


def _check_values(data: dict, values: dict[str, Any], where: str) -> None:
    try:
        build_job(data, values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where)) from None
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e.args[0] if isinstance(e, KeyError) else e}") from None


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class Sweep:
    """A loaded sweep: the spec and what it resolves to (the base job with overrides, the objective)."""

    spec: SweepSpec
    source: str
    base: PretrainSpec
    evaluation: EvaluateSpec | None
    heldout: HeldoutSpec | None

    @property
    def metric(self) -> str:
        return self.spec.objective.metric

    @property
    def mode(self) -> str:
        return self.spec.objective.mode or "max"

    @property
    def tracking_uri(self) -> str:
        return self.spec.tracking.uri(self.spec.workdir)

    @property
    def experiment_path(self) -> Path:
        return Path(self.spec.workdir, "tune", self.spec.name).resolve()

    @property
    def trials_dir(self) -> Path:
        """Each trial's job folder (checkpoints, bundle, result) is ``trials_dir / <trial id>``."""
        return Path(self.spec.workdir, "trials", self.spec.name).resolve()

    def milestones(self) -> list[int]:
        """Steps at which a trial reports its score before the end: ASHA's rungs below ``max_steps``."""
        s = self.spec.scheduler
        if s.name != "asha":
            return []
        out, step = [], s.grace_period
        while step < self.base.max_steps:
            out.append(step)
            step *= s.reduction_factor
        return out

    def fingerprint(self) -> str:
        """What a resumed sweep must share with the one it resumes (not resources or tracking)."""
        s = self.spec
        data = {"space": {k: v.model_dump(exclude_none=True) for k, v in s.space.items()},
                "search": s.search.model_dump(), "scheduler": s.scheduler.model_dump(),
                "objective": {"metric": self.metric, "mode": self.mode,
                              "evaluate": self.evaluation.model_dump() if self.evaluation else None,
                              "heldout": self.heldout.model_dump() if self.heldout else None},
                "base": {k: v for k, v in job_data(self.base).items() if k not in ("name", "workdir", "address")}}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _load_evaluation(value: str | dict, here: Path, source: str) -> EvaluateSpec:
    if isinstance(value, str):
        return load_evaluate_spec(here / value)
    return resolve_paths(validate(EvaluateSpec, value, f"{source}: objective.evaluate"), here)


def _check_objective(sweep: Sweep, source: str) -> None:
    """The objective must score something the trials' encoders can read."""
    base = sweep.base
    if sweep.evaluation is not None:
        method, _, score = sweep.metric.partition("/")
        if method not in sweep.evaluation.methods or score not in SCORES:
            choices = [f"{m}/{s}" for m in sweep.evaluation.methods for s in SCORES]
            raise ConfigError(f"{source}: objective.metric: {sweep.metric!r} is not a score the evaluation gives; "
                              f"one of {', '.join(choices)}")
        root, group, what = sweep.evaluation.data.root, sweep.evaluation.data.group, "objective.evaluate: data.group"
    else:
        root, group, what = sweep.heldout.root, sweep.heldout.group, "objective.heldout.group"
    trained = {s.name for s in sensors_of(load_manifest(base.data.root), list(base.data.groups))}
    manifest = load_manifest(root)
    if group not in manifest["groups"]:
        raise ConfigError(f"{source}: {what}: no group {group!r} in {root}; groups: {', '.join(manifest['groups'])}")
    needs = set(manifest["groups"][group]["bands"])
    if not needs <= trained:
        raise ConfigError(
            f"{source}: {what}: group {group!r} holds sensors {sorted(needs)}, but the base job trains only "
            f"{sorted(trained)} (its data.groups: {', '.join(base.data.groups)}); add a group with "
            f"{', '.join(sorted(needs - trained))} to the job's data.groups, or score a group the model encodes")


def load_sweep(path: str | Path) -> Sweep:
    """Load a sweep spec and check it against its base job: paths, values, objective, scheduler."""
    source = str(path)
    spec = load_yaml(path, SweepSpec)
    here = Path(path).resolve().parent
    base_path = Path(spec.base)
    if not base_path.is_file():
        raise ConfigError(f"{source}: base: no job spec at {base_path}")
    base = load_pretrain_spec(base_path)
    for p in spec.overrides:
        why = check_path(job_data(base), p)
        if why:
            raise ConfigError(f"{source}: overrides.{p}: {why}")
    _check_values(job_data(base), spec.overrides, f"{source}: overrides" if spec.overrides else f"{base_path}")
    base = build_job(job_data(base), spec.overrides)
    data = job_data(base)
    for p, dist in spec.space.items():
        why = check_path(data, p)
        if why:
            raise ConfigError(f"{source}: space.{p}: {why}")
        for value in dist.candidates():
            _check_values(data, {p: value}, f"{source}: space.{p} = {value!r}")
    if spec.search.algorithm == "optuna":
        for p, dist in spec.space.items():
            if dist.kind == "grid":
                raise ConfigError(f"{source}: space.{p}: grid needs search.algorithm random (Optuna samples; "
                                  "use choice)")
            if dist.kind == "choice" and not all(v is None or isinstance(v, bool | int | float | str)
                                                 for v in dist.value):
                raise ConfigError(f"{source}: space.{p}: Optuna chooses among plain values (numbers, strings), "
                                  f"got {dist.value}; sweep each element by index (e.g. {p}.0) instead")
    if spec.scheduler.name == "asha" and spec.scheduler.grace_period > base.max_steps:
        raise ConfigError(f"{source}: scheduler.grace_period: {spec.scheduler.grace_period} steps exceeds the "
                          f"job's max_steps {base.max_steps}")
    o = spec.objective
    evaluation = _load_evaluation(o.evaluate, here, source) if o.evaluate is not None else None
    heldout = None
    if o.heldout is not None:
        heldout = o.heldout.model_copy(update={"root": o.heldout.root or base.data.root})
    sweep = Sweep(spec, source, base, evaluation, heldout)
    _check_objective(sweep, source)
    return sweep
