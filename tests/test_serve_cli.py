"""``earthray serve`` as a user runs it: its own process and its own local Ray, on loopback only.

Bad input is refused before anything starts, with one line and exit status 2: a port out of range, a
bundle that is not there or fails its sha256 check, an unknown config key, a port something already
listens on (a plain listener with SO_REUSEPORT, as Serve's proxy binds, and a second ``earthray serve``).
A running server keeps a bearer token written in its config file out of every log, and its Ray
listens on 127.0.0.1 only (but for Serve's own inter-replica gRPC server, see below).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from earthray.serve.config import parse_args
from earthray.serve.run import exposure_warning
from serve_helpers import CLASSES, chip, landsat_scene, make_bundle, npy_bytes, scene_stats, tamper

EARTHRAY = Path(sys.executable).parent / "earthray"
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "written-in-the-file-7f3a9c"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.fixture(scope="module")
def scene():
    return landsat_scene()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, scene) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "scenes", "classification", scene_stats(scene), 1)


def config_file(folder: Path, model: str, extra: str = "") -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "serve.yaml"
    path.write_text(f"""
applications:
  - name: earthray
    route_prefix: /
    import_path: earthray.serve.app:build_app
    args:
      models: {{scenes: {model}}}{extra}
    deployments:
      - name: ModelServer
        num_replicas: 1
        ray_actor_options: {{num_cpus: 0.25}}
      - name: Gateway
        num_replicas: 1
        ray_actor_options: {{num_cpus: 0.1}}
""")
    return path


def serve_env(ray_tmp: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "EARTHRAY_SERVE_TOKEN")}
    return env | ({"RAY_TMPDIR": ray_tmp} if ray_tmp else {})


def refused(*args: str, timeout: float = 60, command: str = "serve") -> str:
    """Run ``earthray COMMAND ARGS`` that must fail at once: exit 2, one line, no traceback; its output."""
    started = time.monotonic()
    run = subprocess.run([str(EARTHRAY), command, *args], capture_output=True, text=True, timeout=timeout,
                         env=serve_env(), cwd=ROOT)
    out = run.stdout + run.stderr.translate(str.maketrans("", "", "│╭╮╰╯─"))  # typer's usage errors come boxed
    assert run.returncode == 2, out
    assert "Traceback" not in out, out
    assert time.monotonic() - started < timeout
    return " ".join(out.split())


@pytest.mark.timeout(360)  # six `earthray serve` processes, each importing torch and timm before it refuses
def test_bad_input_is_refused_before_anything_starts(bundle, tmp_path):
    good = config_file(tmp_path, bundle)
    assert "Invalid value for '--port': Input should be greater than or equal to 1" in refused(
        str(good), "--port", "-5")
    assert "Input should be less than or equal to 65535" in refused(str(good), "--port", "70000")
    missing = config_file(tmp_path / "missing", "/no/such/bundle")
    assert "model 'scenes' (/no/such/bundle): /no/such/bundle: not a bundle" in refused(str(missing))
    tampered = Path(shutil.copytree(bundle, tmp_path / "tampered"))
    tamper(tampered)
    bad = config_file(tmp_path / "bad", tampered)
    assert "model.safetensors sha256 mismatch" in refused(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text(good.read_text() + "http_option: {port: 8123}\n")
    assert "unknown key 'http_option'" in refused(str(typo))
    with socket.socket() as other:  # another server holding a port, bound the way Serve's proxy binds
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert f"port {port} on 127.0.0.1 is already in use" in refused(str(good), "--port", str(port))


def test_quickstart_refuses_its_port_before_minutes_of_training():
    """The quickstart serves at its last stages; a busy or impossible port is refused before the first."""
    assert "Input should be less than or equal to 65535" in refused("--port", "70000", command="quickstart")
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        line = refused("--port", str(port), command="quickstart")
    assert f"port {port} on 127.0.0.1 is already in use" in line and "ingest" not in line, line


def test_a_public_host_without_a_token_is_warned_about(bundle):
    apps = [("earthray", parse_args({"models": {"a": str(bundle)}}))]
    assert "without a bearer token" in exposure_warning("0.0.0.0", 8000, apps)
    assert exposure_warning("127.0.0.1", 8000, apps) is None
    hashed = [("earthray", parse_args({"models": {"a": str(bundle)}, "auth_token": "x"}).hashed())]
    assert exposure_warning("0.0.0.0", 8000, hashed) is None


def listeners(pid: int) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``pid`` and its descendants."""
    found = set()
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((c.laddr.ip, c.laddr.port, proc.name()))
        except psutil.Error:  # ended meanwhile
            continue
    return found


def start_server(config: Path, ray_tmp: str) -> tuple[subprocess.Popen, int]:
    """``earthray serve CONFIG --port P --address local``, P a free port (another one if it is taken first)."""
    for _ in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen([str(EARTHRAY), "serve", str(config), "--port", str(port), "--address", "local"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=serve_env(ray_tmp), start_new_session=True)
        try:
            proc.wait(timeout=5)  # exits at once only when the port was taken meanwhile
        except subprocess.TimeoutExpired:
            return proc, port
        assert "already in use" in proc.stdout.read(), "earthray serve exited"
    raise RuntimeError("no free port in 5 tries")


@pytest.mark.integration  # `earthray serve` starts a local Ray and Serve
def test_earthray_serve_runs_a_config_file(bundle, scene, tmp_path):
    """A config file with a bearer token written in it (relative bundle path); Ctrl-C stops the server."""
    os.symlink(bundle, tmp_path / bundle.name)
    config = config_file(tmp_path, bundle.name, f"\n      auth_token: {TOKEN}")
    ray_tmp = tempfile.mkdtemp(prefix="er-", dir="/tmp")  # short: Ray's unix sockets live under it
    proc, port = start_server(config, ray_tmp)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(2)
        raw, valid, _ = chip(scene, 200, 300)
        r = httpx.post(f"http://127.0.0.1:{port}/models/scenes/predict", timeout=120,
                       content=npy_bytes(np.where(valid, raw, 0).astype(np.uint8)),
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and set(r.json()["scores"]) == set(CLASSES)

        second = refused(str(config), "--port", str(port))  # the port is this server's now
        assert f"port {port} on 127.0.0.1 is already in use" in second

        sockets = listeners(proc.pid)
        assert {p for _, p, _ in sockets} >= {port}
        # Serve 2.60 replicas start an inter-deployment gRPC server on [::]:0, hard-coded (replica.py): the one
        # listener earthray cannot move to loopback. Everything else (GCS, raylet, workers, dashboard, agents,
        # the HTTP proxy) must be on loopback.
        exposed = {s for s in sockets if s[0] not in LOOPBACK and not (s[0] == "::" and "ServeReplica" in s[2])}
        assert not exposed, f"Ray listens beyond loopback: {sorted(exposed)}"
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_symlink()]
        assert len(logs) > 10
        leaked = [str(p) for p in logs if TOKEN.encode() in p.read_bytes()]
        assert not leaked, f"the token is in {leaked}"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, out
    assert "on http://127.0.0.1:" in out and "shutting down" in out and TOKEN not in out
