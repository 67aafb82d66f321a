"""One scene (or co-located group) -> chips -> one Parquet shard. The unit of ingest work.

Reads go strip by strip (one chip-height band across the scene), so memory is bounded by
a strip whatever the scene size. The shard is written under a temporary name and renamed
only when complete, so an interrupted or failed scene leaves nothing half-written.

Each strip becomes *samples*: one per chip position, or, for paired time series, one per
chip position and date of the first sensor, with each other sensor's nearest date (within
``pair_within_days``) or that sensor absent. Every sample whose first sensor is valid enough
becomes a row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.lib.stride_tricks import sliding_window_view
from rasterio.enums import Resampling
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from earthray.data import schema
from earthray.data.schema import IGNORE
from earthray.data.stats import BandStats
from earthray.io import RasterError, Scene, open_scene
from earthray.io.grid import Grid
from earthray.sensors import Sensor, ValueTransform


class Quarantine(Exception):
    """This scene cannot be ingested; the message is the one-line reason recorded in the manifest."""


@dataclass
class SourceTask:
    sensor: dict  # the resolved Sensor (band subset applied), as plain data so tasks serialise
    source: str | list[str]
    time_series: bool = False
    variables: list[str] | None = None  # cube variables, one per band
    date: str | None = None
    mask: dict | None = None  # {"variable": ..., "valid": [...]}
    nodata: float | None = None
    transform: dict | None = None  # how the file's values become physical (ValueTransform)


@dataclass
class ChipTask:
    key: str
    input: str
    group: str
    sources: dict[str, SourceTask]
    output: str  # the shard's final path
    chip_size: int
    stride: int
    min_valid: float
    split: dict
    rows_per_group: int = 128
    compression: str = "snappy"
    labels: list[dict] = field(default_factory=list)  # LabelSpec dumps, paths resolved for this scene
    pair_within_days: float | None = None
    fixed_split: str | None = None

    def describe(self) -> str:
        first = next(iter(self.sources.values())).source
        return first if isinstance(first, str) else first[0]


@dataclass
class ChipResult:
    key: str
    input: str
    group: str
    scene: str
    status: str  # "done" | "quarantined"
    reason: str = ""
    file: str = ""
    chips: int = 0
    by_split: dict[str, int] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)  # sensor -> BandStats dict (bands in sensor order)
    present: dict[str, dict[str, int]] = field(default_factory=dict)  # sensor -> split -> chips
    labels: dict[str, dict] = field(default_factory=dict)  # layer -> {"counts": {class: n}, "unmapped": {value: n}}
    source_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def split_of(x: float, y: float, crs: str, block: float, split: dict) -> str:
    """Deterministic split from the chip centre's spatial block: a pure function of place and seed."""
    bx, by = math.floor(x / block), math.floor(y / block)
    h = hashlib.sha1(f"{split['seed']}:{crs}:{bx}:{by}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < split["train"]:
        return "train"
    return "val" if u < split["train"] + split["val"] else "test"


def pair_dates(ref: list[datetime], other: list[datetime], within_days: float) -> np.ndarray:
    """For each ``ref`` date, the index of the nearest ``other`` date within ``within_days``, else -1."""
    if not other:
        return np.full(len(ref), -1)
    o = np.array([d.timestamp() for d in other])
    out = []
    for d in ref:
        gap = np.abs(o - d.timestamp())
        j = int(np.argmin(gap))
        out.append(j if gap[j] <= within_days * 86400 else -1)
    return np.array(out, np.int64)


def _select(scene: Scene, sensor: Sensor, time_series: bool, where: str) -> tuple[list[int], int]:
    """Which scene bands hold the sensor's bands (in sensor order), and the number of dates."""
    want = sensor.band_names
    if not time_series and all(b in scene.band_names for b in want):
        return [scene.band_names.index(b) for b in want], 1
    if time_series:
        if scene.count % len(want):
            raise Quarantine(f"{where}: has {scene.count} bands, not a multiple of the {len(want)} bands "
                             f"{want} of sensor {sensor.name} (one per date)")
        return list(range(scene.count)), scene.count // len(want)
    if scene.count != len(want):
        named = [b for b in scene.band_names if not b.startswith(Path(scene.name).stem)]
        hint = f" (file bands: {named})" if named else ""
        raise Quarantine(f"{where}: has {scene.count} bands but sensor {sensor.name} expects "
                         f"{len(want)} {want}{hint}")
    return list(range(scene.count)), 1


def fits(values: np.ndarray, dtype: np.dtype) -> bool:
    """Whether ``values`` are representable in ``dtype`` without loss (integral and in range for integers)."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0):
            return False
        return values.size == 0 or (values.min() >= info.min and values.max() <= info.max)
    return True


def _to_storage(data: np.ndarray, valid: np.ndarray, sensor: Sensor, where: str) -> np.ndarray:
    """Cast to the sensor's stored dtype, filling invalid pixels; refuse a lossy cast."""
    dtype = np.dtype(sensor.dtype)
    if data.dtype == dtype:
        out = data.copy()
    else:
        if not fits(data[valid], dtype):
            raise Quarantine(f"{where}: values do not fit sensor {sensor.name}'s dtype {dtype} "
                             f"(range {data[valid].min():g}..{data[valid].max():g}); declare a sensor with a wider dtype")
        with np.errstate(invalid="ignore"):
            out = data.astype(dtype)
    out[~valid] = np.array(sensor.nodata if sensor.nodata is not None else 0).astype(dtype)
    return out


def encode(data: np.ndarray, valid: np.ndarray, sensor: Sensor, source: SourceTask, physical: bool,
           where: str) -> np.ndarray:
    """Scene values -> the sensor's stored values. Values that arrive physical (a CF-decoded cube, or a
    source ``transform``) are stored in the sensor's own units: its transform inverted, rounded for
    integer storage (the sensor's declared precision)."""
    if source.transform is not None:
        data, physical = ValueTransform.model_validate(source.transform).apply(data), True
    if physical:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            data = sensor.transform.invert(data)
        if np.dtype(sensor.dtype).kind in "iu":
            data = np.rint(data)
    return _to_storage(data, valid, sensor, where)


def _date(d: datetime | None) -> datetime | None:
    return d.replace(microsecond=0) if d else None


def run_chip_task(task: ChipTask) -> ChipResult:
    """Chip one scene into one shard. Any problem with the inputs becomes a quarantine, not a crash."""
    result = ChipResult(task.key, task.input, task.group, task.describe(), "done")
    tmp = Path(f"{task.output}.{os.getpid()}.tmp")
    try:
        with ExitStack() as stack:
            _chip(task, result, tmp, stack)
        if result.chips:
            os.replace(tmp, task.output)
            result.file = task.output
    except (Quarantine, RasterError) as e:
        result.status, result.reason = "quarantined", str(e)
    except Exception as e:  # a bug or an unforeseen file problem: still one line, the job goes on
        result.status, result.reason = "quarantined", f"{task.describe()}: unexpected {type(e).__name__}: {e}"
    finally:
        tmp.unlink(missing_ok=True)
    if result.status != "done":
        result.chips, result.by_split, result.stats, result.present, result.file = 0, {}, {}, {}, ""
        result.labels = {}
    return result


# ----------------------------------------------------------------------------------------------- opening


def _open_sources(task: ChipTask, sensors: dict[str, Sensor], result: ChipResult,
                  stack: ExitStack) -> tuple[dict[str, Scene], dict[str, tuple[list[int], int]], Grid]:
    """Every sensor's scene on the first one's grid, with the bands (and dates) it contributes."""
    scenes, layout, ref_grid = {}, {}, None
    for name, src in task.sources.items():
        sensor = sensors[name]
        mask = (src.mask["variable"], src.mask["valid"]) if src.mask else None
        # a cube's fill is in the file's units, so the sensor's nodata (in its stored units) is no fallback there
        nodata = src.nodata if src.nodata is not None or src.variables else sensor.nodata
        scene = stack.enter_context(open_scene(src.source, nodata=nodata, variables=src.variables,
                                               band_names=sensor.band_names, time_series=src.time_series,
                                               date=src.date, mask=mask))
        where = scene.name
        if scene.grid.crs is None:
            raise Quarantine(f"{where}: has no CRS (georeferencing is required to chip, split and pair)")
        result.source_bytes += scene.grid.width * scene.grid.height * scene.count * scene.dtype.itemsize
        if ref_grid is None:
            ref_grid = scene.grid
        else:
            if not scene.overlaps(ref_grid):
                raise Quarantine(f"{where}: does not overlap {result.scene}")
            scene = stack.enter_context(scene.reproject(ref_grid))
        if src.time_series and not scene.band_dates:
            raise Quarantine(f"{where}: a time series needs a date per step (in band names or a cube's time axis)")
        layout[name] = _select(scene, sensor, src.time_series, where)
        scenes[name] = scene
    return scenes, layout, ref_grid


@dataclass
class _Layer:
    """A label layer opened for one scene: a per-pixel scene, or the scene's multi-hot vector."""

    spec: dict
    scene: Scene | None = None
    vector: np.ndarray | None = None
    counts: dict[int, int] = field(default_factory=dict)
    unmapped: dict[float, int] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        codes = self.spec.get("codes")
        return list(dict.fromkeys(codes.values())) if codes else list(self.spec.get("classes") or [])

    def to_classes(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Raw label values -> class index (int16), IGNORE where invalid or not a listed code."""
        codes = self.spec.get("codes")
        if not codes:
            out = np.where(valid, values.astype(np.float64) - self.spec.get("first_class", 0), IGNORE)
            return out.astype(np.int16)
        index = {name: i for i, name in enumerate(self.classes)}
        out = np.full(values.shape, IGNORE, np.int16)
        for code, name in codes.items():
            out[valid & (values == int(code))] = index[name]
        missed = valid & (out == IGNORE)
        for v, n in zip(*np.unique(values[missed], return_counts=True)):
            self.unmapped[float(v)] = self.unmapped.get(float(v), 0) + int(n)
        return out

    def count(self, labels: np.ndarray) -> None:
        if self.vector is not None:
            for c in np.flatnonzero(self.vector):
                self.counts[int(c)] = self.counts.get(int(c), 0) + len(labels)
            return
        for c, n in zip(*np.unique(labels[labels != IGNORE], return_counts=True)):
            self.counts[int(c)] = self.counts.get(int(c), 0) + int(n)


def _open_labels(task: ChipTask, ref_grid: Grid, image: str, stack: ExitStack) -> list[_Layer]:
    layers = []
    for spec in task.labels:
        layer = _Layer(spec)
        if spec.get("scene"):
            layer.vector = _scene_labels(spec, layer.classes)
        else:
            variable = spec.get("variable")
            scene = stack.enter_context(open_scene(spec["path"], nodata=spec.get("nodata"), resampling=Resampling.nearest,
                                                   variables=[variable] if variable else None,
                                                   band_names=[spec["name"]] if variable else None, time_series=False))
            if scene.grid.crs is None:
                raise Quarantine(f"{scene.name}: label raster has no CRS")
            if not scene.overlaps(ref_grid):
                raise Quarantine(f"{scene.name}: label raster does not overlap the image {image}")
            if scene.count != 1:
                raise Quarantine(f"{scene.name}: label raster has {scene.count} bands, expected 1")
            layer.scene = stack.enter_context(scene.reproject(ref_grid, Resampling.nearest))
        layers.append(layer)
    return layers


def _scene_labels(spec: dict, classes: list[str]) -> np.ndarray:
    """A per-scene label file (JSON, the class names under ``key``) -> multi-hot (K,) uint8."""
    path = spec["scene"]
    try:
        names = json.loads(Path(path).read_text())[spec.get("key", "labels")]
    except FileNotFoundError:
        raise Quarantine(f"{path}: no label file for this scene") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Quarantine(f"{path}: not a label file with a {spec.get('key', 'labels')!r} list ({e})") from None
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise Quarantine(f"{path}: labels {unknown} are not among the {len(classes)} classes of layer "
                         f"{spec['name']!r}")
    vector = np.zeros(len(classes), np.uint8)
    vector[[classes.index(n) for n in names]] = 1
    return vector


# ----------------------------------------------------------------------------------------------- writing


def _fields(task: ChipTask, sensors: dict[str, Sensor], layers: list[_Layer]) -> list[pa.Field]:
    size, paired = task.chip_size, task.pair_within_days is not None
    fields = list(schema.BASE_FIELDS)
    for name, sensor in sensors.items():
        if task.sources[name].time_series and not paired:
            fields += [schema.series_field(name, sensor.dtype, 4), schema.series_field(f"{name}.valid", np.uint8, 3),
                       pa.field(f"{name}.dates", pa.list_(pa.timestamp("s")))]
        else:
            fields += [schema.tensor_field(name, sensor.dtype, (len(sensor.bands), size, size)),
                       schema.tensor_field(f"{name}.valid", np.uint8, (size, size)),
                       pa.field(f"{name}.date", pa.timestamp("s"))]
        fields.append(pa.field(f"{name}.present", pa.bool_()))
    for layer in layers:
        column = label_column(layer.spec["name"])
        if layer.vector is not None:
            fields.append(schema.tensor_field(column, np.uint8, (len(layer.classes),)))
        else:
            fields.append(schema.tensor_field(column, np.int16, (size, size)))
    return fields


def label_column(name: str) -> str:
    """A label layer's shard column: ``label`` for the default layer name, ``label.<name>`` for others."""
    return "label" if name == "label" else f"label.{name}"


class _ShardWriter:
    """Rows buffered per column and written a row group at a time."""

    def __init__(self, tmp: Path, fields: list[pa.Field], task: ChipTask, stack: ExitStack):
        self.tmp, self.fields, self.task, self.stack = tmp, fields, task, stack
        self.schema = pa.schema(fields, metadata={"earthray.schema_version": str(schema.SCHEMA_VERSION)})
        self.rows: dict[str, list] = {f.name: [] for f in fields}
        self.writer = None

    def add(self, columns: dict[str, list]) -> None:
        for k, v in columns.items():
            self.rows[k] += v
        if len(self.rows["sample_id"]) >= self.task.rows_per_group:
            self.flush()

    def flush(self) -> None:
        if not self.rows["sample_id"]:
            return
        columns = [schema.tensor_array(self.rows[f.name], f) if f.metadata else pa.array(self.rows[f.name], type=f.type)
                   for f in self.fields]
        table = pa.Table.from_arrays(columns, schema=self.schema)
        if self.writer is None:
            # Dictionary pages and min/max statistics pay off for the scalar columns only; on pixel columns
            # they cost most of the write time for nothing a reader uses.
            scalars = [f.name for f in schema.BASE_FIELDS]
            self.writer = self.stack.enter_context(pq.ParquetWriter(
                self.tmp, self.schema, compression=self.task.compression, use_dictionary=scalars,
                write_statistics=scalars))
        self.writer.write_table(table, row_group_size=self.task.rows_per_group)
        for v in self.rows.values():
            v.clear()


# ----------------------------------------------------------------------------------------------- chipping


@dataclass
class _Samples:
    """One strip's samples of one sensor: chips in the scene's values, their validity and dates."""

    data: np.ndarray  # (n, C, s, s) or (n, T, C, s, s)
    valid: np.ndarray  # (n, s, s) or (n, T, s, s)
    dates: list  # per sample: a datetime or None; for a series, the list of its dates
    available: np.ndarray  # (n,) False where a paired sample has no date of this sensor


@dataclass
class _Plan:
    """Everything a scene's strips share, settled once the sources are open, so each strip is read and
    turned into rows without re-deciding grid, dates or pairing."""

    task: ChipTask
    scene: str  # the result's scene name, carried into every row
    sensors: dict[str, Sensor]
    scenes: dict[str, Scene]
    layout: dict[str, tuple[list[int], int]]
    layers: list[_Layer]
    grid: Grid
    dates: dict[str, datetime | None | list[datetime | None]]
    match: dict[str, np.ndarray | None]  # per sensor: its date index for each reference date; None unpaired
    crs: str
    block: float

    @property
    def size(self) -> int:
        return self.task.chip_size

    @property
    def ref(self) -> str:
        """The first sensor: its samples decide which rows exist and where they lie."""
        return next(iter(self.sensors))

    @property
    def paired(self) -> bool:
        return self.task.pair_within_days is not None

    def strip_starts(self) -> range:
        return range(0, self.grid.height - self.size + 1, self.task.stride)

    def windows(self, x: np.ndarray) -> np.ndarray:
        """``(..., size, W)`` strip -> ``(n, ..., size, size)``: every chip along it, as views."""
        w = sliding_window_view(x, self.size, axis=-1)[..., ::self.task.stride, :]
        return np.moveaxis(w, -2, 0)


def _plan(task: ChipTask, result: ChipResult, stack: ExitStack) -> _Plan:
    """Open and check every source and label layer before the first strip is read, so a missing, misplaced
    or too small input quarantines the scene at once."""
    sensors = {name: Sensor.model_validate(src.sensor) for name, src in task.sources.items()}
    scenes, layout, grid = _open_sources(task, sensors, result, stack)
    layers = _open_labels(task, grid, result.scene, stack)
    size = task.chip_size
    if grid.width < size or grid.height < size:
        raise Quarantine(f"{result.scene}: {grid.width}x{grid.height} is smaller than one {size}px chip")
    dates = {n: [_date(d) for d in scenes[n].band_dates[::len(sensors[n].bands)]] if task.sources[n].time_series
             else _date(scenes[n].acquired) for n in sensors}
    ref = next(iter(sensors))
    paired = task.pair_within_days is not None
    match = {n: pair_dates(dates[ref], dates[n], task.pair_within_days) if paired else None for n in sensors}
    block = task.split.get("block_size") or 4 * size * grid.res[0]
    return _Plan(task, result.scene, sensors, scenes, layout, layers, grid, dates, match, grid.crs_string(), block)


def _chip(task: ChipTask, result: ChipResult, tmp: Path, stack: ExitStack) -> None:
    """Stream the scene strip by strip into the shard, so memory stays one strip whatever the scene size."""
    plan = _plan(task, result, stack)
    stats = {n: BandStats(len(s.bands)) for n, s in plan.sensors.items()}
    present: dict[str, dict[str, int]] = {n: {} for n in plan.sensors}
    writer = _ShardWriter(tmp, _fields(task, plan.sensors, plan.layers), task, stack)
    for r in plan.strip_starts():
        columns = _strip_rows(plan, r, stats, present)
        if columns is None:
            continue
        writer.add(columns)
        result.chips += len(columns["sample_id"])
        for split in columns["split"]:
            result.by_split[split] = result.by_split.get(split, 0) + 1
    writer.flush()
    result.stats = {n: s.to_dict() for n, s in stats.items()}
    result.present = present
    result.labels = {layer.spec["name"]: {"counts": layer.counts, "unmapped": layer.unmapped} for layer in plan.layers}


def _strip_rows(plan: _Plan, r: int, stats: dict[str, BandStats],
                present: dict[str, dict[str, int]]) -> dict[str, list] | None:
    """One strip's rows as shard columns (None when no sample of the first sensor is valid enough); only
    kept samples reach the statistics and presence counts."""
    strip = Window(0, r, plan.grid.width, plan.size)
    samples = {n: _strip_samples(plan.scenes[n], plan.layout[n], sensor, plan.task.sources[n].time_series, strip,
                                 plan.windows, plan.dates[n], plan.match[n]) for n, sensor in plan.sensors.items()}
    ok = {n: s.available & (_valid_fraction(s) >= plan.task.min_valid) for n, s in samples.items()}
    keep = np.flatnonzero(ok[plan.ref])
    if not len(keep):
        return None
    positions = np.arange(len(samples[plan.ref].available))
    if plan.paired:
        positions = positions // len(plan.dates[plan.ref])
    columns = _place_columns(plan, r, positions[keep], [samples[plan.ref].dates[k] for k in keep])
    for name, sensor in plan.sensors.items():
        columns |= _sensor_columns(name, sensor, plan.task.sources[name], plan.scenes[name], samples[name], keep,
                                   ok[name][keep], columns["split"], stats[name], present[name])
    for layer in plan.layers:
        columns[label_column(layer.spec["name"])] = _label_rows(layer, strip, plan.windows, positions[keep])
    return columns


def _valid_fraction(samples: _Samples) -> np.ndarray:
    """Per sample, the share of valid pixels. A series pixel counts once seen on any date: clouds come and
    go, nodata stays."""
    valid = samples.valid.any(axis=1) if samples.valid.ndim == 4 else samples.valid
    return valid.reshape(len(samples.valid), -1).mean(axis=1)


def _place_columns(plan: _Plan, r: int, positions: np.ndarray, dates: list) -> dict[str, list]:
    """Where each kept sample lies and its id; the split follows from the place, so nearby chips share one."""
    task, size = plan.task, plan.size
    n = len(positions)
    cols = positions * task.stride
    xs, ys = plan.grid.transform @ (cols + size / 2, np.full(n, r + size / 2))
    lons, lats = warp_transform(plan.grid.crs, "EPSG:4326", xs, ys)
    splits = [task.fixed_split] * n if task.fixed_split else \
        [split_of(x, y, plan.crs, plan.block, task.split) for x, y in zip(xs, ys)]
    suffix = [f"@{d:%Y%m%dT%H%M%S}" for d in dates] if plan.paired else [""] * n
    return dict(sample_id=[f"{task.input}/{task.key[:10]}/{r}_{c}{s}" for c, s in zip(cols, suffix)],
                input=[task.input] * n, scene=[plan.scene] * n, crs=[plan.crs] * n, x=list(xs), y=list(ys),
                lon=list(lons), lat=list(lats), row=[r] * n, col=cols.tolist(), split=splits)


def _strip_samples(scene: Scene, layout: tuple[list[int], int], sensor: Sensor, series: bool, strip: Window,
                   windows: Callable[[np.ndarray], np.ndarray], dates, match: np.ndarray | None) -> _Samples:
    idx, t = layout
    data, valid = scene.read(strip)
    data, valid = data[idx], valid[idx]
    size = int(strip.height)
    if series:
        data = data.reshape(t, len(sensor.bands), size, -1)
        valid = valid.reshape(data.shape).all(axis=1)
    else:
        valid = valid.all(axis=0)
    data, valid = windows(data), windows(valid)
    positions = len(data)
    if match is None:
        return _Samples(data, valid, [dates] * positions, np.ones(positions, bool))
    # paired: sample (position p, reference date i) takes this sensor's date match[i], if any
    found = match >= 0
    step = np.where(found, match, 0)
    data = data[:, step].reshape(-1, *data.shape[2:])
    valid = (valid[:, step] & found[None, :, None, None]).reshape(-1, *valid.shape[2:])
    picked = [dates[j] if ok else None for j, ok in zip(step, found)]
    return _Samples(data, valid, picked * positions, np.tile(found, positions))


def _sensor_columns(name: str, sensor: Sensor, source: SourceTask, scene: Scene, samples: _Samples, keep: np.ndarray,
                    ok: np.ndarray, splits: list[str], stats: BandStats, present: dict[str, int]) -> dict[str, list]:
    """The kept samples of one sensor as shard columns; statistics and presence counted on the way."""
    series = samples.data.ndim == 5
    data, valid = samples.data[keep], samples.valid[keep]
    valid = valid & ok.reshape((-1,) + (1,) * (valid.ndim - 1))
    pixel_valid = valid[:, :, None] if series else valid[:, None]
    stored = encode(data, np.broadcast_to(pixel_valid, data.shape), sensor, source, getattr(scene, "physical", False),
                    scene.name)
    stored[~ok] = 0
    axis = 2 if series else 1
    phys = np.moveaxis(sensor.transform.apply(stored), axis, 0)
    stats.update(phys, np.broadcast_to(np.moveaxis(pixel_valid, axis, 0), phys.shape))
    for split, here in zip(splits, ok):
        if here:
            present[split] = present.get(split, 0) + 1
    out = {name: list(stored), f"{name}.valid": list(valid.astype(np.uint8)), f"{name}.present": ok.tolist()}
    picked = [samples.dates[k] for k in keep]
    if series:
        out[f"{name}.dates"] = picked
    else:
        out[f"{name}.date"] = [d if here else None for d, here in zip(picked, ok)]
    return out


def _label_rows(layer: _Layer, strip: Window, windows: Callable[[np.ndarray], np.ndarray], positions: np.ndarray) -> list[np.ndarray]:
    if layer.vector is not None:
        layer.count(positions)
        return [layer.vector] * len(positions)
    values, valid = layer.scene.read(strip)
    labels = windows(layer.to_classes(values[0], valid[0]))[positions]
    layer.count(labels)
    return list(labels)
