"""Submitting specs as Ray Jobs to a real cluster: a head started with ``ray start --head`` (dashboard on,
token auth on with its own token), jobs that pretrain on the sample shards and log to MLflow."""

from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from earthray import jobs
from earthray.cli import app
from earthray.config import ConfigError
from earthray.tracking import RUN_TAG

VENV_BIN = Path(sys.executable).parent
TOKEN = secrets.token_hex(16)
runner = CliRunner()


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_leftovers(temp: str) -> None:
    """SIGKILL any process still running from this head's temp dir (a job driver outliving its raylet)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if temp in (proc / "cmdline").read_bytes().decode(errors="replace") or \
                    os.readlink(proc / "cwd").startswith(temp):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            continue


def _start_head(temp: str) -> tuple[subprocess.Popen, str]:
    gcs, dash, client, node, objects, agent, agent_grpc, env_agent, metrics = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN,
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM: stop now, no 30 s drain
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # a single-machine head: it listens on 127.0.0.1 only
    with open(f"{temp}/head.log", "a") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
             f"--ray-client-server-port={client}", f"--node-manager-port={node}", f"--object-manager-port={objects}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}", f"--temp-dir={temp}",
             "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{dash}"


def _alive(proc: subprocess.Popen, url: str, timeout: float) -> bool:
    """Wait for the head's node to be ALIVE (its raylet has its agents, so Jobs can run); False if it died."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/api/v0/nodes", params={"detail": "false"}, timeout=5,
                          headers={"Authorization": f"Bearer {TOKEN}"})
            if r.status_code == 200 and any(n["state"] == "ALIVE" for n in r.json()["data"]["result"]["result"]):
                return True
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    return False


def _stop_head(proc: subprocess.Popen, temp: str) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its session: ray start, GCS, raylet, dashboard
    _kill_leftovers(temp)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head of its own: ports, temp dir and token distinct from the session's (and anyone else's) Ray.

    ``--block`` keeps ``ray start`` in the foreground; SIGTERM to it stops exactly this head, where
    ``ray stop`` would stop every Ray on the machine. On a loaded machine the raylet may give up on
    its dashboard agent (it waits 15 s for it) and ``ray start --block`` exits; then it starts again.
    """
    temp = tempfile.mkdtemp(prefix="er-", dir="/tmp")  # short: Ray's unix sockets live under it
    try:
        for _ in range(3):
            proc, url = _start_head(temp)
            if _alive(proc, url, timeout=300):
                break
            _stop_head(proc, temp)
        else:
            pytest.fail(f"the Ray head did not start: {Path(temp, 'head.log').read_text()[-3000:]}")
        try:
            yield url
        finally:
            _stop_head(proc, temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A working dir to upload: just the specs (outputs go elsewhere, to absolute paths)."""
    return tmp_path_factory.mktemp("repo")


def write_spec(repo: Path, filename: str, root: str, workdir: Path, name: str, **extra) -> Path:
    spec = {"name": name, "workdir": str(workdir), "recipe": "ofa", "preset": "tiny",
            "data": {"root": root, "groups": {"vhr_rgbn": 8}}, "optim": {"lr": 1e-3, "warmup_steps": 1},
            "max_steps": 4, "checkpoint_every": 2, "tracking": {"log_every": 1},
            "workers": {"num_workers": 1, "cpus_per_worker": 0.5}, **extra}
    path = repo / "jobs" / filename
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def finished_run(workdir: Path, name: str):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("earthray-pretrain")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{name}'")
    assert len(runs) == 1
    return runs[0]


def flat(text: str) -> str:
    """Rich wraps long messages at the terminal width; compare them as one line."""
    return " ".join(text.split())


def job_count(url: str) -> int:
    return len(jobs.client(url, TOKEN).list_jobs())


@pytest.mark.integration  # a `ray start --head` of its own
def test_pretrain_job_runs_on_the_cluster_and_logs_to_mlflow(cluster, repo, sample_manifest, sample_spec, tmp_path):
    spec = write_spec(repo, "pretrain-api.yaml", sample_spec.output, tmp_path, "submit-api")
    job_id = jobs.submit(spec, cluster, token=TOKEN)
    followed = io.StringIO()
    jobs.logs(job_id, cluster, follow=True, out=followed, token=TOKEN)
    assert jobs.wait(job_id, cluster, timeout=600, token=TOKEN) == "SUCCEEDED", followed.getvalue()[-3000:]
    assert "earthray pretrain jobs/pretrain-api.yaml" in followed.getvalue()
    assert "done submit-api: step 4" in followed.getvalue()
    assert "done submit-api: step 4" in jobs.logs(job_id, cluster, token=TOKEN)

    run = finished_run(tmp_path, "submit-api")
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics and run.data.params["recipe"] == "ofa"
    info = jobs.client(cluster, TOKEN).get_job_info(job_id)
    assert info.entrypoint == "earthray pretrain jobs/pretrain-api.yaml"
    assert info.metadata == {"earthray.kind": "pretrain", "earthray.spec": "jobs/pretrain-api.yaml"}
    # the driver joined this cluster (RAY_ADDRESS set by the job runner) rather than starting a Ray of its own
    actors = httpx.get(f"{cluster}/api/v0/actors", params={"limit": 1000, "detail": "false"},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()["data"]["result"]["result"]
    assert any(a["class_name"] == "RayTrainWorker" for a in actors)

    status = runner.invoke(app, ["status", job_id, "--address", cluster, "--token", TOKEN])
    assert status.exit_code == 0 and f"{job_id} SUCCEEDED" in status.stdout
    logs = runner.invoke(app, ["logs", job_id, "--address", cluster, "--token", TOKEN])
    assert logs.exit_code == 0 and "done submit-api" in logs.stdout


@pytest.mark.integration  # a `ray start --head` of its own
def test_cli_follow_reports_a_failed_job(cluster, repo, sample_spec, tmp_path):
    """Extra arguments after -- reach the command; this one refuses them, so the job fails fast."""
    spec = write_spec(repo, "pretrain-args.yaml", sample_spec.output, tmp_path, "submit-args")
    result = runner.invoke(app, ["submit", str(spec), "--address", cluster, "--token", TOKEN, "--follow", "--",
                                 "--no-such-option"])
    assert result.exit_code == 1, result.output
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_") and f"job {job_id} FAILED" in result.stderr
    assert "earthray pretrain jobs/pretrain-args.yaml --no-such-option" in result.stdout  # the streamed logs
    assert "No such option: --no-such-option" in flat(result.stdout)
    assert "exit code 2" in jobs.message(job_id, cluster, token=TOKEN)


@pytest.mark.integration  # a `ray start --head` of its own
def test_stop_ends_a_running_job(cluster, repo, sample_manifest, sample_spec, tmp_path):
    spec = write_spec(repo, "pretrain-long.yaml", sample_spec.output, tmp_path, "submit-long", max_steps=100000)
    result = runner.invoke(app, ["submit", str(spec), "--address", cluster, "--token", TOKEN])
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    deadline = time.monotonic() + 300
    while jobs.status(job_id, cluster, token=TOKEN) != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    result = runner.invoke(app, ["stop", job_id, "--address", cluster, "--token", TOKEN])
    assert result.exit_code == 0 and "stop requested" in result.stdout
    assert jobs.wait(job_id, cluster, timeout=300, token=TOKEN) == "STOPPED"
    assert not jobs.stop(job_id, cluster, token=TOKEN)  # already ended


@pytest.mark.integration  # a `ray start --head` of its own
def test_bad_specs_are_refused_before_submission(cluster, repo, sample_spec, tmp_path):
    before = job_count(cluster)
    bad_yaml = repo / "jobs" / "pretrain-broken.yaml"
    bad_yaml.parent.mkdir(exist_ok=True)
    bad_yaml.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"pretrain-broken\.yaml: invalid YAML: line 2"):
        jobs.submit(bad_yaml, cluster, token=TOKEN)

    unknown = write_spec(repo, "train-me.yaml", sample_spec.output, tmp_path, "x")
    with pytest.raises(ConfigError, match=r"train-me\.yaml: cannot tell which command.*pretrain-\*\.yaml"):
        jobs.submit(unknown, cluster, token=TOKEN)
    assert jobs.spec_kind(unknown, "pretrain") == "pretrain"

    relative = write_spec(repo, "pretrain-rel.yaml", sample_spec.output, Path("../work"), "rel")
    with pytest.raises(ConfigError, match=r"pretrain-rel\.yaml: workdir: '\.\./work' is relative.*/mnt/shared"):
        jobs.submit(relative, cluster, token=TOKEN)

    excluded = write_spec(repo, "pretrain-excl.yaml", "../work/shards", tmp_path, "excl")
    with pytest.raises(ConfigError, match=r"data\.root: '\.\./work/shards' is relative .* upload excludes \(work\)"):
        jobs.submit(excluded, cluster, token=TOKEN)

    evaluate = repo / "jobs" / "evaluate-probe.yaml"
    evaluate.write_text(yaml.safe_dump({"workdir": str(tmp_path), "data": {"root": sample_spec.output,
                                                                           "group": "landsat7_etm+label"}}))
    with pytest.raises(ConfigError, match=r"evaluate-probe\.yaml: `earthray evaluate` takes arguments before"):
        jobs.submit(evaluate, cluster, token=TOKEN)

    invalid = write_spec(repo, "pretrain-invalid.yaml", sample_spec.output, tmp_path, "x", max_steps=0)
    result = runner.invoke(app, ["submit", str(invalid), "--address", cluster, "--token", TOKEN])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "pretrain-invalid.yaml: max_steps: Input should be greater than or equal to 1" in flat(result.stderr)
    result = runner.invoke(app, ["submit", str(repo / "jobs" / "pretrain-missing.yaml"), "--address", cluster])
    assert result.exit_code == 2 and "pretrain-missing.yaml: no such spec file" in flat(result.stderr)
    assert job_count(cluster) == before


@pytest.mark.integration  # a `ray start --head` of its own
def test_unknown_jobs_bad_tokens_and_unreachable_clusters_are_clear_errors(cluster):
    with pytest.raises(jobs.JobError, match="no job 'raysubmit_nope'"):
        jobs.status("raysubmit_nope", cluster, token=TOKEN)
    result = runner.invoke(app, ["logs", "raysubmit_nope", "--address", cluster, "--token", TOKEN, "--follow"])
    assert result.exit_code == 2 and "no job 'raysubmit_nope'" in flat(result.stderr)
    with pytest.raises(jobs.JobError, match="Authentication failed.*--token") as refused:
        jobs.status("raysubmit_nope", cluster, token="not-the-token")
    assert "\n" not in str(refused.value)
    result = runner.invoke(app, ["status", "raysubmit_nope", "--address", cluster, "--token", "not-the-token"])
    assert result.exit_code == 2 and "Invalid authentication token" in flat(result.stderr)
    port = _free_ports(1)[0]
    nowhere = f"http://127.0.0.1:{port}"
    result = runner.invoke(app, ["status", "raysubmit_nope", "--address", nowhere])
    assert result.exit_code == 2 and f"cannot reach the Ray job server at {nowhere}" in flat(result.stderr)
    assert "Traceback" not in result.output


def test_a_dead_job_server_is_one_line_at_once():
    """No cluster needed: an address nothing answers at (a URL, or a bare host:port as RAY_ADDRESS holds)
    is refused before Ray's client spends its retries, naming the address, not a missing token."""
    port = _free_ports(1)[0]
    for address in (f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"):
        started = time.monotonic()
        result = runner.invoke(app, ["status", "raysubmit_nope", "--address", address])
        assert time.monotonic() - started < 20, address
        message = flat(result.stderr)
        assert result.exit_code == 2 and f"cannot reach the Ray job server at {address}: nothing answers" in message
        assert "token" not in message.lower() and "Traceback" not in result.output
