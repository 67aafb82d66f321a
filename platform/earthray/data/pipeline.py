"""Shard rows -> normalised batches in the recipe layout (``decode``), and per-group stream interleaving.

Everything needed to decode comes from the manifest (``GroupReader``). ``earthray.data.stream``
streams the rows with Ray Data and runs ``decode`` where they are consumed. Random augmentation
happens later, on the batch (``earthray.data.augment``), where the training step is known, so it
is reproducible and differs from epoch to epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from earthray.data.manifest import label_layer
from earthray.errors import DataError, NotFound
from earthray.sensors import STD_FLOOR, ValueTransform


@dataclass
class SensorNorm:
    transform: ValueTransform
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, transform: ValueTransform, mean, std) -> SensorNorm:
        """Per-band statistics as float32, the std floored at ``STD_FLOOR``."""
        return cls(transform, np.asarray(mean, np.float32), np.maximum(np.asarray(std, np.float32), STD_FLOOR))


@dataclass
class GroupReader:
    """How to decode one group's rows: tensor dtypes/shapes and per-sensor normalisation."""

    group: str
    tensors: dict[str, dict]
    sensors: dict[str, SensorNorm]
    series: dict[str, bool]
    label: str | None
    """The shard column that becomes ``batch["label"]`` (a label layer's), or None."""
    max_dates: int = 16
    seed: int = 0
    columns: list[str] = field(default_factory=list)

    @classmethod
    def from_manifest(cls, manifest: dict, group: str, max_dates: int = 16, seed: int = 0,
                      normalisation: dict[str, dict] | None = None, label: str | None = None) -> GroupReader:
        """``normalisation`` (sensor -> ``bands``, ``mean``, ``std``) replaces the manifest's statistics:
        a model must be fed the statistics it was trained with, not those of the data at hand.
        ``label`` names the label layer delivered as ``batch["label"]`` (default: the group's first)."""
        try:
            g = manifest["groups"][group]
        except KeyError:
            raise NotFound(f"no group {group!r} in the manifest; groups: {', '.join(manifest['groups'])}") from None
        sensors, series = {}, {}
        for name in g["sensors"]:
            entry = manifest["sensors"][name]
            stats = {b["name"]: b["stats"] for b in entry["bands"]}
            bands = g["bands"][name]
            mean = [stats[b]["mean"] for b in bands]
            std = [stats[b]["std"] for b in bands]
            if normalisation is not None and name in normalisation:
                given = normalisation[name]
                if list(given["bands"]) != list(bands):
                    raise DataError(f"group {group!r}: sensor {name!r} has bands {bands}; the model expects "
                                     f"{list(given['bands'])}")
                mean, std = given["mean"], given["std"]
            sensors[name] = SensorNorm.of(ValueTransform(**entry["transform"]), mean, std)
            series[name] = g["tensors"][name]["shape"][0] is None
        columns = ["sample_id", "lon", "lat", "split"]
        for name in g["sensors"]:
            columns += [name, f"{name}.valid", f"{name}.present"] + ([f"{name}.dates"] if series[name] else [])
        layer = label_layer(g, label, f"group {group!r}")
        if layer:
            columns.append(layer["column"])
        return cls(group, g["tensors"], sensors, series, layer["column"] if layer else None, max_dates, seed, columns)


    def only(self, sensors: list[str]) -> GroupReader:
        """This reader restricted to ``sensors`` (those the group holds): the others are not read."""
        keep = [s for s in self.sensors if s in sensors]
        if not keep:
            raise DataError(f"group {self.group!r} holds none of the sensors {sensors} (it holds {list(self.sensors)})")
        drop = [s for s in self.sensors if s not in keep]
        columns = [c for c in self.columns if c.split(".")[0] not in drop]
        return dataclasses.replace(self, sensors={s: self.sensors[s] for s in keep},
                                   series={s: self.series[s] for s in keep}, columns=columns)


def _fixed(column: pa.ChunkedArray | pa.Array, spec: dict) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = column.type.byte_width
    raw = np.frombuffer(column.buffers()[1], np.uint8, count=width * len(column), offset=column.offset * width)
    return raw.view(np.dtype(spec["dtype"])).reshape((len(column), *spec["shape"]))


def _pick_dates(n_dates: int, k: int, key: str, seed: int) -> np.ndarray:
    """A sorted subset of at most k dates, fixed per sample and seed (SkySense samples dates)."""
    if n_dates <= k:
        return np.arange(n_dates)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "little"))
    return np.sort(rng.choice(n_dates, k, replace=False))


def decode(table: pa.Table, reader: GroupReader) -> dict[str, np.ndarray]:
    """A block of shard rows -> the recipe batch layout (see ``earthray.recipes.base``)."""
    n = table.num_rows
    out: dict[str, np.ndarray] = {"lonlat": np.stack([table["lon"].to_numpy(), table["lat"].to_numpy()], 1)
                                  .astype(np.float32)}
    ids = table["sample_id"].to_pylist()
    for name, norm in reader.sensors.items():
        present = table[f"{name}.present"].to_numpy(zero_copy_only=False).astype(bool)
        if reader.series[name]:
            x, valid, doy, tmask = _decode_series(table, name, reader, norm, ids)
            out[f"{name}.doy"], out[f"{name}.tmask"] = doy, tmask
        else:
            raw = _fixed(table[name], reader.tensors[name])
            valid = _fixed(table[f"{name}.valid"], reader.tensors[f"{name}.valid"]).astype(bool)
            x = normalise(raw, norm, valid, axis=1)
        out[name], out[f"{name}.valid"], out[f"{name}.present"] = x, valid, present
    if reader.label:
        out["label"] = _fixed(table[reader.label], reader.tensors[reader.label]).astype(np.int64)
    assert all(len(v) == n for v in out.values())
    return out


def normalise(raw: np.ndarray, norm: SensorNorm, valid: np.ndarray, axis: int) -> np.ndarray:
    """Physical values, standardised per band (``axis``); 0 wherever ``valid`` (the array without
    ``axis``) is False. Invalid pixels hold the sensor's nodata, which may be NaN or overflow: they
    are overwritten, not multiplied by 0 (NaN * 0 is NaN)."""
    shape = [1] * raw.ndim
    shape[axis] = -1
    with np.errstate(invalid="ignore", over="ignore"):
        x = norm.transform.apply(raw) - norm.mean.reshape(shape)
        x /= norm.std.reshape(shape)
    x = x.astype(np.float32, copy=False)
    np.copyto(x, 0, where=~np.expand_dims(valid, axis))
    return x


def _decode_series(table, name, reader, norm, ids):
    k = reader.max_dates
    c, h, w = reader.tensors[name]["shape"][1:]
    n = table.num_rows
    x = np.zeros((n, k, c, h, w), np.float32)
    valid = np.zeros((n, k, h, w), bool)
    doy = np.zeros((n, k), np.int64)
    tmask = np.zeros((n, k), bool)
    data = table[name].combine_chunks()
    vdata = table[f"{name}.valid"].combine_chunks()
    shapes = data.field("shape").to_pylist()
    dates = table[f"{name}.dates"].to_pylist()
    dtype = np.dtype(reader.tensors[name]["dtype"])
    for i in range(n):
        series = np.frombuffer(data.field("data")[i].as_buffer(), dtype).reshape(shapes[i])
        ok = np.frombuffer(vdata.field("data")[i].as_buffer(), np.uint8).reshape(shapes[i][0], h, w).astype(bool)
        pick = _pick_dates(len(series), k, ids[i], reader.seed)
        t = len(pick)
        x[i, :t] = normalise(series[pick], norm, ok[pick], axis=1)
        valid[i, :t] = ok[pick]
        doy[i, :t] = [dates[i][j].timetuple().tm_yday for j in pick]
        tmask[i, :t] = True
    return x, valid, doy, tmask


def interleave(batches: dict[str, Iterable]) -> Iterator[tuple[str, dict]]:
    """Round-robin over per-group batch streams until all are exhausted (every group visited each epoch).

    msGFM's heterogeneous batches: each group keeps its own batch size and each step sees one group.
    """
    live = {name: iter(it) for name, it in batches.items()}
    while live:
        for name in list(live):
            try:
                yield name, next(live[name])
            except StopIteration:
                del live[name]
