"""Ray Tune sweeps over a pretraining job, scored by a kNN probe on the sample's land-cover labels.

One real 4-trial ASHA sweep (tiny OFA, 4 steps, a rung at step 2) runs on the local Ray: it is
interrupted (SIGUSR1, Tune's Ctrl+C) once two trials have finished, then run again, which must
finish only the rest. MLflow holds the sweep's run (with its scores plot) and one child run per
trial; no Train placement group outlives the sweep. Bad field paths, values, distributions and
objectives fail at load time with errors naming them.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from earthray.config import ConfigError
from earthray.tune import load_sweep

GROUP = "landsat7_etm+label"
MAX_STEPS = 4


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _base(root: str, **over) -> dict:
    return {"name": "base", "recipe": "ofa", "preset": "tiny",
            "data": {"root": root, "groups": {GROUP: 8}},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "workers": {"num_workers": 1, "cpus_per_worker": 0.5},
            "max_steps": MAX_STEPS, "checkpoint_every": 2, "tracking": {"log_every": 2}, **over}


def _sweep(root: str, **over) -> dict:
    return {"name": "ofa-mask", "workdir": "work", "base": "base.yaml",
            "space": {"model.mask_ratio": {"uniform": [0.4, 0.9]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}},
            "objective": {"evaluate": {"data": {"root": root, "group": GROUP}, "methods": ["knn"], "num_cpus": 0.25},
                          "metric": "knn/miou"},
            "search": {"algorithm": "random", "num_samples": 4, "seed": 3},
            "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2}, **over}


@pytest.fixture(scope="module")
def root(sample_manifest, sample_spec) -> str:
    return sample_spec.output


@pytest.fixture
def folder(tmp_path, root):
    """A sweep folder with a valid base job; write ``sweep.yaml`` into it."""
    _write(tmp_path / "base.yaml", _base(root))
    return tmp_path


def _load_error(folder: Path, sweep: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(folder / "sweep.yaml", sweep))
    return str(e.value)


# --------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize("path, message", [
    ("model.mask_ration", "space.model.mask_ration: recipe 'ofa' has no config field 'mask_ration'"),
    ("optim.lrr", "space.optim.lrr: optim has no field 'lrr'"),
    ("data.groups.vhr_rgbn", "space.data.groups.vhr_rgbn: data.groups has no field 'vhr_rgbn'"),
    ("optim.betas.2", "optim.betas is a list of 2; '2' is not an index in it"),
    ("max_steps.x", "max_steps is a single value (4); it has no field 'x'"),
    ("name", "name is set by the sweep for each trial"),
    ("tracking.experiment", "tracking.experiment is set by the sweep"),
])
def test_bad_field_path_names_the_field(folder, root, path, message):
    sweep = _sweep(root, space={path: {"choice": [1, 2]}})
    error = _load_error(folder, sweep)
    assert message in error and "sweep.yaml" in error


def test_bad_values_and_distributions_are_clear(folder, root):
    bad_value = _sweep(root, space={"model.mask_ratio": {"choice": [0.5, "high"]}})
    assert "space.model.mask_ratio = 'high'" in _load_error(folder, bad_value)
    no_workers = _sweep(root, space={"workers.num_workers": {"randint": [0, 2]}})
    assert "space.workers.num_workers = 0: workers.num_workers: Input should be greater than or equal to 1" \
        in _load_error(folder, no_workers)
    reversed_bounds = _sweep(root, space={"optim.lr": {"uniform": [1e-2, 1e-4]}})
    assert "space.optim.lr: Value error, uniform: the lower bound 0.01 must be below" in _load_error(
        folder, reversed_bounds)
    two_kinds = _sweep(root, space={"optim.lr": {"uniform": [0, 1], "choice": [1]}})
    assert "give exactly one of grid, choice, uniform, loguniform, randint" in _load_error(folder, two_kinds)
    grid_optuna = _sweep(root, space={"optim.lr": {"grid": [1e-3, 1e-4]}}, search={"algorithm": "optuna"})
    assert "space.optim.lr: grid needs search.algorithm random" in _load_error(folder, grid_optuna)
    list_optuna = _sweep(root, space={"optim.betas": {"choice": [[0.9, 0.95], [0.9, 0.999]]}},
                         search={"algorithm": "optuna"})
    assert "sweep each element by index (e.g. optim.betas.0)" in _load_error(folder, list_optuna)
    late_rung = _sweep(root, scheduler={"name": "asha", "grace_period": 10})
    assert "scheduler.grace_period: 10 steps exceeds the job's max_steps 4" in _load_error(folder, late_rung)


def test_bad_objective_is_clear(folder, root):
    metric = _sweep(root)
    metric["objective"]["metric"] = "knn/accuracy"
    assert "objective.metric: 'knn/accuracy' is not a score the evaluation gives; one of knn/oa" in _load_error(
        folder, metric)
    _write(folder / "base.yaml", _base(root, data={"root": root, "groups": {"vhr_rgbn": 8}}))
    error = _load_error(folder, _sweep(root))
    assert f"objective.evaluate: data.group: group '{GROUP}' holds sensors ['landsat7_etm'], but the base job " \
           "trains only ['vhr_rgbn']" in error


def test_overrides_index_paths_and_cli_error(folder, root):
    sweep = load_sweep(_write(folder / "sweep.yaml", _sweep(
        root, overrides={"max_steps": 8, "optim.betas.1": 0.99},
        space={"model.mask_ratio": {"grid": [0.5, 0.7]}, "optim.betas.0": {"choice": [0.8, 0.9]}})))
    assert sweep.base.max_steps == 8 and sweep.base.optim.betas == (0.9, 0.99)
    assert sweep.milestones() == [2, 4] and sweep.mode == "max"
    from earthray.tune.spec import build_job, job_data

    job = build_job(job_data(sweep.base), {"model.mask_ratio": 0.7, "optim.betas.0": 0.8})
    assert job.model["mask_ratio"] == 0.7 and job.optim.betas == (0.8, 0.99)

    from earthray.cli import app

    bad = _write(folder / "bad.yaml", _sweep(root, space={"optim.lrr": {"choice": [1]}}))
    out = CliRunner().invoke(app, ["sweep", str(bad)])
    assert out.exit_code == 2 and "optim has no field 'lrr'" in out.output


def test_concurrency_counts_train_workers_and_ray_data(folder, root):
    from earthray.tune.resources import max_concurrent_trials

    sweep = load_sweep(_write(folder / "sweep.yaml", _sweep(root)))
    # trial 0.1 + probe 0.1 + one Train worker 0.5 + a Ray Data read task 1 + the feature actor 0.25 = 1.95
    assert max_concurrent_trials(sweep, {"CPU": 2.0}) == 1
    assert max_concurrent_trials(sweep, {"CPU": 64.0}) == 32
    with pytest.raises(ConfigError, match=r"one trial needs 1.95 CPUs .*the Ray cluster has 1"):
        max_concurrent_trials(sweep, {"CPU": 1.0})


# ------------------------------------------------------------------------------------- a real sweep


def _interrupt_third_trial(workdir: Path, stop: threading.Event) -> None:
    """Like Ctrl+C (Tune's handler takes SIGUSR1) once two trials have finished (one trial runs at a time)
    and the third has registered its step-2 checkpoint: that trial is interrupted mid-pretraining."""
    from train_helpers import registered_checkpoint_steps

    while not stop.is_set():
        trials = sorted(workdir.glob("trials/ofa-mask/*"))
        if len(trials) >= 3:
            third = trials[2]
            snapshot = [registered_checkpoint_steps(SimpleNamespace(storage_path=str(third / "runs"), name=p.name))
                        for p in (third / "runs").glob("*") if p.is_dir()]
            if any(2 in steps for steps in snapshot):
                os.kill(os.getpid(), signal.SIGUSR1)
                return
        time.sleep(0.2)


def _child_runs(uri: str, parent_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return client, parent, {r.data.tags["earthray.sweep.trial_id"]: r for r in runs}


@pytest.fixture(scope="module")
def sweeps(root, ray_session, tmp_path_factory):
    """The sweep interrupted after two finished trials, then run again to the end (and the placement
    groups there were before it)."""
    from ray.util import placement_group_table

    from earthray.tune.sweep import run_sweep

    groups = set(placement_group_table())
    folder = tmp_path_factory.mktemp("sweep")
    _write(folder / "base.yaml", _base(root))
    path = _write(folder / "sweep.yaml", _sweep(root))
    stop = threading.Event()
    watcher = threading.Thread(target=_interrupt_third_trial, args=(folder / "work", stop), daemon=True)
    watcher.start()
    try:
        first = run_sweep(load_sweep(path), verbose=0)
    finally:
        stop.set()
    _, _, runs = _child_runs(first.tracking_uri, first.parent_run_id)
    before = {tid: (r.info.end_time, r.info.status) for tid, r in runs.items()}
    results = {p.parent.name: p.stat().st_mtime_ns
               for p in (folder / "work").glob("trials/ofa-mask/*/trial_result.json")}
    second = run_sweep(load_sweep(path), verbose=0)
    return folder, path, first, second, before, results, groups


# The sweep (4 trials, an interruption, a resume) takes minutes on 2 busy cores: more than the default timeout.
@pytest.mark.timeout(1800)
def test_asha_sweep_completes_with_parent_and_child_runs(sweeps, tmp_path):
    _, _, _, result, _, _, _ = sweeps
    assert not result.interrupted and len(result.rows) == 4
    assert {r.status for r in result.rows} <= {"done", "stopped"}
    done = [r for r in result.rows if r.status == "done"]
    assert done and all(r.step == MAX_STEPS and 0 <= r.score <= 1 for r in done)
    assert all(r.step == 2 for r in result.rows if r.status == "stopped")  # ASHA stopped it at its rung
    assert result.best.score == max(r.score for r in done)
    assert len({tuple(r.config.values()) for r in result.rows}) == 4
    for row in result.rows:
        assert 0.4 <= row.config["model.mask_ratio"] <= 0.9 and 1e-4 <= row.config["optim.lr"] <= 1e-2

    client, parent, children = _child_runs(result.tracking_uri, result.parent_run_id)
    assert parent.data.tags["earthray.sweep"] == "ofa-mask" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best.knn.miou"] == pytest.approx(result.best.score)
    assert parent.data.tags["earthray.sweep.best_trial"] == result.best.trial_id
    assert float(parent.data.tags["earthray.sweep.best.optim.lr"]) == pytest.approx(result.best.config["optim.lr"])
    assert {"sweep_results.json", "sweep_scores.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    _assert_scores_plot(client, parent.info.run_id, result, tmp_path)
    assert sorted(children) == sorted(r.trial_id for r in result.rows)
    for row in result.rows:
        run = children[row.trial_id]
        assert run.info.run_id == row.run_id
        assert float(run.data.params["trial.optim.lr"]) == pytest.approx(row.config["optim.lr"])
        assert float(run.data.params["model.mask_ratio"]) == pytest.approx(row.config["model.mask_ratio"])
        probes = client.get_metric_history(run.info.run_id, "probe.knn.miou")
        steps = sorted(m.step for m in probes)  # a trial resumed past its rung is not scored there again
        assert steps in ([2, MAX_STEPS], [MAX_STEPS]) if row.status == "done" else steps == [2]
        assert run.info.status == ("FINISHED" if row.status == "done" else "KILLED")
        assert run.data.tags["earthray.sweep.status"] == row.status
        final = [m.value for m in probes if m.step == row.step]
        assert final == [pytest.approx(row.score)]


def _assert_scores_plot(client, run_id: str, result, tmp: Path) -> None:
    """The plot logged to the sweep's run is the one written beside its Tune results: a PNG, a panel per field."""
    from PIL import Image

    logged = Path(client.download_artifacts(run_id, "sweep_scores.png", str(tmp)))
    assert result.plot == result.experiment_path / "sweep_scores.png"
    assert logged.read_bytes() == result.plot.read_bytes()
    assert logged.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(logged) as image:
        image.verify()
        width, height = image.size
    assert width >= 2 * 400 and height >= 300  # one 4.2-inch panel per swept field, at 100 dpi


@pytest.mark.timeout(1800)
def test_interrupted_sweep_resumes_without_repeating_finished_trials(sweeps):
    folder, path, first, second, before, results, _ = sweeps
    assert first.interrupted
    finished = {r.trial_id: r for r in first.rows if r.status in ("done", "stopped")}
    interrupted = [r for r in first.rows if r.status == "interrupted"]
    assert len(finished) == 2 and len(interrupted) == 1
    assert {r.status for r in first.rows} <= {"done", "stopped", "interrupted", "pending"}
    after = {r.trial_id: r for r in second.rows}
    assert len(after) == 4 and all(r.status in ("done", "stopped") for r in after.values())
    client, _, runs = _child_runs(second.tracking_uri, second.parent_run_id)
    assert sorted(runs) == sorted(after)
    for tid, row in finished.items():  # kept as they were: not trained, scored or closed again
        assert (after[tid].status, after[tid].score, after[tid].step) == (row.status, row.score, row.step)
        assert (runs[tid].info.end_time, runs[tid].info.status) == before[tid]
    for tid, mtime in results.items():
        assert (folder / "work" / "trials" / "ofa-mask" / tid / "trial_result.json").stat().st_mtime_ns == mtime
    resumed = runs[interrupted[0].trial_id]  # its pretraining resumed from the step-2 checkpoint
    assert resumed.data.metrics["resumed_from_step"] == 2
    assert after[interrupted[0].trial_id].status == "done" or after[interrupted[0].trial_id].step == 2
    for tid in finished:  # trained once: every step's loss logged once
        steps = [m.step for m in client.get_metric_history(runs[tid].info.run_id, "loss")]
        assert len(steps) == len(set(steps)) and max(steps) <= MAX_STEPS

    from earthray.tune.sweep import run_sweep

    changed = yaml.safe_load(path.read_text())
    changed["space"]["model.mask_ratio"] = {"uniform": [0.1, 0.2]}
    with pytest.raises(ConfigError, match="was started with a different space"):
        run_sweep(load_sweep(_write(path, changed)), verbose=0)


@pytest.mark.timeout(1800)
def test_sweep_leaves_no_placement_group_behind(sweeps):
    """The Train workers of trials ASHA stopped, or the interruption killed, hold no CPUs after the sweep."""
    from ray.util import placement_group_table

    groups = sweeps[-1]
    deadline = time.monotonic() + 30  # Tune removes its trials' groups as it tears them down
    while True:
        left = {pg: (t["state"], t["bundles"]) for pg, t in placement_group_table().items()
                if pg not in groups and t["state"] in ("PENDING", "CREATED", "RESCHEDULING")}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"placement groups the sweep left: {left}"


@pytest.mark.timeout(600)
def test_heldout_scores_read_series_as_the_job_trained(sweeps, root, monkeypatch):
    """The held-out objective samples as many dates per series as the trial's job did (not the reader's default)."""
    import ray.data

    from earthray import tracking
    from earthray.data import stream
    from earthray.tune.scoring import score_encoder
    from earthray.tune.spec import job_data

    folder, path, _, result, _, _, _ = sweeps
    done = next(r for r in result.rows if r.status == "done")
    bundle = next((folder / "work" / "trials" / "ofa-mask" / done.trial_id / "bundles").iterdir())
    job = job_data(load_sweep(path).base)
    job["data"]["max_dates"] = 5
    job["workdir"] = str(folder / "heldout")
    run_id = tracking.open_run(result.tracking_uri, "heldout-check", "heldout-check", {}, folder / "mlartifacts")
    plan = {"evaluation": None, "heldout": {"group": GROUP, "root": root}, "metric": "heldout/loss",
            "tracking_uri": result.tracking_uri}
    read, dates = stream.open_group, []

    def spy(*args, **kwargs):
        dates.append(kwargs.get("max_dates"))
        return read(*args, **kwargs)

    monkeypatch.setattr(stream, "open_group", spy)
    context = ray.data.DataContext.get_current().execution_options
    order = context.preserve_order
    try:
        scores = score_encoder(plan, job, [], run_id, step=0, bundle=str(bundle))
    finally:
        context.preserve_order = order  # heldout_losses sets it for this process
    assert dates == [5]
    assert scores["heldout/loss"] > 0 and any(k.startswith("heldout/recon/") for k in scores)
