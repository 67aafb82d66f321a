"""What a sweep leaves: a row per trial (read back from Tune's experiment), the best, their record in MLflow.

Only trials that trained to the end compete for best: a trial ASHA stopped at a rung was scored
earlier in its training, and that score is not comparable. The sweep's MLflow run gets the best
trial, its score and values, the trial counts, and two artifacts also written to the sweep's Tune
folder: every row (``sweep_results.json``) and the scores plotted against the swept fields
(``sweep_scores.png``). Each trial's run gets its status.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from earthray import tracking
from earthray.tune.plot import plot_scores
from earthray.tune.spec import Sweep
from earthray.tune.trial import SWEEP_TAG

RESULTS_FILE = "sweep_results.json"
PLOT_FILE = "sweep_scores.png"


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
    plot: Path | None = None
    """The scores plot (``sweep_scores.png`` in the experiment folder), once recorded."""


def read_rows(sweep: Sweep) -> list[TrialRow]:
    """Every trial of the sweep's Tune experiment, by trial id: its status, values and last result."""
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


def best_trial(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best score among trials that trained to the end (an early score is not comparable)."""
    done = [r for r in rows if r.status == "done" and r.score is not None and r.score == r.score]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r.score)


def _record_trials(result: SweepResult) -> None:
    """Each trial's status on its run (a tag, and the run's end state)."""
    uri = result.tracking_uri
    for row in result.rows:
        status = tracking.run_status(uri, row.run_id) if row.run_id else None
        if status is None:
            if row.run_id:
                logging.getLogger(__name__).warning("trial %s: its MLflow run %s is not in %s", row.trial_id,
                                                    row.run_id, result.tracking_uri)
            continue
        tracking.set_tags(uri, row.run_id, {f"{SWEEP_TAG}.status": row.status})
        # a trial stopped at a rung was killed mid-pretraining, whatever its run recorded then
        final = {"stopped": "KILLED", "error": "FAILED", "interrupted": "KILLED"}.get(row.status)
        if final and status != final:
            tracking.set_status(uri, row.run_id, final)


def record(sweep: Sweep, result: SweepResult) -> None:
    """Trial statuses on the child runs; the best trial, its score, every row and the scores plot on the
    sweep's run (the rows and the plot also in the experiment folder), which is then closed."""
    uri, parent = result.tracking_uri, result.parent_run_id
    _record_trials(result)
    counts = {s: sum(r.status == s for r in result.rows) for s in ("done", "stopped", "error", "interrupted")}
    tracking.log_metrics(uri, parent, {f"trials_{k}": v for k, v in counts.items()}, step=0)
    if result.best is not None:
        tracking.log_metrics(uri, parent, {f"best/{result.metric}": result.best.score}, step=0)
        tags = {f"{SWEEP_TAG}.best_trial": result.best.trial_id, f"{SWEEP_TAG}.best_run_id": result.best.run_id or "",
                **{f"{SWEEP_TAG}.best.{p}": json.dumps(v) for p, v in result.best.config.items()}}
        tracking.set_tags(uri, parent, tags)
    folder = result.experiment_path
    folder.mkdir(parents=True, exist_ok=True)
    rows = folder / RESULTS_FILE
    rows.write_text(json.dumps({"metric": result.metric, "mode": result.mode, "max_steps": result.max_steps,
                                "best": result.best.trial_id if result.best else None,
                                "trials": [row.__dict__ for row in result.rows]}, indent=2, default=str))
    log_x = {p for p, dist in sweep.spec.space.items() if dist.kind == "loguniform"}
    result.plot = plot_scores(result, folder / PLOT_FILE, log_x=log_x)
    for path in (rows, result.plot):
        tracking.log_artifact(uri, parent, path)
    if result.interrupted:
        tracking.set_status(uri, parent, "KILLED")
    else:
        tracking.close_run(uri, parent, ok=True)


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
