"""Ray Tune sweeps over pretraining jobs, each trial scored by probing its encoder.

A trial is a function that applies its configuration to the base job and fits it with a
TorchTrainer (Ray Train V2 has no ``Tuner(trainer)``). Pretraining losses cannot rank trials
whose loss weights differ, so the objective is a score of the encoder: the linear-probe / kNN
evaluation on a labelled held-out split, or, where no labelled group fits the model, the
recipe's own loss terms on a held-out split (comparable only for terms the swept fields do
not weigh).

ASHA stops on that same score: the trial checkpoints at every rung (``grace_period *
reduction_factor**k`` steps), and a Train callback (a ``TuneReportCallback``) scores each rung's
checkpoint before it forwards the report to Tune; the other reports of the run are not
forwarded, since Tune and its searchers require the metric in every result. The last score
comes from the trial's exported bundle.

Resources: Tune reserves per trial a placement group of the trial driver and the probe task;
the Train workers reserve their own placement group, and Ray Data tasks run outside both. Tune
cannot see the workers' share, so the number of concurrent trials is set from the cluster's
CPUs (one trial at a time on a laptop), never more than fit. A stopped trial's worker placement
group is removed by the sweep (see ``release_placement_group``).

Re-running a sweep resumes it (``Tuner.restore``): finished trials stay finished, errored and
unfinished ones restart, and a restarted trial's pretraining resumes from its last registered
checkpoint (a trial resumed past a rung is not scored at that rung).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from earthray.config import ConfigError
from earthray.runtime import ensure_ray
from earthray.train import tracking
from earthray.tune.spec import HeldoutSpec, Sweep, build_job, job_data

RESULT_FILE = "trial_result.json"
PLACEMENT_FILE = "train_placement_group.json"
SWEEP_TAG = "earthray.sweep"
READ_CPUS = 1.0
"""What a Ray Data read task reserves (Ray Data's default for map tasks)."""


# -------------------------------------------------------------------------------------------- scoring


def heldout_losses(bundle: str | Path, spec: HeldoutSpec) -> dict[str, float]:
    """The recipe's loss terms, averaged over a held-out split, with the masks fixed by ``spec.seed``."""
    import torch

    from earthray.bundle import load_bundle
    from earthray.data.pipeline import read_group

    loaded = load_bundle(str(bundle))
    ensure_ray(None, preserve_order=True)
    ds = read_group(spec.root, spec.group, spec.split, seed=spec.seed, num_cpus=spec.decode_cpus, labels=False,
                    normalisation=loaded.input_stats())
    model = loaded.model.eval()
    torch.manual_seed(spec.seed)
    sums: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for batch in ds.iter_torch_batches(batch_size=spec.batch_size):
            n = len(next(iter(batch.values())))
            for key, value in model(batch).items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
            count += n
    if not count:
        raise ValueError(f"{spec.root}: group {spec.group!r} has no chips in split {spec.split!r}")
    return {f"heldout/{k}": v / count for k, v in sums.items()}


def score_encoder(plan: dict, job: dict, sensors: list[dict], run_id: str, step: int,
                  checkpoint: str | None = None, bundle: str | None = None) -> dict[str, float]:
    """The objective's scores of a checkpoint (exported to a temporary bundle) or a bundle, logged to the trial's run."""
    from earthray.recipes import resolve_config
    from earthray.sensors import Sensor
    from earthray.train.evaluate import EvaluateSpec, evaluate
    from earthray.train.run import export_bundle
    from earthray.train.spec import PretrainSpec

    spec = PretrainSpec.model_validate(job)
    Path(spec.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=spec.workdir, prefix="probe-") as tmp:
        if checkpoint is not None:
            config = resolve_config(spec.recipe, spec.preset, **spec.model).model_dump()
            bundle = str(export_bundle(spec, [Sensor.model_validate(s) for s in sensors], config, Path(checkpoint),
                                       run_id, Path(tmp, "bundle")))
        if plan["evaluation"] is not None:
            scores = evaluate(bundle, EvaluateSpec.model_validate(plan["evaluation"]), log=False).scores
        else:
            scores = heldout_losses(bundle, HeldoutSpec.model_validate(plan["heldout"]))
    if plan["metric"] not in scores:
        raise ValueError(f"objective.metric {plan['metric']!r} is not among the scores: {', '.join(sorted(scores))}")
    tracking.log_metrics(plan["tracking_uri"], run_id, {f"probe/{k}": v for k, v in scores.items() if v == v}, step)
    return scores


@dataclass
class Probe:
    """Scores an encoder in a Ray task (inside the trial's placement group, in its probe bundle)."""

    plan: dict
    job: dict
    sensors: list[dict]
    run_id: str

    def __call__(self, step: int, checkpoint: str | None = None, bundle: str | None = None) -> dict[str, float]:
        import ray

        task = ray.remote(score_encoder).options(num_cpus=self.plan["probe_cpus"], max_retries=0)
        return ray.get(task.remote(self.plan, self.job, self.sensors, self.run_id, step, checkpoint, bundle))


class ProbeReportCallback(TuneReportCallback):
    """Forwards a Train report to Tune only at a rung, with the rung checkpoint's probe scores added.

    Runs in the Train controller; while it scores, the workers wait at their next report."""

    def __init__(self, probe: Probe, milestones: list[int]):
        super().__init__()
        self.probe = probe
        self.milestones = set(milestones)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = metrics[0]
        step = reported.get("step")
        if checkpoint is None or step not in self.milestones:
            return
        result = {**self.probe(step, checkpoint=checkpoint.path), "step": step, "run_id": self.probe.run_id,
                  "checkpoint_path": checkpoint.path}
        if "loss" in reported:
            result["loss"] = reported["loss"]
        self._training_actor_item_queue.put(result)


# ------------------------------------------------------------------------ placement groups of stopped trials
#
# A trial stopped by the scheduler or an interruption is killed with its Train controller, and
# the Train workers' placement group outlives it: Ray Train's own cleaner watches the controller
# through the State API, which a local Ray started without the dashboard does not serve. Left
# alone, such groups hold CPUs until the sweep's driver exits, and on a small machine the next
# trial can never schedule its data reads. So the controller records its workers' placement
# group in the trial folder, and the sweep removes it once that controller is dead.


class RecordWorkerPlacementGroup(WorkerGroupCallback):
    """In the Train controller: writes the worker group's placement group and the controller's id."""

    def __init__(self, path: str):
        self.path = path

    def after_worker_group_start(self, worker_group) -> None:
        import ray

        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        Path(self.path).write_text(json.dumps({"placement_group": pg.id.hex(),
                                               "controller": ray.get_runtime_context().get_actor_id()}))


def release_placement_group(trial_dir: Path, wait_s: float = 0.0) -> bool:
    """Remove the Train placement group a trial left behind, once its controller is dead.

    Returns whether nothing is left to release (no record, or released); False while the
    controller still runs (after ``wait_s`` seconds of waiting for it)."""
    import time

    import ray
    from ray._private.state import actors
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    record = trial_dir / PLACEMENT_FILE
    if not record.is_file():
        return True
    info = json.loads(record.read_text())
    deadline = time.monotonic() + wait_s
    while (actors(info["controller"]) or {}).get("State", "DEAD") != "DEAD":
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(info["placement_group"])))
    if placement_group_table(pg).get("state") not in (None, "REMOVED"):
        remove_placement_group(pg)
    record.unlink(missing_ok=True)
    return True


class ReleaseStoppedTrials(Callback):
    """In the Tune driver: releases each ended trial's Train placement group as soon as its controller is gone."""

    def __init__(self, trials: str):
        self.trials = trials
        self.pending: set[str] = set()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.pending.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.pending.add(trial.trial_id)

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        self.pending = {t for t in self.pending if not release_placement_group(Path(self.trials, t))}


# ---------------------------------------------------------------------------------------------- trial


def _open_child(plan: dict, job, config: dict) -> str:
    """The trial's MLflow run (also the one its pretraining logs into), a child of the sweep's run."""
    from mlflow.tracking import MlflowClient

    uri = plan["tracking_uri"]
    run_id = tracking.open_run(uri, plan["experiment"], job.name, {**job.model_dump(), "trial": config},
                               Path(plan["workdir"], "mlartifacts"))
    client = MlflowClient(tracking_uri=uri)
    for key, value in {"mlflow.parentRunId": plan["parent_run_id"], SWEEP_TAG: plan["sweep"],
                       f"{SWEEP_TAG}.role": "trial", f"{SWEEP_TAG}.trial_id": plan["trial_id"]}.items():
        client.set_tag(run_id, key, value)
    return run_id


def run_trial(config: dict, plan: dict) -> None:
    """One trial: pretrain the base job with ``config`` applied, report probe scores at each rung and at the end."""
    from ray import tune

    from earthray.data.manifest import load_manifest
    from earthray.train.run import pretrain, sensors_of

    trial_id = tune.get_context().get_trial_id()
    workdir = Path(plan["workdir"], "trials", plan["sweep"], trial_id)
    done = workdir / RESULT_FILE
    if done.is_file():  # it finished before the sweep was interrupted: report it again, train nothing
        tune.report(json.loads(done.read_text()))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    release_placement_group(workdir, wait_s=60)  # an earlier attempt of this trial was killed mid-run
    for stale in workdir.glob("probe-*"):  # bundles exported by a probe killed with that attempt
        shutil.rmtree(stale, ignore_errors=True)
    fixed: dict[str, Any] = {"name": f"{plan['sweep']}-{trial_id}", "workdir": str(workdir), "address": None,
                             "tracking": {**plan["base"]["tracking"], "tracking_uri": plan["tracking_uri"],
                                          "experiment": plan["experiment"]}}
    if plan["checkpoint_every"]:
        fixed["checkpoint_every"] = plan["checkpoint_every"]
    job = build_job(plan["base"], config, **fixed)
    run_id = _open_child({**plan, "trial_id": trial_id}, job, config)
    sensors = sensors_of(load_manifest(job.data.root), list(job.data.groups))
    probe = Probe(plan, job.model_dump(mode="json"), [s.model_dump(mode="json") for s in sensors], run_id)
    result = pretrain(job, callbacks=[ProbeReportCallback(probe, plan["milestones"]),
                                      RecordWorkerPlacementGroup(str(workdir / PLACEMENT_FILE))])
    final = {**probe(job.max_steps, bundle=str(result.bundle)), "step": job.max_steps, "run_id": run_id}
    if "loss" in result.metrics:
        final["loss"] = result.metrics["loss"]
    done.write_text(json.dumps(final))
    tune.report(final)


def _trial_dirname(trial) -> str:
    return trial.trial_id


# ------------------------------------------------------------------------------------------ resources


def max_concurrent_trials(sweep: Sweep, cluster: dict[str, float]) -> int:
    """Trials that fit the cluster at once, counting what Tune cannot see: Train workers and Ray Data.

    A trial needs its driver and probe task (Tune's reservation), its Train workers (their own
    placement group, alive while a rung is scored) and, outside both, Ray Data: one read task
    (a whole CPU) and, while scoring, the feature-extraction actor.
    """
    r, b = sweep.spec.resources, sweep.base
    w = b.workers
    parts = {"trial driver": r.trial_cpus, "probe task": r.probe_cpus,
             f"{w.num_workers} Train worker(s)": w.num_workers * w.cpus_per_worker,
             "Ray Data read task": READ_CPUS}
    if sweep.evaluation is not None:
        parts["feature-extraction actor"] = sweep.evaluation.num_cpus
    need = sum(parts.values())
    have = cluster.get("CPU", 0.0)
    if need > have + 1e-9:
        shown = ", ".join(f"{k} {v:g}" for k, v in parts.items())
        raise ConfigError(f"{sweep.source}: one trial needs {need:g} CPUs ({shown}), the Ray cluster has {have:g}; "
                          "lower resources or the base job's workers, or use a bigger cluster")
    fit = math.floor(have / need + 1e-9)
    if w.use_gpu:
        per_trial = w.num_workers * w.resources.get("GPU", 1.0)
        fit = min(fit, math.floor(cluster.get("GPU", 0.0) / per_trial + 1e-9))
        if fit < 1:
            raise ConfigError(f"{sweep.source}: one trial's Train workers need {per_trial:g} GPUs, the Ray cluster "
                              f"has {cluster.get('GPU', 0.0):g}")
    return r.max_concurrent_trials or fit


# --------------------------------------------------------------------------------------------- sweep


@dataclass
class TrialRow:
    trial_id: str
    status: str
    """done, stopped (by the scheduler), error, or interrupted / pending (a re-run resumes it)."""
    config: dict[str, Any]
    score: float | None
    step: int | None
    loss: float | None
    run_id: str | None
    scores: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class SweepResult:
    name: str
    metric: str
    mode: str
    max_steps: int
    paths: list[str]
    rows: list[TrialRow]
    best: TrialRow | None
    parent_run_id: str
    tracking_uri: str
    experiment_path: Path
    interrupted: bool


def _plan(sweep: Sweep, parent_run_id: str) -> dict:
    s = sweep.spec
    milestones = sweep.milestones()
    return {"sweep": s.name, "workdir": s.workdir, "base": job_data(sweep.base), "milestones": milestones,
            "checkpoint_every": s.scheduler.grace_period if milestones else None,
            "evaluation": sweep.evaluation.model_dump(mode="json") if sweep.evaluation else None,
            "heldout": sweep.heldout.model_dump(mode="json") if sweep.heldout else None,
            "metric": sweep.metric, "tracking_uri": sweep.tracking_uri, "experiment": s.tracking.experiment,
            "parent_run_id": parent_run_id, "probe_cpus": s.resources.probe_cpus}


def _new_tuner(sweep: Sweep, trainable, concurrency: int, verbose: int):
    from ray import tune

    s = sweep.spec
    if s.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search, limit = OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=s.search.seed), concurrency
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search, limit = BasicVariantGenerator(max_concurrent=concurrency, random_state=s.search.seed), None
    scheduler = None
    if s.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", max_t=sweep.base.max_steps, grace_period=s.scheduler.grace_period,
                                  reduction_factor=s.scheduler.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space={path: dist.to_tune() for path, dist in s.space.items()},
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, search_alg=search, scheduler=scheduler,
                                    num_samples=s.search.num_samples, max_concurrent_trials=limit,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=s.name, storage_path=str(sweep.experiment_path.parent),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=verbose,
                                  callbacks=[ReleaseStoppedTrials(str(sweep.trials_dir))]),
    )


def _rows(sweep: Sweep) -> list[TrialRow]:
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(sweep.experiment_path))
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        last = trial.last_result or {}
        step = last.get("step")
        if trial.status == "ERROR":
            status = "error"
        elif trial.status == "TERMINATED":
            status = "done" if step == sweep.base.max_steps else "stopped"
        else:
            status = "pending" if trial.status == "PENDING" and not last else "interrupted"
        scores = {k: float(v) for k, v in last.items()
                  if isinstance(v, int | float) and "/" in k and not k.startswith("config/")}
        error = None
        if trial.status == "ERROR" and trial.error_file and Path(trial.error_file).is_file():
            error = Path(trial.error_file).read_text().strip().splitlines()[-1][:300]
        rows.append(TrialRow(trial.trial_id, status, {p: trial.config.get(p) for p in sweep.spec.space},
                             last.get(sweep.metric), step, last.get("loss"), last.get("run_id"), scores, error))
    return rows


def _best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best score among trials that trained to the end (an early score is not comparable)."""
    done = [r for r in rows if r.status == "done" and r.score is not None and r.score == r.score]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r.score)


def _record(sweep: Sweep, result: SweepResult) -> None:
    """Trial statuses on the child runs; the best trial, its score and every row on the sweep's run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri, parent = result.tracking_uri, result.parent_run_id
    client = MlflowClient(tracking_uri=uri)
    for row in result.rows:
        try:
            run = client.get_run(row.run_id) if row.run_id else None
        except MlflowException:
            run = None
        if run is None:
            if row.run_id:
                logging.getLogger(__name__).warning("trial %s: its MLflow run %s is not in %s", row.trial_id,
                                                    row.run_id, uri)
            continue
        client.set_tag(row.run_id, f"{SWEEP_TAG}.status", row.status)
        # a trial stopped at a rung was killed mid-pretraining, whatever its run recorded then
        final = {"stopped": "KILLED", "error": "FAILED", "interrupted": "KILLED"}.get(row.status)
        if final and run.info.status != final:
            client.set_terminated(row.run_id, status=final)
    counts = {s: sum(r.status == s for r in result.rows) for s in ("done", "stopped", "error", "interrupted")}
    tracking.log_metrics(uri, parent, {f"trials_{k}": v for k, v in counts.items()}, step=0)
    if result.best is not None:
        tracking.log_metrics(uri, parent, {f"best/{result.metric}": result.best.score}, step=0)
        tags = {f"{SWEEP_TAG}.best_trial": result.best.trial_id, f"{SWEEP_TAG}.best_run_id": result.best.run_id or "",
                **{f"{SWEEP_TAG}.best.{p}": json.dumps(v) for p, v in result.best.config.items()}}
        for key, value in tags.items():
            client.set_tag(parent, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "sweep_results.json")
        path.write_text(json.dumps({"metric": result.metric, "mode": result.mode, "max_steps": result.max_steps,
                                    "best": result.best.trial_id if result.best else None,
                                    "trials": [row.__dict__ for row in result.rows]}, indent=2, default=str))
        tracking.log_artifact(uri, parent, path)
    if result.interrupted:
        client.set_terminated(parent, status="KILLED")
    else:
        tracking.close_run(uri, parent, ok=True)


def run_sweep(sweep: Sweep, *, verbose: int = 1) -> SweepResult:
    """Run (or resume) the sweep; returns every trial's row and the best, recorded in MLflow."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    s = sweep.spec
    ensure_ray(s.address)
    concurrency = max_concurrent_trials(sweep, ray.cluster_resources())
    path = sweep.experiment_path
    marker = path.parent / f"{s.name}.sweep.json"
    restoring = tune.Tuner.can_restore(str(path))
    if restoring and marker.is_file() and json.loads(marker.read_text())["fingerprint"] != sweep.fingerprint():
        raise ConfigError(f"{sweep.source}: sweep {s.name!r} at {path} was started with a different space, search, "
                          f"scheduler, objective or base job; rename the sweep or delete {path} to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": sweep.fingerprint(), "source": sweep.source}))

    uri = sweep.tracking_uri
    params = {"source": sweep.source, "recipe": sweep.base.recipe, "preset": sweep.base.preset,
              **s.model_dump(include={"base", "space", "overrides", "objective", "search", "scheduler", "resources"},
                             exclude_none=True)}
    parent = tracking.open_run(uri, s.tracking.experiment, s.name, params, Path(s.workdir, "mlartifacts"))
    client = MlflowClient(tracking_uri=uri)
    client.set_tag(parent, SWEEP_TAG, s.name)
    client.set_tag(parent, f"{SWEEP_TAG}.role", "parent")

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=_plan(sweep, parent)),
        tune.PlacementGroupFactory([{"CPU": s.resources.trial_cpus}, {"CPU": s.resources.probe_cpus}]))
    try:
        if restoring:
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
        else:
            tuner = _new_tuner(sweep, trainable, concurrency, verbose)
        tuner.fit()
    except BaseException:
        tracking.close_run(uri, parent, ok=False)
        raise
    for trial_dir in sweep.trials_dir.glob("*"):  # trials stopped by an interruption
        release_placement_group(trial_dir, wait_s=30)
    rows = _rows(sweep)
    result = SweepResult(s.name, sweep.metric, sweep.mode, sweep.base.max_steps, list(s.space), rows,
                         _best(rows, sweep.mode), parent, uri, path,
                         interrupted=any(r.status in ("interrupted", "pending") for r in rows))
    _record(sweep, result)
    return result


def summary_table(result: SweepResult):
    """A rich table: one row per trial (its values, score, step reached, final loss, status), best marked."""
    from rich.table import Table

    title = f"sweep {result.name}: {result.metric} ({result.mode}), {len(result.rows)} trials"
    table = Table(title=title)
    table.add_column("trial", no_wrap=True)
    for col in (*result.paths, result.metric, "step", "loss"):
        table.add_column(col, justify="right", overflow="fold")  # names wrap, not "model…"
    table.add_column("status", no_wrap=True)

    def num(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    for row in result.rows:
        best = result.best is not None and row.trial_id == result.best.trial_id
        status = row.status + (" (best)" if best else "") + (f": {row.error}" if row.error else "")
        table.add_row(row.trial_id, *[num(row.config.get(p)) for p in result.paths], num(row.score), num(row.step),
                      num(row.loss), status, style="bold green" if best else None)
    return table
