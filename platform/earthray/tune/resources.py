"""What a sweep's trials reserve, how many run at once, and the Train placement groups stopped trials leave.

Tune reserves per trial a placement group of the trial driver and the probe task; the Train
workers reserve their own placement group, and Ray Data tasks run outside both. Tune cannot see
the workers' share, so the number of concurrent trials is set from the cluster's CPUs (one trial
at a time on a laptop), never more than fit.

A trial stopped by the scheduler or an interruption is killed with its Train controller, and the
Train workers' placement group outlives it. Ray Train's own cleaner does not remove it reliably
(it needs the State API, and fails in a Ray that shares its machine with another; see
``earthray.compat``). Left alone, such groups hold CPUs until the sweep's driver exits, and on a
small machine the next trial can never schedule its data reads. So each trial's Train controller
records its workers' placement group in the trial folder, and the sweep removes it once that
controller is dead.
"""

from __future__ import annotations

import math
from pathlib import Path

from ray.tune import Callback

from earthray.compat import record_worker_placement_group, release_recorded_placement_group
from earthray.config import ConfigError
from earthray.tune.spec import Sweep

PLACEMENT_FILE = "train_placement_group.json"
READ_CPUS = 1.0
"""What a Ray Data read task reserves (Ray Data's default for map tasks)."""


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


# ------------------------------------------------------------------------ placement groups of stopped trials


def record_placement_group(trial_dir: Path):
    """The Train run callback of a trial that records its workers' placement group in ``trial_dir``."""
    return record_worker_placement_group(trial_dir / PLACEMENT_FILE)


def release_placement_group(trial_dir: Path, wait_s: float = 0.0) -> bool:
    """Remove the Train placement group a trial left behind, once its controller is dead.

    Returns whether nothing is left to release (no record, or released); False while the
    controller still runs (after ``wait_s`` seconds of waiting for it)."""
    return release_recorded_placement_group(trial_dir / PLACEMENT_FILE, wait_s)


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
