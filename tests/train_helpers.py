"""Building blocks for the training tests: a tiny spec on the sample shards, MLflow look-ups."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from earthray.train.spec import PretrainSpec


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


def registered_checkpoint_steps(spec: PretrainSpec) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (what a restart resumes from).

    A checkpoint folder appears as soon as the workers upload it; the controller registers it a
    moment later and persists its list in ``checkpoint_manager_snapshot.json``.
    """
    path = Path(spec.storage_path) / spec.name / "checkpoint_manager_snapshot.json"
    try:
        snapshot = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [r["metrics"]["step"] for r in snapshot.get("checkpoint_results", [])]


def ray_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (their process title names the actor class)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if "RayTrainWorker" in line]
