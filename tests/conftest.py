"""Shared fixtures: one local Ray for the whole run, the bundled sample data, one sample ingest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


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

    if not ray.is_initialized():
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
