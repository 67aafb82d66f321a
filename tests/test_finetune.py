"""Fine-tuning: every head type learns real (or real-derived) labels; layer-wise decay and freezing;
a Ray Train fine-tune whose distributed metrics equal a single-process recomputation; the
MLflow registry round trip; bad specs refused with the field named."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from chips import real_chip_group, real_land_cover
from earthray.recipes import create_recipe
from earthray.sensors import get_sensor
from earthray.tasks import TaskModel, TaskSpec

CLASSES = [f"class_{i}" for i in range(1, 8)]
L7 = ["B1", "B2", "B3", "B4", "B5", "B7"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fit_loss(model: TaskModel, batch: dict, steps: int = 25, lr: float = 3e-3) -> tuple[float, float]:
    """The task loss on ``batch`` before and after ``steps`` AdamW steps (eval mode for both readings)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def loss(train: bool) -> torch.Tensor:
        model.train(train)
        return model(batch)["loss"]

    with torch.no_grad():
        before = loss(False).item()
    for _ in range(steps):
        opt.zero_grad()
        loss(True).backward()
        opt.step()
    with torch.no_grad():
        return before, loss(False).item()


def land_cover_model(task: str, **kw) -> tuple[TaskModel, dict]:
    xs, ys = real_land_cover()
    sensor = get_sensor("landsat7_etm").select(L7)
    spec = TaskSpec(task=task, classes=CLASSES, **kw)
    return TaskModel(create_recipe("ofa", [sensor], "tiny"), spec, 32), {"landsat7_etm": xs[:48], "label": ys[:48]}


@pytest.mark.parametrize("task,kw", [
    ("segmentation", {}),
    ("classification", {"label_from": "majority"}),
    ("multilabel", {"label_from": "presence"}),
])
def test_land_cover_heads_learn_real_labels(task, kw):
    model, batch = land_cover_model(task, **kw)
    before, after = fit_loss(model, batch)
    assert after < 0.7 * before, (task, before, after)


def test_derived_scene_labels_follow_the_chip():
    _, ys = real_land_cover()
    model, _ = land_cover_model("classification", label_from="majority")
    label = ys[:8]
    target, _ = model.targets({"label": label})
    for chip, t in zip(label, target):
        counts = np.bincount(chip[chip >= 0].numpy(), minlength=7)
        assert t == (counts.argmax() if counts.sum() else -1)
    multi, _ = land_cover_model("multilabel", label_from="presence", presence_min=0.2)
    hot, _ = multi.targets({"label": label})
    for chip, h in zip(label, hot):
        share = np.bincount(chip[chip >= 0].numpy(), minlength=7) / max(int((chip >= 0).sum()), 1)
        assert h.tolist() == (share >= 0.2).astype(int).tolist()


@pytest.mark.parametrize("task,inputs,target", [
    ("regression", ["vhr_rgb"], "dem"),      # elevation from optical
    ("translation", ["dem"], "vhr_rgb"),     # an optical image from another modality
])
def test_pixel_regression_heads_learn_a_real_target(task, inputs, target):
    chips = real_chip_group({"vhr_rgb": None, "dem": None}, 32, 24)
    sensors = [get_sensor("vhr_rgb"), get_sensor("dem")]
    bands = {"vhr_rgb": ["R", "G", "B"], "dem": ["elevation"]}[target]
    spec = TaskSpec(task=task, inputs=inputs, target=target, target_bands=bands,
                    target_stats={"mean": [0.0] * len(bands), "std": [1.0] * len(bands)})
    model = TaskModel(create_recipe("ofa", sensors, "tiny"), spec, 32)
    valid = torch.ones(24, 32, 32, dtype=torch.bool)
    valid[:, :4] = False  # pixels outside the mask must not count
    y = chips[target]  # standardised with this data's statistics, as fine-tuning does (``target_stats``)
    y = (y - y.mean(dim=(0, 2, 3), keepdim=True)) / y.std(dim=(0, 2, 3), keepdim=True)
    batch = {**chips, target: y, f"{target}.valid": valid}
    before, after = fit_loss(model, batch)
    assert after < (0.7 if task == "regression" else 0.85) * before  # terrain says little about colour
    out = model.predict(batch)
    assert out.shape == (24, len(bands), 32, 32)
    corrupted = dict(batch, **{target: batch[target].clone()})
    corrupted[target][:, :, :4] = 1e4  # huge errors where invalid: the loss ignores them
    assert model(corrupted)["loss"].item() == pytest.approx(model(batch)["loss"].item(), rel=1e-5)
    metrics = model.metrics()
    model.update_metrics(metrics, batch)
    scores = {k: float(v) for k, v in metrics.compute().items()}
    assert set(scores) >= {"rmse", "mae"} and all(np.isfinite(list(scores.values())))
    if task == "translation":
        assert {"psnr", "ssim"} <= set(scores)


def test_change_head_learns_derived_change_on_the_real_s1_series(sample_manifest, sample_spec):
    """Siamese change detection on the real 160-date Sentinel-1 series: labels derived where VV changed."""
    from earthray.data.pipeline import GroupReader, decode

    group = "s1_grd_db@series"
    reader = GroupReader.from_manifest(sample_manifest, group, max_dates=6)
    files = sample_manifest["groups"][group]["files"]
    table = pq.read_table(f"{sample_spec.output}/{files[0]}", columns=reader.columns)
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in decode(table, reader).items()}
    vv = get_sensor("s1_grd_db").select(["VV"])
    vv = vv.model_copy(update={"bands": [vv.bands[0].model_copy(update={"std": float(reader.sensors["s1_grd_db"].std[0])})]})
    # 2 px patches: the derived label is per pixel, which 8 px tokens cannot resolve (the loss then stays near
    # the prior's for some date pairs; the dates sampled depend on the chips' ids)
    model = TaskModel(create_recipe("ofa", [vv], "tiny", img_size=16, patch_size=2),
                      TaskSpec(task="change", change_threshold=2.0), 16)
    label, _ = model.targets(batch)
    changed = (label == 1).float().mean().item()
    assert 0.02 < changed < 0.98, changed  # a real mix of changed and unchanged pixels
    prior = -(changed * math.log(changed) + (1 - changed) * math.log(1 - changed))
    _, after = fit_loss(model, batch, steps=60)
    assert after < 0.8 * prior, (after, prior)  # well below predicting the change rate everywhere
    assert model.predict(batch).shape == (len(label), 2, 16, 16)


def test_missing_modality_still_predicts():
    chips = real_chip_group({"vhr_rgb": None, "dem": None}, 32, 4)
    model = TaskModel(create_recipe("ofa", [get_sensor("vhr_rgb"), get_sensor("dem")], "tiny"),
                      TaskSpec(task="classification", classes=["a", "b"]), 32).eval()
    both = model.predict(chips)
    rgb_only = model.predict({"vhr_rgb": chips["vhr_rgb"]})
    flagged = model.predict({**chips, "dem.present": torch.zeros(4, dtype=torch.bool)})
    assert torch.allclose(rgb_only, flagged, atol=1e-5)  # an absent sensor drops out of the fusion
    assert not torch.allclose(both, rgb_only)


def test_freezing_and_layer_wise_decay():
    from earthray.train.optim import param_groups

    frozen, _ = land_cover_model("segmentation", encoder="frozen")
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    assert all(p.requires_grad for p in frozen.head.parameters())

    full, _ = land_cover_model("segmentation", layer_decay=0.5)
    scales = full.lr_scales()
    emb = [v for k, v in scales.items() if "patch_embed" in k]
    assert emb and all(v == 0.5 ** 5 for v in emb)  # tiny OFA: 4 blocks + top, embeddings 5 below the head
    assert {v for k, v in scales.items() if ".blocks.3." in k} == {0.5}
    assert all(v == 1.0 for k, v in scales.items() if k.startswith("head."))
    assert not any(p.requires_grad for n, p in full.encoder.named_parameters() if n.startswith("decoders."))
    groups = param_groups(full, 0.05, lr=1e-3)
    assert {round(g["lr"], 12) for g in groups} == {round(1e-3 * 0.5 ** k, 12) for k in range(6)}

    partial, _ = land_cover_model("segmentation", encoder="partial", train_layers=2)
    trained = {n.split(".")[2] for n, p in partial.encoder.named_parameters() if p.requires_grad and ".blocks." in n}
    assert trained == {"3"}  # the last block and the top (norm); earlier blocks frozen


# ------------------------------------------------------------------------------------ on Ray Train

GROUP = "landsat7_etm+label"


@pytest.fixture(scope="module")
def base_bundle(sample_manifest, tmp_path_factory):
    """A tiny OFA encoder for the sample's Landsat 7 bands (random init: the pipeline is under test here)."""
    from earthray.bundle import save_bundle
    from earthray.train.run import sensors_of

    sensors = sensors_of(sample_manifest, [GROUP])
    model = create_recipe("ofa", sensors, "tiny")
    return save_bundle(tmp_path_factory.mktemp("base") / "ofa-l7", model, recipe="ofa", preset="tiny",
                       config=model.config, sensors=sensors, input_size=32,
                       normalisation={s.name: {"mean": [b.mean for b in s.bands], "std": [b.std for b in s.bands]}
                                      for s in sensors})


def finetune_spec(root: str, workdir, bundle, name: str, **overrides):
    from earthray.train.spec import FinetuneSpec

    spec = {"name": name, "workdir": str(workdir), "bundle": str(bundle),
            "task": {"task": "segmentation", "layer_decay": 0.75},
            "data": {"root": root, "groups": {GROUP: 8}}, "optim": {"lr": 2e-3, "warmup_steps": 2},
            "max_steps": 8, "checkpoint_every": 4, "eval": {"split": "val", "every": 4, "batch_size": 5},
            "tracking": {"log_every": 2}, "workers": {"num_workers": 2, "cpus_per_worker": 0.5}}
    return FinetuneSpec.model_validate({**spec, **overrides})


def recompute(bundle_path, manifest: dict, root: str, split: str) -> dict[str, float]:
    """The held-out metrics in one process, straight from the shards, with the exported bundle."""
    from earthray.bundle import load_bundle
    from earthray.data.pipeline import GroupReader, decode

    bundle = load_bundle(bundle_path)
    model = TaskModel.from_bundle(bundle).eval()
    reader = GroupReader.from_manifest(manifest, GROUP, normalisation=bundle.input_stats())
    metrics = model.metrics()
    for f in manifest["groups"][GROUP]["files"]:
        table = pq.read_table(f"{root}/{f}", columns=reader.columns)
        table = table.filter(pc.equal(table["split"], split))
        if table.num_rows:
            batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in decode(table, reader).items()}
            model.update_metrics(metrics, batch)
    return {f"val_{k}": float(v) for k, v in metrics.compute().items()}


def test_finetune_on_ray_train_metrics_and_registry(sample_manifest, sample_spec, base_bundle, tmp_path):
    """Two DDP workers fine-tune a segmentation head; their reduced held-out metrics equal a
    single-process recomputation; the bundle is registered and loads back by alias."""
    from mlflow.tracking import MlflowClient

    from earthray.bundle import load_bundle
    from earthray.train.finetune import finetune

    spec = finetune_spec(sample_spec.output, tmp_path, base_bundle, "ft-seg",
                         registry={"name": "landcover-test", "aliases": ["champion"]})
    result = finetune(spec)
    scores = {k: v for k, v in result.metrics.items() if k.startswith("val_")}
    classes = TaskModel.from_bundle(load_bundle(result.bundle)).spec.classes
    assert set(scores) == {"val_oa", "val_f1", "val_miou"} | {f"val_iou_{c}" for c in classes}
    assert all(0 <= v <= 1 for v in scores.values() if not math.isnan(v))  # NaN: a class absent from val
    expected = recompute(result.bundle, sample_manifest, sample_spec.output, "val")
    assert scores == pytest.approx(expected, abs=1e-6, nan_ok=True)  # every val row counted once across 2 workers

    client = MlflowClient(result.tracking_uri)
    history = client.get_metric_history(result.run_id, "val_miou")
    assert sorted(m.step for m in history) == [4, 8]
    assert result.registered and result.registered.version == "1"
    version = client.get_model_version_by_alias("landcover-test", "champion")
    assert version.run_id == result.run_id
    assert version.tags["earthray.task"] == "segmentation"
    assert float(version.tags["metric.val_miou"]) == pytest.approx(scores["val_miou"], rel=1e-5)
    assert "sediment" in version.tags["earthray.classes"]  # the label raster's own category names

    by_path = TaskModel.from_bundle(load_bundle(result.bundle)).eval()
    by_alias = TaskModel.from_bundle(load_bundle("models:/landcover-test@champion",
                                                 tracking_uri=result.tracking_uri)).eval()
    xs, _ = real_land_cover()
    with torch.no_grad():
        assert torch.equal(by_path.predict({"landsat7_etm": xs[:4]}), by_alias.predict({"landsat7_etm": xs[:4]}))


def test_finetune_spec_errors_name_the_problem(sample_manifest, sample_spec, base_bundle, tmp_path):
    from earthray.bundle import BundleError, load_bundle
    from earthray.config import ConfigError
    from earthray.train.finetune import complete_task

    bundle = load_bundle(base_bundle)
    with pytest.raises(ConfigError, match=r"needs labelled groups; \['vhr_rgbn'\]"):
        complete_task(TaskSpec(task="segmentation"), bundle, sample_manifest, [GROUP, "vhr_rgbn"])
    with pytest.raises(ConfigError, match="none of the model's inputs"):
        complete_task(TaskSpec(task="segmentation", classes=["a"]), bundle, sample_manifest, ["s2_l1c"])
    with pytest.raises(ConfigError, match="task.target"):
        complete_task(TaskSpec(task="regression", target="dem"), bundle, sample_manifest, [GROUP])
    with pytest.raises(BundleError, match="not in the model registry"):
        load_bundle("models:/no-such-model@champion", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")

    bad = tmp_path / "finetune-bad.yaml"
    bad.write_text(f"name: x\nbundle: {base_bundle}\ntask: {{task: segmentation, encoder: sideways}}\n"
                   f"data: {{root: {sample_spec.output}, groups: {{'{GROUP}': 8}}}}\nmax_steps: 2\n")
    from typer.testing import CliRunner

    from earthray.cli import app

    out = CliRunner().invoke(app, ["finetune", str(bad)])
    assert out.exit_code == 2 and "task.encoder" in out.output
