"""Distributed pretraining on a real local Ray: DDP, DeepSpeed ZeRO-1/2/3, the step-end hook, resume, MLflow, bundles."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from earthray.bundle import load_bundle
from earthray.config import ConfigError
from earthray.data.manifest import load_manifest
from earthray.recipes import create_recipe
from earthray.train.loop import WEIGHTS
from earthray.train.run import pretrain, sensors_of
from train_helpers import (
    RecordRegisteredCheckpoints,
    check_resumed_once,
    checkpoints_by_step,
    metric_steps,
    own_train_worker_pids,
    registered_steps,
    tiny_job_spec,
    tiny_spec,
)


@pytest.fixture(scope="module")
def root(sample_manifest, sample_spec) -> str:
    return sample_spec.output


def check_run(result, max_steps: int) -> None:
    """The run reached max_steps, MLflow holds its metrics and bundle, the bundle reloads exactly."""
    assert result.metrics["step"] == max_steps and result.metrics["final"]
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert {"loss", "lr", "samples_per_s", "data_wait_fraction"} <= set(run.data.metrics)
    assert run.data.params["recipe"] == "ofa" and "max_steps" in run.data.params
    artifacts = [a.path for a in MlflowClient(result.tracking_uri).list_artifacts(result.run_id, "bundle")]
    assert any(a.endswith("bundle.json") for a in artifacts)
    bundle = load_bundle(result.bundle)
    weights = load_file(str(result.checkpoint / WEIGHTS))
    state = bundle.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    batch = {"vhr_rgbn": torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))}
    bundle.model.eval()
    torch.manual_seed(3)
    a = bundle.model(batch)["loss"]
    again = load_bundle(result.bundle).model.eval()
    torch.manual_seed(3)
    assert torch.equal(a, again(batch)["loss"])


def test_ddp_trains_logs_and_exports(root, tmp_path):
    result = pretrain(tiny_spec(root, tmp_path, "ddp-run", tracking={"log_every": 1, "preview_every": 3}))
    check_run(result, 6)
    assert metric_steps(result.tracking_uri, result.run_id, "loss") == [1, 2, 3, 4, 5, 6]
    previews = [a.path for a in MlflowClient(result.tracking_uri).list_artifacts(result.run_id, "previews")]
    assert previews == ["previews/step0000003-vhr_rgbn.png", "previews/step0000006-vhr_rgbn.png"]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_and_exports(root, tmp_path, stage):
    spec = tiny_spec(root, tmp_path, f"zero{stage}", strategy={"name": "deepspeed", "zero_stage": stage})
    result = pretrain(spec)
    check_run(result, 6)
    shards = list((result.checkpoint / "state").glob("*optim_states.pt"))
    assert len(shards) == 2  # each rank saved its own partition


ZERO3_PERSISTENCE = 100_000
"""DeepSpeed's default ``stage3_param_persistence_threshold``: smaller parameters are not partitioned."""


@pytest.mark.parametrize("stage", [1, 3])
def test_step_end_hook_runs_once_per_optimiser_step_on_whole_weights(root, tmp_path, stage):
    """SkySense's EMA teacher, checkpointed after every step, is exactly ``m t + (1 - m) s`` of the
    student of that step: the loop ran the hook once per optimiser step (two micro-batches each),
    after the step, on every rank. The DINO heads are widened past the persistence threshold, so
    under ZeRO-3 DeepSpeed really partitions them and the hook sees them only through the gather;
    bf16 parameters feed a float32 teacher."""
    m, steps = 0.5, 3
    spec = tiny_job_spec("skysense", root, tmp_path, f"step-end-zero{stage}", max_steps=steps, checkpoint_every=1,
                         keep_checkpoints=steps, model={"teacher_momentum": m, "head_out_dim": 8192},
                         optim={"grad_accum": 2},
                         strategy={"name": "deepspeed", "zero_stage": stage, "precision": "bf16"})
    torch.manual_seed(spec.seed)
    model = create_recipe("skysense", sensors_of(load_manifest(root), list(spec.data.groups)), "tiny", **spec.model)
    student = [n for n, _ in model.student.named_parameters()]
    assert max(model.get_parameter(f"student.{n}").numel() for n in student) > ZERO3_PERSISTENCE
    teacher = {n: model.teacher.get_buffer(n).clone() for n in student}

    pretrain(spec)
    checkpoints = checkpoints_by_step(spec)
    assert sorted(checkpoints) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        weights = load_file(str(checkpoints[step] / WEIGHTS))
        for n in student:
            s = weights[f"student.{n}"]
            assert torch.equal(s, s.bfloat16().float()), n  # the student trained in bf16
            teacher[n] = teacher[n].mul(m).add(s, alpha=1 - m)
            torch.testing.assert_close(weights[f"teacher.{n}"], teacher[n], rtol=1e-6, atol=1e-7,
                                       msg=lambda e, n=n, step=step: f"step {step}, teacher.{n}: {e}")


def test_same_name_resumes_and_extends(root, tmp_path):
    first = pretrain(tiny_spec(root, tmp_path, "again", max_steps=3))
    second = pretrain(tiny_spec(root, tmp_path, "again", max_steps=6))
    assert second.run_id == first.run_id
    assert metric_steps(second.tracking_uri, second.run_id, "resumed_from_step") == [3]
    assert metric_steps(second.tracking_uri, second.run_id, "loss") == [1, 2, 3, 4, 5, 6]


def test_sigkilled_worker_resumes_from_last_checkpoint(root, tmp_path):
    spec = tiny_spec(root, tmp_path, "killed", max_steps=40, checkpoint_every=5, max_failures=2)
    registered = tmp_path / "registered-steps"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(
        result=pretrain(spec, callbacks=[RecordRegisteredCheckpoints(registered)])), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():  # kill once a checkpoint is registered
        if registered_steps(registered):
            break
        time.sleep(0.1)
    pids = own_train_worker_pids()
    assert thread.is_alive() and pids, "the run ended before a worker could be killed"
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    result = outcome["result"]
    assert result.metrics["step"] == 40
    uri, run_id = result.tracking_uri, result.run_id
    check_resumed_once(metric_steps(uri, run_id, "loss"), metric_steps(uri, run_id, "resumed_from_step"), 40, 5)


def test_unknown_group_and_fp16_on_cpu_are_spec_errors(root, tmp_path):
    with pytest.raises(ConfigError, match="no group 'nosuch'"):
        pretrain(tiny_spec(root, tmp_path, "bad", data={"groups": {"nosuch": 4}}))
    with pytest.raises(ValueError, match="fp16 needs GPUs"):
        tiny_spec(root, tmp_path, "bad", strategy={"precision": "fp16"})


def test_removed_node_of_a_multi_node_cluster_resumes(root, tmp_path):
    """A separate process runs its own 3-node cluster (head + 2 worker nodes) so the session's Ray is untouched;
    its Ray temp dir is its own too (short: Ray's unix sockets live under it), so the cluster's record of its
    address goes with it."""
    here = Path(__file__).parent
    ray_tmp = tempfile.mkdtemp(prefix="er-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(here), "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run([sys.executable, str(here / "cluster_failover.py"), root, str(tmp_path)],
                              capture_output=True, text=True, timeout=840, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["alive_when_removed"] and outcome["step"] == 40
    check_resumed_once(outcome["steps"], outcome["resumed"], 40, 5)
