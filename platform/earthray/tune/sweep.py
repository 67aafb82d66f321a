"""Ray Tune sweeps over pretraining jobs, each trial scored by probing its encoder: ``run_sweep`` runs
one (``earthray sweep``), ``summary_table`` shows its ``SweepResult``.

The parts, each in its own module:

- ``earthray.tune.spec``: the sweep spec (the search space over any field of the base job, the
  objective, search, scheduler, resources), checked against the base job when loaded;
- ``earthray.tune.trial``: one trial, the base job with the trial's values, pretrained with a
  TorchTrainer (Ray Train V2 has no ``Tuner(trainer)``);
- ``earthray.tune.scoring``: the objective (a probe of the trial's encoder, or held-out loss
  terms) and the rung scores ASHA stops on;
- ``earthray.tune.resources``: how many trials run at once, and the Train placement groups
  that stopped trials leave behind;
- ``earthray.tune.results`` and ``earthray.tune.plot``: the rows, the best trial and their
  record in MLflow, with a plot of the scores.

Re-running a sweep resumes it (``Tuner.restore``): finished trials stay finished, errored and
unfinished ones restart, and a restarted trial's pretraining resumes from its last registered
checkpoint (a trial resumed past a rung is not scored at that rung). A sweep resumes only with
the space, search, scheduler, objective and base job it was started with.
"""

from __future__ import annotations

import json
from pathlib import Path

from earthray import tracking
from earthray.config import ConfigError
from earthray.runtime import ensure_ray
from earthray.tune.resources import ReleaseStoppedTrials, max_concurrent_trials, release_placement_group
from earthray.tune.results import SweepResult, TrialRow, best_trial, read_rows, record, summary_table
from earthray.tune.spec import Sweep, job_data
from earthray.tune.trial import SWEEP_TAG, run_trial, trial_dirname

__all__ = ["SweepResult", "TrialRow", "run_sweep", "summary_table"]


def _plan(sweep: Sweep, parent_run_id: str) -> dict:
    """What every trial needs of the sweep, as plain data."""
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
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=s.name, storage_path=str(sweep.experiment_path.parent),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=verbose,
                                  callbacks=[ReleaseStoppedTrials(str(sweep.trials_dir))]),
    )


def run_sweep(sweep: Sweep, *, verbose: int = 1) -> SweepResult:
    """Run (or resume) the sweep; returns every trial's row and the best, recorded in MLflow."""
    import ray
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
    tracking.set_tags(uri, parent, {SWEEP_TAG: s.name, f"{SWEEP_TAG}.role": "parent"})

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
    rows = read_rows(sweep)
    result = SweepResult(s.name, sweep.metric, sweep.mode, sweep.base.max_steps, list(s.space), rows,
                         best_trial(rows, sweep.mode), parent, uri, path,
                         interrupted=any(r.status in ("interrupted", "pending") for r in rows))
    record(sweep, result)
    return result
