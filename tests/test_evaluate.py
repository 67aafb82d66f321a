"""Representation evaluation of frozen encoders: a linear probe and a weighted kNN on real land-cover labels.

A random-init tiny OFA encoder's features carry spatial and spectral information, so both
probes must beat the same probes trained on shuffled labels and the majority class. Metrics
are checked against numpy, feature cells against a numpy majority vote, renormalisation
against the raw stored pixels; mismatched bundles and bad specs fail clearly; each
evaluation is its own MLflow run; the CLI prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner

from earthray.bundle import load_bundle, save_bundle
from earthray.config import ConfigError, validate
from earthray.data.manifest import load_manifest
from earthray.data.pipeline import GroupReader, _fixed, decode
from earthray.evaluate import (
    EvaluateSpec,
    FeatureExtractor,
    class_iou,
    classification_scores,
    evaluate,
    extract_features,
    input_mapping,
    load_evaluate_spec,
    model_inputs,
    predict,
)
from earthray.models.heads import fuse_sensors
from earthray.recipes import create_recipe
from earthray.sensors import get_sensor
from earthray.train.run import sensors_of

GROUP = "landsat7_etm+label"
ROOT = Path(__file__).resolve().parents[1]


def _bundle(path, sensors, normalisation=None, seed=0):
    torch.manual_seed(seed)
    model = create_recipe("ofa", sensors, "tiny")
    norm = normalisation or {s.name: {"mean": [b.mean for b in s.bands], "std": [b.std for b in s.bands]}
                             for s in sensors}
    return save_bundle(path, model, recipe="ofa", preset="tiny", config={}, sensors=sensors, normalisation=norm,
                       input_size=32, provenance={"run_name": "random-init", "mlflow_run_id": "abc123"})


@pytest.fixture(scope="module")
def root(sample_manifest, sample_spec) -> str:
    return sample_spec.output


@pytest.fixture(scope="module")
def bundle_path(root, tmp_path_factory):
    sensors = sensors_of(load_manifest(root), [GROUP])
    return _bundle(tmp_path_factory.mktemp("bundles") / "ofa-random", sensors)


@pytest.fixture(scope="module")
def spec(root, tmp_path_factory) -> EvaluateSpec:
    return EvaluateSpec(data={"root": root, "group": GROUP}, workdir=str(tmp_path_factory.mktemp("evalwork")))


@pytest.fixture(scope="module")
def features(bundle_path, spec):
    return extract_features(load_bundle(bundle_path), spec)


def _batch(root: str, rows: int = 8) -> tuple[dict, pq.Table, GroupReader]:
    """The first rows of the labelled group's shard, decoded as read_group does, and the raw table."""
    manifest = load_manifest(root)
    reader = GroupReader.from_manifest(manifest, GROUP)
    table = pq.read_table(f"{root}/{manifest['groups'][GROUP]['files'][0]}").slice(0, rows)
    return decode(table.select(reader.columns), reader), table, reader


def test_probes_beat_shuffled_labels_and_the_majority_class(features, spec):
    assert features.per_pixel and not features.multilabel and len(features.classes) == 7
    assert len(features.train_x) > 1000 and len(features.eval_x) > 200 and features.train_x.shape[1] == 48
    target = torch.as_tensor(features.eval_y)
    real = {m: classification_scores(p, target, 7) for m, p in predict(features, spec).items()}
    shuffled_labels = np.random.default_rng(0).permutation(features.train_y)
    shuffled = {m: classification_scores(p, target, 7)
                for m, p in predict(dataclasses.replace(features, train_y=shuffled_labels), spec).items()}
    for method in ("linear", "knn"):
        assert all(0 <= v <= 1 for v in real[method].values())
        assert real[method]["oa"] > real["majority"]["oa"] + 0.1, (method, real)
        assert real[method]["oa"] > shuffled[method]["oa"] + 0.1, (method, real, shuffled)
        assert real[method]["miou"] > shuffled[method]["miou"] + 0.05, (method, real, shuffled)


def _numpy_scores(pred: np.ndarray, target: np.ndarray, k: int) -> dict[str, float]:
    ious, f1s = [], []
    for c in range(k):
        tp = np.sum((pred == c) & (target == c))
        fp, fn = np.sum((pred == c) & (target != c)), np.sum((pred != c) & (target == c))
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"oa": float(np.mean(pred == target)), "miou": float(np.mean(ious)), "f1": float(np.mean(f1s))}


def test_scores_agree_with_numpy(features, spec):
    for method, probs in predict(features, spec).items():
        got = classification_scores(probs, torch.as_tensor(features.eval_y), 7)
        want = _numpy_scores(probs.argmax(1).numpy(), features.eval_y, 7)
        assert got == pytest.approx(want, abs=1e-6), method
    # a class neither predicted nor present (2) is left out; one predicted but absent (3) counts as 0
    probs = torch.eye(4)[[0, 0, 1, 3]]
    target = torch.tensor([0, 1, 1, 1])
    assert classification_scores(probs, target, 4) == pytest.approx(
        {"oa": 0.5, "miou": (1 / 2 + 1 / 3 + 0) / 3, "f1": (2 / 3 + 1 / 2 + 0) / 3})
    # per class, as fine-tuning reports it (earthray.metrics): NaN for the class neither predicted nor present
    iou = class_iou(probs, target, 4)
    assert iou[:2] == pytest.approx([1 / 2, 1 / 3]) and math.isnan(iou[2]) and iou[3] == 0


def test_multilabel_probes_beat_prevalence(features, spec):
    """Multi-hot targets (each cell's class plus a coarser group of classes): mAP above the constant prior."""
    groups = np.array([0, 0, 1, 1, 2, 2, 2])

    def hot(y):
        return np.concatenate([np.eye(7, dtype=np.int64)[y], np.eye(3, dtype=np.int64)[groups[y]]], axis=1)
    ml = dataclasses.replace(features, train_y=hot(features.train_y), eval_y=hot(features.eval_y),
                             classes=[f"c{i}" for i in range(10)], multilabel=True)
    scores = {m: classification_scores(p, torch.as_tensor(ml.eval_y), 10, multilabel=True)
              for m, p in predict(ml, spec).items()}
    for method in ("linear", "knn"):
        assert set(scores[method]) == {"map", "f1"} and all(0 <= v <= 1 for v in scores[method].values())
        assert scores[method]["map"] > scores["majority"]["map"] + 0.1, scores


def test_feature_cells_take_the_majority_label(root, bundle_path):
    bundle = load_bundle(bundle_path)
    batch, _, _ = _batch(root)
    mapping = input_mapping(bundle, load_manifest(root), GROUP)
    out = FeatureExtractor(bundle.model, mapping, "pixel", 7)(batch)
    with torch.no_grad():
        grid = fuse_sensors(bundle.model.encode(model_inputs(batch, mapping)))[-1]  # (B, 48, 4, 4)
    label = np.where(batch["landsat7_etm.valid"], batch["label"], -1)
    blocks = label.reshape(len(label), 4, 8, 4, 8).transpose(0, 1, 3, 2, 4).reshape(len(label), 4, 4, 64)
    counts = np.stack([(blocks == c).sum(-1) for c in range(7)], -1)  # (B, 4, 4, 7)
    keep = counts.sum(-1) >= 32
    assert len(out["feature"]) == keep.sum() > 0
    np.testing.assert_array_equal(out["label"], counts.argmax(-1)[keep])
    np.testing.assert_allclose(out["feature"], grid.permute(0, 2, 3, 1).numpy()[keep], atol=1e-5)
    # chip-level labels: one globally pooled feature per chip
    chip = dict(batch, label=counts.sum((1, 2)).argmax(-1))
    pooled = FeatureExtractor(bundle.model, mapping, "class", 7)(chip)
    np.testing.assert_allclose(pooled["feature"], grid.mean((-2, -1)).numpy(), atol=1e-5)
    np.testing.assert_array_equal(pooled["label"], chip["label"])


def test_inputs_follow_the_bundles_bands_and_statistics(root, tmp_path):
    """A bundle trained on B4, B3, B2 (in that order) with its own statistics gets exactly those, from raw pixels."""
    sensor = get_sensor("landsat7_etm").select(["B4", "B3", "B2"])
    norm = {"landsat7_etm": {"mean": [50.0, 60.0, 70.0], "std": [10.0, 20.0, 40.0]}}
    bundle = load_bundle(_bundle(tmp_path / "b", [sensor], norm))
    batch, table, reader = _batch(root)
    got = model_inputs(batch, input_mapping(bundle, load_manifest(root), GROUP))["landsat7_etm"].numpy()
    raw = _fixed(table["landsat7_etm"], reader.tensors["landsat7_etm"]).astype(np.float32)[:, [3, 2, 1]]
    valid = batch["landsat7_etm.valid"][:, None]
    want = np.where(valid, (raw - np.array([50, 60, 70.0])[:, None, None]) / np.array([10, 20, 40.0])[:, None, None],
                    0)
    assert got.shape == (8, 3, 32, 32)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_mismatches_are_clear_errors_before_any_run(root, tmp_path, bundle_path):
    spec = EvaluateSpec(data={"root": root, "group": GROUP}, workdir=str(tmp_path / "work"))
    other = _bundle(tmp_path / "rgbn", [get_sensor("vhr_rgbn")])
    with pytest.raises(ConfigError, match=r"sensor 'landsat7_etm' is not one the bundle .*rgbn.*vhr_rgbn"):
        evaluate(str(other), spec)
    full = _bundle(tmp_path / "all-bands", [get_sensor("landsat7_etm")])
    missing = [b for b in get_sensor("landsat7_etm").band_names if b not in ["B1", "B2", "B3", "B4", "B5", "B7"]]
    with pytest.raises(ConfigError, match=rf"sensor 'landsat7_etm' lacks bands \[{', '.join(map(repr, missing))}\]"):
        evaluate(full, spec)
    with pytest.raises(ConfigError, match="data.group: no group 'nope'"):
        evaluate(bundle_path, spec.model_copy(update={"data": spec.data.model_copy(update={"group": "nope"})}))
    with pytest.raises(ConfigError, match="group 'vhr_rgbn' has no labels; labelled groups: landsat7_etm\\+label"):
        evaluate(bundle_path, spec.model_copy(update={"data": spec.data.model_copy(update={"group": "vhr_rgbn"})}))
    with pytest.raises(ConfigError, match="data.eval_split: .* no chips in split 'holdout'"):
        evaluate(bundle_path, spec.model_copy(update={"data": spec.data.model_copy(update={"eval_split": "holdout"})}))
    assert not (tmp_path / "work").exists()  # no MLflow run (or database) was opened


def test_each_evaluation_is_a_new_mlflow_run_and_the_cli_prints_the_table(bundle_path, spec, features, tmp_path):
    from mlflow.tracking import MlflowClient

    from earthray.cli import app

    result = evaluate(str(bundle_path), spec)
    # the same scores as the probes on independently extracted features: extraction and probes are repeatable
    want = {f"{m}/{k}": v for m, p in predict(features, spec).items()
            for k, v in classification_scores(p, torch.as_tensor(features.eval_y), 7).items()}
    assert result.scores == pytest.approx(want, abs=1e-6)
    assert (result.n_train, result.n_eval) == (len(features.train_x), len(features.eval_x))

    client = MlflowClient(tracking_uri=spec.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["linear.oa"] == pytest.approx(result.scores["linear/oa"])
    assert run.data.metrics["knn.miou"] == pytest.approx(result.scores["knn/miou"])
    assert run.data.metrics["n_eval"] == result.n_eval
    assert run.data.tags["earthray.bundle"] == str(bundle_path)
    assert run.data.tags["earthray.bundle.run_id"] == "abc123"
    assert run.data.params["data.group"] == GROUP and run.data.params["knn.k"] == "20"
    assert [a.path for a in client.list_artifacts(result.run_id)] == ["evaluation.json"]
    logged = json.loads(Path(client.download_artifacts(result.run_id, "evaluation.json", str(tmp_path))).read_text())
    assert set(logged["per_class"]) == {"linear/iou", "knn/iou", "majority/iou"} == set(result.per_class)
    for key, ious in result.per_class.items():  # JSON has no NaN: a class with no IoU is null there
        assert len(ious) == 7 and logged["per_class"][key] == [None if math.isnan(v) else v for v in ious]

    spec_file = tmp_path / "eval.yaml"
    spec_file.write_text(yaml.safe_dump({"workdir": spec.workdir, "data": {"root": spec.data.root, "group": GROUP},
                                         "methods": ["knn"]}))
    out = CliRunner().invoke(app, ["evaluate", str(bundle_path), str(spec_file)], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "knn" in out.output and "majority" in out.output and "linear" not in out.output.split("samples")[1]
    assert f"{result.scores['knn/oa']:.4f}" in out.output
    runs = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2 and runs[0].info.run_id == result.run_id and runs[1].info.run_id in out.output
    assert runs[1].data.metrics["knn.oa"] == pytest.approx(result.scores["knn/oa"])


def test_cli_refuses_bad_specs_and_bundles(bundle_path, spec, tmp_path):
    from earthray.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"root": spec.data.root, "group": GROUP}, "knn": {"k": 0}}))
    out = CliRunner().invoke(app, ["evaluate", str(bundle_path), str(bad)], terminal_width=200)
    assert out.exit_code == 2 and "knn.k" in out.output, out.output
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"data": {"root": spec.data.root, "group": GROUP}}))
    out = CliRunner().invoke(app, ["evaluate", str(tmp_path / "no-bundle"), str(good)], terminal_width=200)
    assert out.exit_code == 2 and "not a bundle" in out.output, out.output


def test_the_landcover_job_spec_loads():
    spec = load_evaluate_spec(ROOT / "jobs" / "evaluate-landcover.yaml")
    assert spec.data.group == GROUP and spec.data.root == str(ROOT / "work" / "shards" / "sample")
    assert spec.workdir == str(ROOT / "work") and spec.methods == ["linear", "knn"]
    with pytest.raises(ConfigError, match="spec: methods: .*must not repeat"):
        validate(EvaluateSpec, {"data": {"root": ".", "group": GROUP}, "methods": ["knn", "knn"]}, "spec")
    with pytest.raises(ConfigError, match="spec: data: .*eval_split must differ from train_split"):
        validate(EvaluateSpec, {"data": {"root": ".", "group": GROUP, "eval_split": "train"}}, "spec")
