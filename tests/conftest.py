"""Shared fixtures: one local Ray for the whole run, the bundled sample data, one sample ingest; the two tiers.

Tiers: a test is ``integration`` when it runs on Ray (Ray Data, Train, Serve, Tune, Jobs): every test that
requests the session's Ray (``ray_session``, directly or through a fixture such as ``sample_manifest``) is
marked so here, and a test that starts a Ray of its own (a subprocess, a ``ray start`` head, a
``Cluster``) carries ``@pytest.mark.integration`` itself (or is listed in ``STARTS_ITS_OWN_RAY``). Every
other test is a unit test: ``make test-fast`` (``pytest -m "not integration"``) runs those alone, in a
minute or two, and fails any that starts Ray. Unit tests get the ini's ``timeout``; integration tests
``INTEGRATION_TIMEOUT_S`` unless they carry a ``timeout`` mark of their own.

Every test starts from the same random state (``random``, NumPy's legacy global, torch), whatever ran
before it: a draw a test did not seed itself is still the same draw on every run.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
TEST_SEED = 0

INTEGRATION_FIXTURES = frozenset({"ray_session"})
"""Requesting one of these (transitively) makes a test an integration test."""
STARTS_ITS_OWN_RAY: frozenset[str] = frozenset()
"""Node ids (or their file) of tests, in files whose owners mark them elsewhere, that start Ray themselves."""
INTEGRATION_TIMEOUT_S = 900

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _starts_its_own_ray(nodeid: str) -> bool:
    path = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    test = nodeid.split("::", 1)[1].split("[", 1)[0] if "::" in nodeid else ""
    return path in STARTS_ITS_OWN_RAY or f"{path}::{test}" in STARTS_ITS_OWN_RAY


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark integration tests (before ``-m`` deselects by marker) and give them the longer timeout."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) or _starts_its_own_ray(item.nodeid):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(INTEGRATION_TIMEOUT_S))


def pytest_collection_finish(session):
    """A run of unit tests only (the fast tier) gets a Ray temp dir of its own, for ``_unit_tests_start_no_ray``
    to find any Ray a test (or a subprocess it runs) starts."""
    items = session.items
    if items and not any(item.get_closest_marker("integration") for item in items):
        guard = tempfile.mkdtemp(prefix="er-unit-", dir="/tmp")  # short: Ray's unix sockets would live under it
        os.environ["RAY_TMPDIR"] = guard
        session.config.stash[_UNIT_RAY_TMPDIR] = Path(guard)


_UNIT_RAY_TMPDIR = pytest.StashKey[Path]()


def pytest_unconfigure(config):
    guard = config.stash.get(_UNIT_RAY_TMPDIR, None)
    if guard is not None:
        shutil.rmtree(guard, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The same random state before every test, and before the fixtures it is the first to need."""
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    import torch

    torch.manual_seed(TEST_SEED)


def _ray_sessions(guard: Path) -> list[str]:
    return sorted(p.name for p in (guard / "ray").glob("session_*")) if (guard / "ray").is_dir() else []


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request, monkeypatch):
    """A unit test that would start Ray fails: in this process at once (``ray.init`` refuses), in a subprocess
    (which inherits the fast tier's ``RAY_TMPDIR``) when the test ends. Mark such a test ``integration``."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} is a unit test but starts Ray: mark it "
                           "@pytest.mark.integration (or request the ray_session fixture)")

    monkeypatch.setattr(ray, "init", refuse)
    guard = request.config.stash.get(_UNIT_RAY_TMPDIR, None)
    before = _ray_sessions(guard) if guard else []
    yield
    if guard:
        started = [s for s in _ray_sessions(guard) if s not in before]
        assert not started, (f"{request.node.nodeid} is a unit test but started Ray ({guard / 'ray'}: {started}): "
                             "mark it @pytest.mark.integration")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on 2 cores shared with Ray workers run far faster (and steadier) on one thread."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def ray_session():
    """A Ray of the run's own: "local" ignores RAY_ADDRESS and any cluster this machine has recorded."""
    import ray

    from earthray import compat

    if not ray.is_initialized():
        compat.loopback_only_local_ray()  # as the CLI's local Ray: nothing of the test run listens outward
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_spec(tmp_path_factory):
    """The repo's sample ingest spec, pointed at a fresh output folder."""
    from earthray.data.spec import load_spec

    spec = load_spec(ROOT / "jobs" / "ingest-sample.yaml")
    spec.output = str(tmp_path_factory.mktemp("shards") / "sample")
    return spec


@pytest.fixture(scope="session")
def sample_manifest(ray_session, sample_spec):
    from earthray.data.ingest import ingest

    return ingest(sample_spec)


@pytest.fixture
def copy_of(tmp_path):
    """Copy sample files into a test's own folder, so a test may damage or modify them."""

    def copy(*relpaths: str) -> list[Path]:
        out = []
        for rel in relpaths:
            src = SAMPLE / rel
            dst = tmp_path / src.name
            shutil.copy(src, dst)
            out.append(dst)
        return out

    return copy
