"""MLflow tracking: the driver opens (or reopens) the run, rank 0 logs into it by id.

Logging by run id through ``MlflowClient`` keeps no per-process "active run", so a worker
restarted after a failure, or a resumed job, keeps writing to the same run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

RUN_TAG = "earthray.run_name"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec -> ``{"optim.lr": "0.001", ...}``, the form MLflow params take."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {re.sub(r"[^\w\-. :/]", "_", prefix.rstrip(".")): str(data)[:6000]}  # MLflow's key charset


def open_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], artifact_root: Path,
             tags: dict[str, str] | None = None) -> str:
    """The run named ``run_name`` in ``experiment`` (created if new, with ``tags``, e.g. a parent run's
    ``mlflow.parentRunId``), with ``params`` logged once."""
    from mlflow.entities import Param

    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    # A local store keeps artifacts beside the workdir; a tracking server decides where its artifacts go.
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=(artifact_root / experiment).resolve().as_uri() if local else None)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_TAG: run_name, **(tags or {})})
    flat = flatten(params)
    items = [Param(k, v) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int, wait: bool = True):
    """``wait=False`` queues the batch on MLflow's logging thread and returns its ``RunOperations``:
    ``.wait()`` on it raises what the write raised."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client = _client(uri)
    return client.log_batch(run_id, metrics=[Metric(k.replace("/", "."), float(v), now, step)
                                             for k, v in metrics.items()], synchronous=wait)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """A file, or a folder's contents, under ``artifact_path``."""
    client = _client(uri)
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def close_run(uri: str, run_id: str, ok: bool) -> None:
    set_status(uri, run_id, "FINISHED" if ok else "FAILED")


def run_status(uri: str, run_id: str) -> str | None:
    """The run's status (RUNNING, FINISHED, FAILED, KILLED), or None if the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_run(run_id).info.status
    except MlflowException:
        return None


def set_status(uri: str, run_id: str, status: str) -> None:
    """End the run as ``status`` (FINISHED, FAILED or KILLED)."""
    _client(uri).set_terminated(run_id, status=status)
