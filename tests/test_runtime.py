"""Which Ray earthray joins: a dead cluster record must not hang the embedded default, an address that does
not answer is one line at once, and a local Ray listens on loopback only."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

from earthray.config import ConfigError
from earthray.runtime import resolve_address


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed on exit: nothing listens there


@pytest.fixture
def ray_tmp(monkeypatch):
    """A Ray temp dir of the test's own (short: Ray's unix sockets live under it), with no RAY_ADDRESS."""
    tmp = tempfile.mkdtemp(prefix="er-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


class _Gcs(gcs_service_pb2_grpc.NodeInfoGcsServiceServicer):
    """The one call ``answers`` makes of a GCS, answered as a GCS does."""

    def GetClusterId(self, request, context):
        return gcs_service_pb2.GetClusterIdReply(cluster_id=b"\x01" * 28)


@contextlib.contextmanager
def grpc_endpoint(gcs: bool = True):
    """A live gRPC server's ``host:port``: speaking Ray's GCS protocol (``gcs``), or none of Ray's (what a Ray
    Client server is, at the protocol ``answers`` checks, or any other gRPC service)."""
    server = grpc.server(futures.ThreadPoolExecutor(1))
    if gcs:
        gcs_service_pb2_grpc.add_NodeInfoGcsServiceServicer_to_server(_Gcs(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def record(ray_tmp: Path, address: str) -> None:
    """What ``ray start`` (or ray.cluster_utils.Cluster) writes, and a killed head leaves behind."""
    (ray_tmp / "ray").mkdir(exist_ok=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(address)


def test_no_record_starts_local(ray_tmp):
    assert resolve_address(None) == "local"


def test_a_stale_record_is_ignored(ray_tmp, caplog):
    dead = _dead_address()
    record(ray_tmp, dead)
    assert resolve_address(None) == "local"
    assert dead in caplog.text and "nothing answers" in caplog.text


def test_a_live_record_is_joined(ray_tmp):
    with grpc_endpoint() as live:
        record(ray_tmp, live)
        assert resolve_address(None) == live


def test_a_listener_that_is_not_ray_is_refused_at_once(ray_tmp):
    """``ray.init`` waits forever on a port where something else listens (measured: > 300 s on a plain
    TCP listener); the address check speaks HTTP/2 to it first."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        other = f"127.0.0.1:{server.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConfigError, match=f"no Ray cluster answers at {other}"):
            resolve_address(other)
        with pytest.raises(ConfigError, match=f"no Ray cluster answers at ray://{other}"):
            resolve_address(f"ray://{other}")
        assert time.monotonic() - started < 10


def test_a_grpc_server_that_is_not_a_gcs_is_refused_at_once(ray_tmp):
    """Another gRPC service (here: one with no services at all) on the port: ``ray.init`` would wait on it for
    minutes (measured: > 100 s); it answers the GCS's cluster-id call UNIMPLEMENTED."""
    with grpc_endpoint(gcs=False) as other:
        started = time.monotonic()
        with pytest.raises(ConfigError, match=f"no Ray cluster answers at {other}"):
            resolve_address(other)
        assert time.monotonic() - started < 10
        record(ray_tmp, other)
        assert resolve_address(None) == "local"  # a recorded one is ignored, as a dead one is


def test_unreachable_explicit_addresses_are_config_errors(ray_tmp, monkeypatch):
    dead = _dead_address()
    with pytest.raises(ConfigError, match=f"--address/spec address: no Ray cluster answers at {dead}"):
        resolve_address(dead)
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS: no Ray cluster answers at {dead}"):
        resolve_address(None)
    assert resolve_address("local") == "local"  # an explicit "local" overrides RAY_ADDRESS, as in Ray


def test_a_dead_ray_client_address_is_one_line_at_once(ray_tmp):
    dead = f"ray://{_dead_address()}"
    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        resolve_address(dead)
    assert time.monotonic() - started < 10  # not Ray Client's 30+ s of retries
    message = str(refused.value)
    assert "\n" not in message and f"no Ray cluster answers at {dead}" in message and "--address local" in message
    with grpc_endpoint(gcs=False) as live:  # a live one is passed on to Ray
        assert resolve_address(f"ray://{live}") == f"ray://{live}"


def test_auto_means_the_recorded_cluster_and_fails_at_once_without_one(ray_tmp):
    """``auto`` joins the cluster ``ray start`` recorded; with none, or a dead one, it is one line at once
    (Ray's own ``auto`` would also try any GCS process it finds: another user's, or one shutting down)."""
    with pytest.raises(ConfigError, match="auto: no `ray start` cluster is recorded on this machine.*--address local"):
        resolve_address("auto")
    dead = _dead_address()
    record(ray_tmp, dead)
    with pytest.raises(ConfigError, match=f"auto: the cluster recorded at {dead} does not answer"):
        resolve_address("auto")
    with grpc_endpoint() as live:
        record(ray_tmp, live)
        assert resolve_address("auto") == live


LISTENERS = """
import psutil, ray
from earthray.runtime import ensure_ray
ensure_ray()
print('cpus', ray.cluster_resources()['CPU'])
ray.get(ray.remote(lambda: 1).remote())  # a worker too
me = psutil.Process()
for proc in [me, *me.children(recursive=True)]:
    for c in proc.net_connections(kind='inet'):
        if c.status == psutil.CONN_LISTEN:
            print('listen', c.laddr.ip, c.laddr.port, proc.name())
ray.shutdown()
"""


@pytest.mark.integration  # a subprocess starts a local Ray
def test_a_process_with_a_stale_record_starts_its_own_ray_on_loopback(ray_tmp):
    """The CI failure this guards: a killed test cluster's record made every bare ray.init() try to join it.
    The local Ray started instead listens on 127.0.0.1 only: GCS, raylet, workers, dashboard, metrics."""
    record(ray_tmp, _dead_address())
    out = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cpus" in out.stdout and "nothing answers there; starting a local Ray" in out.stderr
    sockets = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("listen ")]
    names = {name for _, _, name in sockets}
    assert len(sockets) >= 5 and {"gcs_server", "raylet"} <= names, sockets
    exposed = [s for s in sockets if s[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"a local Ray listens beyond loopback: {exposed}"
