"""Which Ray earthray joins: a dead cluster record must not hang the embedded default."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        record(ray_tmp, live)
        assert resolve_address(None) == live


def test_unreachable_explicit_addresses_are_config_errors(ray_tmp, monkeypatch):
    dead = _dead_address()
    with pytest.raises(ConfigError, match=f"--address/spec address: no Ray cluster answers at {dead}"):
        resolve_address(dead)
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS: no Ray cluster answers at {dead}"):
        resolve_address(None)
    assert resolve_address("local") == "local"  # an explicit "local" overrides RAY_ADDRESS, as in Ray
    assert resolve_address("ray://head:10001") == "ray://head:10001"  # Ray Client: Ray checks it


def test_a_process_with_a_stale_record_starts_its_own_ray(ray_tmp):
    """The CI failure this guards: a killed test cluster's record made every bare ray.init() try to join it."""
    record(ray_tmp, _dead_address())
    code = ("import ray; from earthray.runtime import ensure_ray; ensure_ray(); "
            "print('cpus', ray.cluster_resources()['CPU']); ray.shutdown()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cpus" in out.stdout and "nothing answers there; starting a local Ray" in out.stderr
