"""Run a fine-tuning spec: a pretrained bundle + a task head, trained on Ray Train like pretraining.

The driver resolves the bundle (a folder or a ``models:/`` URI), completes the task from the
data (class names, the target sensor's bands and statistics), and streams the labelled group
normalised with the bundle's own statistics. Workers evaluate on the held-out split with
torchmetrics, reduced across workers. The result is a bundle with the head, optionally
registered in the MLflow Model Registry with its metrics and aliases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from earthray import tracking
from earthray.bundle import Bundle, load_bundle, local_bundle, save_bundle
from earthray.config import ConfigError
from earthray.data.manifest import label_layer, load_manifest
from earthray.data.stream import open_group
from earthray.registry import RegisteredBundle, register_bundle
from earthray.runtime import ensure_ray
from earthray.sensors import STD_FLOOR
from earthray.tasks import TASKS, TaskModel, TaskSpec
from earthray.train.loop import WEIGHTS
from earthray.train.run import PretrainResult, fit, sensors_of
from earthray.train.spec import FinetuneSpec


@dataclass
class FinetuneResult(PretrainResult):
    registered: RegisteredBundle | None = None


def complete_task(task: TaskSpec, bundle: Bundle, manifest: dict, groups: list[str],
                  label: str | None = None) -> TaskSpec:
    """Fill what the data knows: class names from the labels (layer ``label``, default each group's
    first), the target's bands and statistics."""
    update: dict = {}
    held = {s for g in groups for s in manifest["groups"][g]["sensors"]}
    inputs = task.inputs or [s.name for s in bundle.sensors if s.name != task.target]
    if not held & set(inputs):
        raise ConfigError(f"task.inputs: groups {groups} hold {sorted(held)}, none of the model's inputs {inputs}")
    try:
        labels = [label_layer(manifest["groups"][g], label, f"data.label (group {g!r})") for g in groups]
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    unlabelled = [g for g, lab in zip(groups, labels) if not lab]
    kind = TASKS[task.task]
    # change detection derives its labels when no group has any (change_threshold)
    derived = task.task == "change" and len(unlabelled) == len(groups)
    classes = kind.classes and task.task != "change"
    if unlabelled and kind.classes and not derived:
        raise ConfigError(f"data.groups: task {task.task!r} needs labelled groups; {unlabelled} have no labels")
    if classes:
        update["classes"] = task.classes or labels[0]["classes"]
        update["ignore_index"] = labels[0].get("ignore_index", task.ignore_index)
    if not kind.classes:
        if task.target not in held:
            raise ConfigError(f"task.target: {task.target!r} is not in groups {groups} (they hold {sorted(held)})")
        stats = target_stats(task.target, bundle, manifest, groups)
        update |= {"target_bands": stats["bands"], "target_stats": {"mean": stats["mean"], "std": stats["std"]}}
    try:
        return TaskSpec.model_validate(task.model_dump() | update)
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None


def target_stats(sensor: str, bundle: Bundle, manifest: dict, groups: list[str]) -> dict:
    """The statistics the target is normalised with: the bundle's if it knows the sensor, else the data's."""
    own = bundle.input_stats()
    if sensor in own:
        return own[sensor]
    bands = next(manifest["groups"][g]["bands"][sensor] for g in groups if sensor in manifest["groups"][g]["bands"])
    stats = {b["name"]: b["stats"] for b in manifest["sensors"][sensor]["bands"]}
    return {"bands": bands, "mean": [stats[b]["mean"] for b in bands],
            "std": [max(stats[b]["std"], STD_FLOOR) for b in bands]}


def finetune(spec: FinetuneSpec, callbacks: list | None = None) -> FinetuneResult:
    """Fine-tune (or resume) ``spec.name``; returns its bundle, metrics and registry entry."""
    bundle_path = local_bundle(spec.bundle, spec.tracking_uri)
    bundle = load_bundle(bundle_path)
    manifest = load_manifest(spec.data.root)
    groups = list(spec.data.groups)
    sensors = sensors_of(manifest, groups, spec.data.sensors)
    task = complete_task(spec.task, bundle, manifest, groups, spec.data.label)
    feed = bundle.input_stats()
    if task.target:
        feed[task.target] = target_stats(task.target, bundle, manifest, groups)
    ensure_ray(spec.address, preserve_order=True)

    def stream(group: str, split: str):
        try:
            return open_group(spec.data.root, group, split, max_dates=spec.data.max_dates, seed=spec.seed,
                              num_cpus=spec.data.decode_cpus, manifest=manifest, normalisation=feed,
                              label=spec.data.label, sensors=spec.data.sensors)
        except ValueError as e:
            raise ConfigError(f"{spec.bundle}: {e}") from None

    streams = {g: stream(g, spec.data.split) for g in groups} | {f"eval.{g}": stream(g, spec.eval.split)
                                                                 for g in groups}
    workdir = Path(spec.workdir)
    run_id = tracking.open_run(spec.tracking_uri, spec.tracking.experiment, spec.name, spec.model_dump(),
                               workdir / "mlartifacts")
    loop_config = {"kind": "finetune", "sensors": [s.model_dump() for s in sensors], "task": task.model_dump(),
                   "bundle_path": str(bundle_path)}
    result = fit(spec, loop_config, streams, run_id, callbacks, split=groups)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    scores = {k: v for k, v in metrics.items() if k.startswith("val_") and not math.isnan(v)}  # NaN: undefined
    checkpoint = Path(result.checkpoint.path)
    out = export_finetuned(bundle, task, checkpoint, workdir / "bundles" / spec.name, provenance={
        "run_name": spec.name, "mlflow_run_id": run_id, "base_bundle": spec.bundle,
        "base_provenance": bundle.meta.get("provenance"), "data_root": spec.data.root, "groups": spec.data.groups,
        "metrics": scores})
    tracking.log_artifact(spec.tracking_uri, run_id, out, "bundle")
    registered = None
    if spec.registry:
        registered = register_bundle(out, spec.registry.name, tracking_uri=spec.tracking_uri, run_id=run_id,
                                     aliases=spec.registry.aliases,
                                     metrics=scores,
                                     description=f"{task.task} head fine-tuned by {spec.name}")
    tracking.close_run(spec.tracking_uri, run_id, ok=True)
    return FinetuneResult(spec.name, run_id, spec.tracking_uri, checkpoint, out, metrics, registered)


def export_finetuned(base: Bundle, task: TaskSpec, checkpoint: Path, out: Path, provenance: dict) -> Path:
    """Encoder and head from a fine-tuning checkpoint, as a bundle that carries the base's sensors and stats."""
    from safetensors.torch import load_file

    model = TaskModel.from_bundle(load_bundle(base.path), task)
    model.load_state_dict(load_file(str(checkpoint / WEIGHTS)))
    return save_bundle(out, model.encoder, recipe=base.recipe, preset=base.meta["preset"], config=model.encoder.config,
                       sensors=base.sensors, normalisation=base.normalisation, input_size=base.input_size,
                       head=model.head, head_spec=model.head_spec, classes=task.classes, provenance=provenance)
