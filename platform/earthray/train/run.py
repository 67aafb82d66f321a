"""Run a pretraining spec: Ray Data shards -> Ray Train workers -> checkpoints, MLflow, a bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from earthray import tracking
from earthray.config import ConfigError
from earthray.data.manifest import load_manifest
from earthray.data.stream import GroupStream, open_group
from earthray.recipes import get_recipe_class, resolve_config
from earthray.runtime import ensure_ray
from earthray.sensors import STD_FLOOR, Sensor, default_catalogue
from earthray.train.loop import WEIGHTS, LoopConfig, train_loop
from earthray.train.spec import PretrainSpec, TrainSpec


@dataclass
class PretrainResult:
    name: str
    run_id: str
    tracking_uri: str
    checkpoint: Path
    bundle: Path
    metrics: dict


def sensors_of(manifest: dict, groups: list[str], only: list[str] | None = None) -> list[Sensor]:
    """The catalogue sensors the groups hold (or those of them in ``only``), restricted to the bands they
    were ingested with."""
    bands: dict[str, list[str]] = {}
    for g in groups:
        if g not in manifest["groups"]:
            raise ConfigError(f"data.groups: no group {g!r} in the shards; groups: {', '.join(manifest['groups'])}")
        held = manifest["groups"][g]["bands"]
        if only is not None and not set(only) & set(held):
            raise ConfigError(f"data.sensors: group {g!r} holds none of {only} (it holds {list(held)})")
        for sensor, b in held.items():
            if only is not None and sensor not in only:
                continue
            if bands.setdefault(sensor, b) != b:
                raise ConfigError(f"data.groups: sensor {sensor!r} has bands {bands[sensor]} in one group and {b} "
                                  f"in another; a model has one patch embedding per sensor")
    catalogue = default_catalogue()
    out = []
    for name, b in bands.items():
        entry = manifest["sensors"][name]
        base = catalogue[name] if name in catalogue else None
        sensor = base.select(b) if base else Sensor.model_validate({
            "name": name, "kind": entry["kind"], "dtype": entry["dtype"], "nodata": entry["nodata"],
            "transform": entry["transform"], "bands": [{k: v for k, v in x.items() if k != "stats"}
                                                       for x in entry["bands"] if x["name"] in b]})
        stats = {x["name"]: x["stats"] for x in entry["bands"]}
        out.append(sensor.model_copy(update={"bands": [band.model_copy(update={
            "mean": stats[band.name]["mean"], "std": max(stats[band.name]["std"], STD_FLOOR)}) for band in sensor.bands]}))
    return out


def fit(spec: TrainSpec, loop_config: dict, streams: dict[str, GroupStream], run_id: str,
        callbacks: list | None = None, split: list[str] | None = None):
    """Run ``train_loop`` on Ray Train workers for ``spec``; the MLflow run is marked failed if it fails.

    ``split``: the streams sharded across workers (default all); the others reach every worker whole.
    Each worker is given every stream's collate beside its shard (``collate`` in its config)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    w = spec.workers
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=LoopConfig(**loop_config, spec=spec.model_dump(), run_id=run_id,
                                     tracking_uri=spec.tracking_uri).model_dump(mode="json")
        | {"collate": {name: s.collate for name, s in streams.items()}},
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu,
                                     resources_per_worker={"CPU": w.cpus_per_worker, **w.resources}),
        run_config=RunConfig(name=spec.name, storage_path=spec.storage_path,
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints),
                             callbacks=callbacks),
        datasets={name: s.dataset for name, s in streams.items()},
        dataset_config=DataConfig(datasets_to_split=split if split is not None else "all"),
    )
    try:
        return trainer.fit()
    except Exception:
        tracking.close_run(spec.tracking_uri, run_id, ok=False)
        raise


def pretrain(spec: PretrainSpec, callbacks: list | None = None) -> PretrainResult:
    """Train (or resume) ``spec.name``; returns where its checkpoint, bundle and MLflow run are."""
    get_recipe_class(spec.recipe)
    manifest = load_manifest(spec.data.root)
    sensors = sensors_of(manifest, list(spec.data.groups), spec.data.sensors)
    config = resolve_config(spec.recipe, spec.preset, **spec.model)
    ensure_ray(spec.address, preserve_order=True)
    streams = {g: open_group(spec.data.root, g, spec.data.split, max_dates=spec.data.max_dates, seed=spec.seed,
                             num_cpus=spec.data.decode_cpus, manifest=manifest, labels=False,
                             sensors=spec.data.sensors)
               for g in spec.data.groups}
    workdir = Path(spec.workdir)
    run_id = tracking.open_run(spec.tracking_uri, spec.tracking.experiment, spec.name, spec.model_dump(),
                               workdir / "mlartifacts")
    result = fit(spec, {"kind": "pretrain", "sensors": [s.model_dump() for s in sensors]}, streams, run_id,
                 callbacks)
    checkpoint = Path(result.checkpoint.path)
    bundle = export_bundle(spec, sensors, config.model_dump(), checkpoint, run_id, workdir / "bundles" / spec.name)
    tracking.log_artifact(spec.tracking_uri, run_id, bundle, "bundle")
    tracking.close_run(spec.tracking_uri, run_id, ok=True)
    return PretrainResult(spec.name, run_id, spec.tracking_uri, checkpoint, bundle, dict(result.metrics or {}))


def export_bundle(spec: PretrainSpec, sensors: list[Sensor], config: dict, checkpoint: Path, run_id: str,
                  out: Path) -> Path:
    """Rebuild the recipe, load the checkpoint's full weights, and write a self-describing bundle.

    Before saving, the recipe's ``prepare_downstream`` puts the weights downstream tasks start
    from where ``encode`` reads them (SkySense: its EMA teacher); the provenance records which
    (``encoder_weights``). The checkpoint itself keeps the training state as it was."""
    from safetensors.torch import load_file

    from earthray.bundle import save_bundle
    from earthray.recipes import create_recipe

    model = create_recipe(spec.recipe, sensors, spec.preset, initial_weights=False, **spec.model)
    model.load_state_dict(load_file(str(checkpoint / WEIGHTS)))
    encoder_weights = model.prepare_downstream()
    size = config.get("img_size") or config.get("hr_img_size") or 0
    return save_bundle(
        out, model, recipe=spec.recipe, preset=spec.preset, config=config, sensors=sensors,
        normalisation={s.name: {"mean": [b.mean for b in s.bands], "std": [b.std for b in s.bands]} for s in sensors},
        input_size=size, provenance={"run_name": spec.name, "mlflow_run_id": run_id, "checkpoint": str(checkpoint),
                                     "data_root": spec.data.root, "groups": spec.data.groups,
                                     "encoder_weights": encoder_weights},
    )
