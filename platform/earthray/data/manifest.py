"""manifest.json: everything a reader needs to use the shards without opening them.

Schema version, sensors with their bands and per-band statistics over valid pixels (in
physical units, after the sensor's value transform), groups with their files, counts
per sensor and split, the label classes, and the quarantine list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from earthray.data import schema
from earthray.data.chipper import ChipResult, ChipTask, label_column
from earthray.data.schema import IGNORE
from earthray.data.spec import IngestSpec
from earthray.data.stats import BandStats
from earthray.errors import DataError, NotFound
from earthray.sensors import Catalogue, Sensor


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; run `earthray ingest` first") from None
    if manifest.get("schema_version") != schema.SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {manifest.get('schema_version')}, "
                         f"this earthray reads {schema.SCHEMA_VERSION}")
    return manifest


def build_manifest(spec: IngestSpec, catalogue: Catalogue, tasks: list[ChipTask],
                   results: list[ChipResult]) -> dict:
    root = Path(spec.output)
    per_band: dict[str, dict[str, BandStats]] = {}
    per_group: dict[tuple[str, str], BandStats] = {}
    sensors: dict[str, dict] = {}
    groups: dict[str, dict] = {}
    totals: dict[str, int] = {}
    for task, res in zip(tasks, results):
        g = groups.setdefault(task.group, {
            "sensors": list(task.sources), "kind": _kind(task), "chip_size": task.chip_size,
            "stride": task.stride, "files": [], "count": 0, "by_split": {}, "present": {n: 0 for n in task.sources},
            "bands": {n: [b["name"] for b in s.sensor["bands"]] for n, s in task.sources.items()},
            "tensors": _tensors(task), "labels": {x["name"]: _layer(x) for x in task.labels},
            "label": None,
        })
        if task.pair_within_days is not None:
            g["pair_within_days"] = task.pair_within_days
        if res.status != "done":
            continue
        for name, layer in res.labels.items():
            entry = g["labels"][name]
            for c, n in layer["counts"].items():
                entry["counts"][entry["classes"][int(c)]] = entry["counts"].get(entry["classes"][int(c)], 0) + n
            for v, n in layer["unmapped"].items():
                entry["unmapped"][str(v)] = entry["unmapped"].get(str(v), 0) + n
        if res.file:
            g["files"].append(os.path.relpath(res.file, root))
        g["count"] += res.chips
        for split, n in res.by_split.items():
            g["by_split"][split] = g["by_split"].get(split, 0) + n
            totals[split] = totals.get(split, 0) + n
        for name, src in task.sources.items():
            sensor = Sensor.model_validate(src.sensor)
            entry = sensors.setdefault(name, {"count": 0, "by_split": {}})
            for split, n in res.present.get(name, {}).items():
                g["present"][name] += n
                entry["count"] += n
                entry["by_split"][split] = entry["by_split"].get(split, 0) + n
            if name in res.stats:
                stats = BandStats.from_dict(res.stats[name])
                per_group.setdefault((task.group, name), BandStats(len(sensor.bands))).merge(stats)
                bands = per_band.setdefault(name, {})
                for i, band in enumerate(sensor.band_names):
                    one = _slice(stats, i)
                    bands[band] = bands[band].merge(one) if band in bands else one
    for name, entry in sensors.items():
        sensor = catalogue[name]
        bands = per_band.get(name, {})
        entry.update({
            "kind": sensor.kind, "dtype": sensor.dtype, "nodata": sensor.nodata,
            "transform": sensor.transform.model_dump(),
            "bands": [{**b.model_dump(), "stats": _band_dict(bands[b.name])}
                      for b in sensor.bands if b.name in bands],
        })
    for (group, name), stats in per_group.items():
        names = groups[group]["bands"][name]
        groups[group].setdefault("stats", {})[name] = {b: _band_dict(_slice(stats, i)) for i, b in enumerate(names)}
    for g in groups.values():
        g["files"].sort()
        g["label"] = next(iter(g["labels"].values()), None)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "name": spec.name,
        "spec": spec.model_dump(),
        "groups": groups,
        "sensors": sensors,
        "counts": {"total": sum(totals.values()), "by_split": totals},
        "scenes": [{"key": r.key, "input": r.input, "group": r.group, "scene": r.scene, "status": r.status,
                    "chips": r.chips, "file": os.path.relpath(r.file, root) if r.file else None}
                   for r in results],
        "quarantine": [{"input": r.input, "scene": r.scene, "reason": r.reason}
                       for r in results if r.status == "quarantined"],
    }


def _tensors(task: ChipTask) -> dict[str, dict]:
    """Stored dtype and shape of each tensor column (None for the date axis of a series)."""
    size = task.chip_size
    out = {}
    for name, src in task.sources.items():
        dtype, c = schema.little_endian(src.sensor["dtype"]).str, len(src.sensor["bands"])
        series = [None] if src.time_series and task.pair_within_days is None else []
        out[name] = {"dtype": dtype, "shape": [*series, c, size, size]}
        out[f"{name}.valid"] = {"dtype": "|u1", "shape": [*series, size, size]}
    for layer in task.labels:
        out[label_column(layer["name"])] = ({"dtype": "|u1", "shape": [len(_layer(layer)["classes"])]}
                                            if layer.get("scene") else {"dtype": "<i2", "shape": [size, size]})
    return out


def _layer(spec: dict) -> dict:
    """A label layer's manifest entry (its class counts are filled in as scenes finish)."""
    codes = spec.get("codes")
    classes = list(dict.fromkeys(codes.values())) if codes else spec.get("classes")
    return {"name": spec["name"], "column": label_column(spec["name"]), "kind": "scene" if spec.get("scene") else "pixel",
            "classes": classes, "first_class": spec.get("first_class", 0), "codes": codes, "ignore_index": IGNORE,
            "counts": {}, "unmapped": {}}


def label_layer(group: dict, name: str | None = None, where: str = "label") -> dict | None:
    """A group's label layer by name (None: its first); None when the group has no labels at all."""
    layers = group.get("labels") or {}
    if name is None:
        return next(iter(layers.values()), None)
    if name not in layers:
        raise NotFound(f"{where}: no label layer {name!r}; layers: {', '.join(layers) or 'none'}")
    return layers[name]


def _kind(task: ChipTask) -> str:
    if task.pair_within_days is not None:
        return "paired"
    if any(s.time_series for s in task.sources.values()):
        return "timeseries"
    return "colocated" if len(task.sources) > 1 else "unpaired"


def _slice(stats: BandStats, i: int) -> BandStats:
    one = BandStats(1)
    one.count[0], one.mean[0], one.m2[0], one.min[0], one.max[0] = (
        stats.count[i], stats.mean[i], stats.m2[i], stats.min[i], stats.max[i])
    return one


def _band_dict(stats: BandStats) -> dict:
    d = stats.to_dict()
    return {k: d[k][0] for k in ("count", "mean", "std", "min", "max")}


def summary_table(manifest: dict):
    """A rich table of chips per group and split, for the end of an ingest."""
    from rich.table import Table

    splits = ["train", "val", "test"]
    table = Table(title=f"ingest {manifest['name']}: {manifest['counts']['total']} chips")
    for col in ["group", "kind", "files", *splits, "total"]:
        table.add_column(col, justify="left" if col in ("group", "kind") else "right", overflow="fold")
    for name, g in sorted(manifest["groups"].items()):
        table.add_row(name, g["kind"], str(len(g["files"])), *[str(g["by_split"].get(s, 0)) for s in splits],
                      str(g["count"]))
    return table
