"""``earthray evaluate models:/NAME@ALIAS``: the model is looked up in the spec's tracking store (or
MLFLOW_TRACKING_URI), as the quickstart registered it, and no empty ./mlflow.db appears in the folder the
command runs from. The shard folder is deliberately missing: the run stops right after the bundle loads,
so each case shows where the model was found without evaluating anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from earthray.evaluate import evaluate, load_evaluate_spec
from earthray.registry import register_bundle
from earthray.tracking import open_run
from serve_helpers import landsat_scene, make_bundle, scene_stats

EARTHRAY = Path(sys.executable).parent / "earthray"
MODEL = "models:/landcover@champion"


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Path:
    """A workdir whose mlflow.db has models:/landcover@champion, as `earthray finetune` leaves it."""
    root = tmp_path_factory.mktemp("registry")
    bundle = make_bundle(root / "bundle", "segmentation", scene_stats(landsat_scene()), 0)
    uri = f"sqlite:///{root / 'work' / 'mlflow.db'}"
    (root / "work").mkdir()
    run_id = open_run(uri, "finetune", "landcover", {}, root / "work" / "mlartifacts")
    register_bundle(bundle, "landcover", tracking_uri=uri, run_id=run_id, aliases=["champion"])
    return root / "work"


def spec_file(folder: Path, workdir: Path) -> Path:
    folder.mkdir(exist_ok=True)
    spec = folder / "evaluate.yaml"
    spec.write_text(f"workdir: {workdir}\ndata: {{root: {folder / 'no-shards'}, group: landsat7_etm+label}}\n")
    return spec


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A fresh current folder, no MLFLOW_TRACKING_URI, a model cache of the test's own."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("EARTHRAY_MODEL_CACHE", str(tmp_path / "cache"))
    return folder


def test_models_uri_comes_from_the_specs_tracking_store(registered, elsewhere, tmp_path, monkeypatch):
    spec = load_evaluate_spec(spec_file(tmp_path / "a", registered))
    with pytest.raises(FileNotFoundError, match="no-shards/manifest.json: no manifest"):  # the model was found
        evaluate(MODEL, spec)
    assert not (elsewhere / "mlflow.db").exists()

    (tmp_path / "other-work").mkdir()  # a workdir with a store of its own, without the model
    empty = load_evaluate_spec(spec_file(tmp_path / "b", tmp_path / "other-work"))
    with pytest.raises(ValueError, match=f"{MODEL}: not in the model registry at sqlite:///.*other-work/mlflow.db"):
        evaluate(MODEL, empty)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registered / 'mlflow.db'}")  # as pretraining honours it
    with pytest.raises(FileNotFoundError, match="no manifest"):
        evaluate(MODEL, load_evaluate_spec(spec_file(tmp_path / "c", tmp_path / "other-work")))
    assert not (elsewhere / "mlflow.db").exists()


def test_the_cli_finds_the_registered_model(registered, elsewhere, tmp_path):
    spec = spec_file(tmp_path / "cli", registered)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    run = subprocess.run([str(EARTHRAY), "evaluate", MODEL, str(spec)], capture_output=True, text=True, cwd=elsewhere,
                         env=env | {"EARTHRAY_MODEL_CACHE": str(tmp_path / "cache")}, timeout=300)
    message = "".join(run.stderr.split())  # rich wraps it anywhere, even inside a word
    assert run.returncode == 2 and "no-shards/manifest.json:nomanifest" in message, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and not (elsewhere / "mlflow.db").exists()
