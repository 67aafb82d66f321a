"""Building blocks for the training tests: tiny specs and recipes' tiny jobs on the sample shards, checkpoints,
MLflow look-ups, the checkpoints Ray Train has registered, the Train workers of this process's own Ray."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psutil
import pytest
from ray import cloudpickle
from ray.train import UserCallback

from earthray.config import read_yaml
from earthray.train.spec import PretrainSpec

# The Train controller runs the callbacks below in a process of its own, where this folder is not on the path.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def tiny_job(recipe: str) -> dict:
    """The recipe's tiny job (``jobs/pretrain-<recipe>-tiny.yaml``) as plain data; a test failure if there is none."""
    path = JOBS / f"pretrain-{recipe}-tiny.yaml"
    if not path.is_file():
        pytest.fail(f"recipe {recipe!r} is registered but has no tiny job {path.relative_to(JOBS.parent)}: every "
                    "recipe needs one (the recipe contract test runs it through the real loop); add it")
    job = read_yaml(path)
    assert job.get("recipe") == recipe and job.get("preset", "tiny") == "tiny", f"{path}: not {recipe}'s tiny job"
    return job


def tiny_job_spec(recipe: str, root: str, workdir: Path, name: str, max_batch: int = 4, model: dict | None = None,
                  optim: dict | None = None, **overrides) -> PretrainSpec:
    """The tiny job's data (groups, batch sizes capped at ``max_batch``, dates) and model overrides
    (updated by ``model``) on the shards at ``root``, with its optimiser settings (updated by
    ``optim``) and no warm-up; ``overrides`` replace any other field (steps, strategy, ...)."""
    job = tiny_job(recipe)
    data = {**job["data"], "root": root,
            "groups": {g: min(b, max_batch) for g, b in job["data"]["groups"].items()}}
    return PretrainSpec.model_validate({
        "name": name, "workdir": str(workdir), "recipe": recipe, "preset": "tiny",
        "model": {**job.get("model", {}), **(model or {})}, "data": data,
        "optim": {**job.get("optim", {}), "warmup_steps": 0, **(optim or {})},
        "tracking": {"log_every": 1}, **overrides,
    })


def checkpoints_by_step(spec: PretrainSpec) -> dict[int, Path]:
    """The run's checkpoint folders still on disk, by the step they were taken at."""
    run = Path(spec.storage_path) / spec.name
    states = run.glob("checkpoint_*/trainer_state.json")
    return {json.loads(state.read_text())["step"]: state.parent for state in states}


def tiny_spec(root: str, workdir: Path, name: str, **overrides) -> PretrainSpec:
    spec = {
        "name": name, "workdir": str(workdir), "recipe": "ofa", "preset": "tiny",
        "data": {"root": root, "groups": {"vhr_rgbn": 8}},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "max_steps": 6, "checkpoint_every": 3, "tracking": {"log_every": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return PretrainSpec.model_validate(spec)


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def check_resumed_once(steps: list[int], resumed: list[int], max_steps: int, every: int) -> None:
    """One restart from a checkpoint; every step logged, and only the steps after that checkpoint redone.

    The span redone is not bounded by ``every``: a checkpoint the workers reported just before the
    failure may not be registered by the controller yet, and a restart resumes from a registered one.
    """
    assert len(resumed) == 1 and resumed[0] % every == 0 and resumed[0] >= every, resumed
    assert set(steps) == set(range(1, max_steps + 1)), "steps lost"
    repeated = sorted(s for s in set(steps) if steps.count(s) > 1)
    assert all(steps.count(s) == 2 for s in repeated), "a step logged more than twice"
    assert repeated == list(range(resumed[0] + 1, resumed[0] + 1 + len(repeated))), (resumed, repeated)


class RecordRegisteredCheckpoints(UserCallback):
    """Appends the step of each checkpoint Ray Train's controller has registered (what a restarted worker
    group resumes from) to ``path``, one line each.

    A checkpoint folder appears as soon as the workers upload it; the controller registers it a moment
    later, and calls its callbacks' ``after_report`` only then. Pass it to ``pretrain(spec, callbacks=...)``;
    it runs in the controller's process, so it reports through a file.
    """

    def __init__(self, path: Path):
        self.path = str(path)

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if checkpoint is not None:
            with open(self.path, "a") as f:
                f.write(f"{metrics[0]['step']}\n")


def registered_steps(path: Path) -> list[int]:
    """The steps ``RecordRegisteredCheckpoints`` has recorded in ``path`` so far."""
    try:
        return [int(line) for line in Path(path).read_text().split()]
    except FileNotFoundError:
        return []


def registered_checkpoint_steps(spec) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered, read from its internal
    ``checkpoint_manager_snapshot.json``: only for runs a test cannot give a callback (the trials of a
    sweep, in test_sweep.py); everywhere else use ``RecordRegisteredCheckpoints``."""
    path = Path(spec.storage_path) / spec.name / "checkpoint_manager_snapshot.json"
    try:
        snapshot = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [r["metrics"]["step"] for r in snapshot.get("checkpoint_results", [])]


def own_train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train workers of the Ray this process started (its descendants: a local Ray's
    raylet is this process's child, its workers the raylet's), never another process's Ray."""
    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
        except psutil.Error:  # ended meanwhile
            continue
    return pids
