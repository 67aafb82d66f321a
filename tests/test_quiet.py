"""Quiet output: a command shows earthray's own progress, Ray's own lines stay in Ray's log files, and
``--verbose`` brings them back (issue 15, item 13).

One tiny ingest and pretraining, each an ``earthray`` subprocess with a local Ray of its own, in a Ray temp
dir of the test's own; then the same pretraining again with ``--verbose`` (a finished run: it resumes and ends
at once, through the same Ray Train start-up).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from rich.console import Console

from earthray.io import read_categories
from earthray.train.progress import FILE, Reporter, WorkerProgress, progress_file

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
EARTHRAY = Path(sys.executable).with_name("earthray")

# What Ray prints when its lines reach the driver: a worker's or actor's prefix, its loggers' INFO lines,
# Ray Train's and Ray Data's chatter, the notices earthray's own settings cause.
RAY_LINES = re.compile(r"\((?:[\w:.+-]+ )?pid=\d+|\bINFO\b|Reporting training result|"
                       r"Checkpoint successfully created|execution finished|Progress bars disabled|"
                       r"Token authentication is enabled")
# Errors Ray pushes to every driver, log_to_driver or not (a worker or actor that died, an OOM kill, and "N
# PYTHON worker processes have been started", which a 2-CPU machine sees with fractional CPU requests): they
# stay visible, as they should, and are no part of earthray's output here.
RAYLET = "(raylet)"


@pytest.fixture
def ray_tmp():
    """A Ray temp dir of the test's own (short: Ray's unix sockets live under it)."""
    tmp = tempfile.mkdtemp(prefix="er-", dir="/tmp")
    yield Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def earthray(*args: str, ray_tmp: Path, cwd: Path, **env: str) -> tuple[str, str, float]:
    """Run an ``earthray`` command (stdout and stderr not terminals): its stdout, stderr and seconds."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RAY_ADDRESS", "EARTHRAY_VERBOSE", "MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL")}
    started = time.monotonic()
    proc = subprocess.run([str(EARTHRAY), *args], cwd=cwd, capture_output=True, text=True, timeout=400,
                          env={**clean, "RAY_TMPDIR": str(ray_tmp), **env})
    print(f"$ earthray {' '.join(args)}\n{proc.stderr}{proc.stdout}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, proc.stderr, time.monotonic() - started


def ray_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if RAY_LINES.search(line)]


def own(out: str) -> list[str]:
    """The lines that are not Ray's error notices (``RAYLET``)."""
    return [line for line in out.splitlines() if RAYLET not in line]


@pytest.mark.integration  # subprocesses start local Rays
@pytest.mark.timeout(900)
def test_commands_show_earthray_progress_and_keep_rays_lines_in_its_logs(tmp_path, ray_tmp):
    (tmp_path / "ingest.yaml").write_text(yaml.safe_dump({
        "name": "quiet", "output": "shards", "chip_size": 32, "min_valid_fraction": 0.5,
        "split": {"train": 0.7, "val": 0.15, "test": 0.15, "seed": 0},
        "inputs": [{"name": "rgbn_haiti", "sensors": {"vhr_rgbn": {"path": str(SAMPLE / "rgbn_haiti" / "rgbn.tif")}}}],
    }))
    job = {"name": "quiet-tiny", "workdir": "work", "recipe": "ofa", "preset": "tiny",
           "data": {"root": "shards", "groups": {"vhr_rgbn": 4}, "shuffle_buffer": 0},
           "workers": {"num_workers": 1}, "optim": {"warmup_steps": 0},
           "max_steps": 3, "checkpoint_every": 3, "tracking": {"log_every": 1}}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(job))

    out, err, ingest_s = earthray("ingest", "ingest.yaml", ray_tmp=ray_tmp, cwd=tmp_path)
    assert not ray_lines(out + err), ray_lines(out + err)
    assert "shards and manifest:" in out

    out, err, pretrain_s = earthray("pretrain", "pretrain.yaml", ray_tmp=ray_tmp, cwd=tmp_path)
    assert not ray_lines(out + err), ray_lines(out + err)
    # earthray's own: what runs, the workers' last progress line (through the run's progress file), the result
    progress, result = own(err), own(out)
    assert progress[0] == "pretraining quiet-tiny (ofa/tiny, 3 steps)", progress
    assert re.fullmatch(r"quiet-tiny step 3/3 loss \S+ samples_per_s \S+ lr \S+ wait \d+%", progress[-1]), progress
    assert len(progress) <= 4, progress  # off a terminal: a bounded number of plain lines
    assert result[0].startswith("done quiet-tiny: step 3, loss ") and len(result) == 4, result
    assert (tmp_path / "work" / "runs" / "quiet-tiny" / FILE).is_file()
    # Ray's own lines are still in Ray's log files; its placement-group cleaner found its own Ray
    logs = "".join(p.read_text(errors="replace") for p in (ray_tmp / "ray").glob("session_*/logs/**/*")
                   if p.is_file() and p.suffix in (".out", ".err", ".log"))
    assert "Reporting training result" in logs, "Ray Train's lines are not in Ray's log files"
    assert "Found multiple active Ray instances" not in logs

    out, err, verbose_s = earthray("pretrain", "pretrain.yaml", "--verbose", ray_tmp=ray_tmp, cwd=tmp_path)
    shown = ray_lines(out + err)
    for actor in ("TrainController", "RayTrainWorker"):
        assert any(re.search(rf"\({actor} pid=\d+\)", line) for line in shown), err[-3000:]
    assert "resumed quiet-tiny at step 3" in err and "done quiet-tiny: step 3" in out
    print(f"ingest {ingest_s:.0f} s, pretrain {pretrain_s:.0f} s, pretrain --verbose {verbose_s:.0f} s")


@pytest.mark.integration  # the whole quickstart, in a subprocess with a local Ray of its own
@pytest.mark.timeout(900)
def test_the_quickstart_shows_about_40_lines_of_its_own(tmp_path, ray_tmp):
    """The README's first command, on a copy of what it reads (jobs/, serve/, data/sample/): every stage ends,
    the output is earthray's stage lines, progress and summary table, not Ray's; class names are the label
    raster's own (data/sample/landsat7_nc/strata.tif.aux.xml), in the served answer and the map's legend."""
    repo = Path(__file__).resolve().parents[1]
    for part in ("jobs", "serve", "data/sample"):
        shutil.copytree(repo / part, tmp_path / part)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, err, seconds = earthray("quickstart", "--port", str(port), ray_tmp=ray_tmp, cwd=tmp_path)
    lines = (err + out).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    assert not ray_lines(err + out), ray_lines(err + out)
    stages = [line for line in lines if re.match(r"\[\d/5\] .*: done in \d+ s$", line)]
    assert len(stages) == 5, stages
    served = next(line for line in lines if f"POST http://127.0.0.1:{port}/models/landcover/predict ->" in line)
    assert re.search(r"-> (developed|agriculture|herbaceous|shrubland|forest|water|sediment) \d+%", served), served
    assert "earthray quickstart: done in" in out and "models:/landcover/1" in out
    classes = read_categories(tmp_path / "work" / "inference" / "landcover" / "lsat7_2000_10.tif")
    assert list(classes.values()) == ["developed", "agriculture", "herbaceous", "shrubland", "forest", "water",
                                      "sediment"]
    print(f"quickstart: {len(lines)} lines in {seconds:.0f} s")


def run_steps(spec, rank: int = 0) -> None:
    """What the training loop emits: a tick per step, a log line every 10, held-out scores twice."""
    worker = WorkerProgress(spec, rank)
    worker.start(0)
    for step in range(1, spec.max_steps + 1):
        worker.tick(step)
        if step % 10 == 0 or step == spec.max_steps:
            worker.line(step, f"run step {step}/{spec.max_steps} loss {1 / step:.4g}", status=f"loss {1 / step:.4g}")
        if step % 1000 == 0:
            worker.note(step, f"run step {step} val_oa 0.5")


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_reaches_the_driver_as_a_bar_or_a_bounded_number_of_lines(tmp_path, terminal):
    """Off a terminal, 2000 steps (200 log lines) are the notes and the last step's line, not a line per step or
    refresh; on one, a bar. A previous run's events in the file are not shown again; rank 1 writes none."""
    spec = SimpleNamespace(storage_path=str(tmp_path), name="run", max_steps=2000)
    progress_file(spec).parent.mkdir(parents=True)
    progress_file(spec).write_text('{"step": 5, "total": 5, "text": "an earlier run", "note": true}\n')
    buf = io.StringIO()
    shown = Reporter(Console(file=buf, width=100, force_terminal=terminal))
    with shown.training(spec):
        run_steps(spec, rank=1)
        run_steps(spec)
    out = buf.getvalue()
    assert "an earlier run" not in out
    if terminal:
        assert "━" in out and "2000/2000" in out and "loss 0.0005" in out
        assert "run step 1000 val_oa 0.5" in out and "run step 2000 val_oa 0.5" in out
    else:
        assert out.splitlines() == ["run step 1000 val_oa 0.5", "run step 2000/2000 loss 0.0005",
                                    "run step 2000 val_oa 0.5"]
