"""One sweep trial: the base job with the trial's configuration applied, pretrained and scored.

A trial is a function that applies its configuration to the base job and fits it with a
TorchTrainer (Ray Train V2 has no ``Tuner(trainer)``), in the trial's own folder
(``<workdir>/trials/<sweep>/<trial id>``) and MLflow run (a child of the sweep's run). It
reports its probe scores at each rung (see ``earthray.tune.scoring``) and, from its exported
bundle, at the end; that last result is also written to the trial's folder.

A restarted trial (the sweep re-run after an interruption) reports a finished trial's result
again without training; an unfinished one resumes its pretraining from its last registered
checkpoint (a trial resumed past a rung is not scored at that rung).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from earthray import tracking
from earthray.tune.resources import record_placement_group, release_placement_group
from earthray.tune.scoring import Probe, ProbeReportCallback
from earthray.tune.spec import build_job

RESULT_FILE = "trial_result.json"
SWEEP_TAG = "earthray.sweep"
"""The MLflow tag (and tag prefix) of a sweep's runs."""


def _open_child(plan: dict, job, config: dict) -> str:
    """The trial's MLflow run (also the one its pretraining logs into), a child of the sweep's run."""
    uri = plan["tracking_uri"]
    run_id = tracking.open_run(uri, plan["experiment"], job.name, {**job.model_dump(), "trial": config},
                               Path(plan["workdir"], "mlartifacts"))
    tracking.set_tags(uri, run_id, {"mlflow.parentRunId": plan["parent_run_id"], SWEEP_TAG: plan["sweep"],
                                    f"{SWEEP_TAG}.role": "trial", f"{SWEEP_TAG}.trial_id": plan["trial_id"]})
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
                                      record_placement_group(workdir)])
    final = {**probe(job.max_steps, bundle=str(result.bundle)), "step": job.max_steps, "run_id": run_id}
    if "loss" in result.metrics:
        final["loss"] = result.metrics["loss"]
    done.write_text(json.dumps(final))
    tune.report(final)


def trial_dirname(trial) -> str:
    """Tune's folder of a trial: its id (as its job folder)."""
    return trial.trial_id
