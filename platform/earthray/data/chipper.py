"""One scene (or co-located group) -> chips -> one Parquet shard. The unit of ingest work.

Reads go strip by strip (one chip-height band across the scene), so memory is bounded by
a strip whatever the scene size. The shard is written under a temporary name and renamed
only when complete, so an interrupted or failed scene leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import math
import os
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
from earthray.data.stats import BandStats
from earthray.io import RasterError, Scene, open_scene
from earthray.sensors import Sensor


class Quarantine(Exception):
    """This scene cannot be ingested; the message is the one-line reason recorded in the manifest."""


@dataclass
class SourceTask:
    sensor: dict  # the resolved Sensor (band subset applied), as plain data so tasks serialise
    source: str | list[str]
    time_series: bool = False


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
    label: dict | None = None

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


def _fits(values: np.ndarray, dtype: np.dtype) -> bool:
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
        if not _fits(data[valid], dtype):
            raise Quarantine(f"{where}: values do not fit sensor {sensor.name}'s dtype {dtype} "
                             f"(range {data[valid].min():g}..{data[valid].max():g}); declare a sensor with a wider dtype")
        out = data.astype(dtype)
    out[~valid] = np.array(sensor.nodata if sensor.nodata is not None else 0).astype(dtype)
    return out


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
    except Quarantine as e:
        result.status, result.reason = "quarantined", str(e)
    except RasterError as e:
        result.status, result.reason = "quarantined", str(e)
    except Exception as e:  # a bug or an unforeseen file problem: still one line, the job goes on
        result.status, result.reason = "quarantined", f"{task.describe()}: unexpected {type(e).__name__}: {e}"
    finally:
        tmp.unlink(missing_ok=True)
    if result.status != "done":
        result.chips, result.by_split, result.stats, result.present, result.file = 0, {}, {}, {}, ""
    return result


def _chip(task: ChipTask, result: ChipResult, tmp: Path, stack: ExitStack) -> None:
    sensors = {name: Sensor.model_validate(src.sensor) for name, src in task.sources.items()}
    scenes: dict[str, Scene] = {}
    layout: dict[str, tuple[list[int], int]] = {}
    ref_grid = None
    for name, src in task.sources.items():
        sensor = sensors[name]
        scene = stack.enter_context(open_scene(src.source, nodata=sensor.nodata))
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
            raise Quarantine(f"{where}: a time series needs a date in every band name")
        layout[name] = _select(scene, sensor, src.time_series, where)
        scenes[name] = scene
    label = None
    if task.label:
        label = stack.enter_context(open_scene(task.label["path"], nodata=task.label.get("nodata")))
        if label.grid.crs is None:
            raise Quarantine(f"{label.name}: label raster has no CRS")
        if not label.overlaps(ref_grid):
            raise Quarantine(f"{label.name}: label raster does not overlap the image {result.scene}")
        if label.count != 1:
            raise Quarantine(f"{label.name}: label raster has {label.count} bands, expected 1")
        label = stack.enter_context(label.reproject(ref_grid, Resampling.nearest))

    size, stride = task.chip_size, task.stride
    if ref_grid.width < size or ref_grid.height < size:
        raise Quarantine(f"{result.scene}: {ref_grid.width}x{ref_grid.height} is smaller than one {size}px chip")
    crs = ref_grid.crs_string()
    block = task.split.get("block_size") or 4 * size * ref_grid.res[0]
    stats = {n: BandStats(len(s.bands)) for n, s in sensors.items()}
    present: dict[str, dict[str, int]] = {n: {} for n in sensors}
    ref = next(iter(sensors))

    fields = list(schema.BASE_FIELDS)
    for name, sensor in sensors.items():
        if task.sources[name].time_series:
            fields += [schema.series_field(name, sensor.dtype, 4), schema.series_field(f"{name}.valid", np.uint8, 3),
                       pa.field(f"{name}.dates", pa.list_(pa.timestamp("s")))]
        else:
            fields += [schema.tensor_field(name, sensor.dtype, (len(sensor.bands), size, size)),
                       schema.tensor_field(f"{name}.valid", np.uint8, (size, size)),
                       pa.field(f"{name}.date", pa.timestamp("s"))]
        fields.append(pa.field(f"{name}.present", pa.bool_()))
    if task.label:
        fields.append(schema.tensor_field("label", np.int16, (size, size)))
    arrow_schema = pa.schema(fields, metadata={"earthray.schema_version": str(schema.SCHEMA_VERSION)})
    writer = None
    rows: dict[str, list] = {f.name: [] for f in fields}

    def flush() -> None:
        nonlocal writer
        if not rows["sample_id"]:
            return
        columns = [schema.tensor_array(rows[f.name], f) if f.metadata else pa.array(rows[f.name], type=f.type)
                   for f in fields]
        table = pa.Table.from_arrays(columns, schema=arrow_schema)
        if writer is None:
            # Dictionary pages and min/max statistics pay off for the scalar columns only; on pixel columns
            # they cost most of the write time for nothing a reader uses.
            scalars = [f.name for f in schema.BASE_FIELDS]
            writer = stack.enter_context(pq.ParquetWriter(tmp, arrow_schema, compression=task.compression,
                                                          use_dictionary=scalars, write_statistics=scalars))
        writer.write_table(table, row_group_size=task.rows_per_group)
        for v in rows.values():
            v.clear()

    def windows(x: np.ndarray) -> np.ndarray:
        """``(..., size, W)`` strip -> ``(n, ..., size, size)``: every chip along it, as views."""
        w = sliding_window_view(x, size, axis=-1)[..., ::stride, :]
        return np.moveaxis(w, -2, 0)

    for r in range(0, ref_grid.height - size + 1, stride):
        strip = Window(0, r, ref_grid.width, size)
        chips: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, scene in scenes.items():
            idx, t = layout[name]
            data, valid = scene.read(strip)
            data, valid = data[idx], valid[idx]
            if task.sources[name].time_series:
                data = data.reshape(t, len(sensors[name].bands), size, -1)
                valid = valid.reshape(data.shape).all(axis=1)
            else:
                valid = valid.all(axis=0)
            chips[name] = (windows(data), windows(valid))
        frac = {n: v.reshape(len(v), -1).mean(axis=1) for n, (_, v) in chips.items()}
        keep = np.flatnonzero(frac[ref] >= task.min_valid)
        if not len(keep):
            continue
        cols = keep * stride
        xs, ys = ref_grid.transform @ (cols + size / 2, np.full(len(cols), r + size / 2))
        lons, lats = warp_transform(ref_grid.crs, "EPSG:4326", xs, ys)
        splits = [split_of(x, y, crs, block, task.split) for x, y in zip(xs, ys)]
        base = dict(sample_id=[f"{task.input}/{task.key[:10]}/{r}_{c}" for c in cols], input=[task.input] * len(keep),
                    scene=[result.scene] * len(keep), crs=[crs] * len(keep), x=list(xs), y=list(ys), lon=list(lons),
                    lat=list(lats), row=[r] * len(keep), col=cols.tolist(), split=splits)
        for k, v in base.items():
            rows[k] += v
        for name, sensor in sensors.items():
            data, valid = chips[name][0][keep], chips[name][1][keep]
            ok = frac[name][keep] >= task.min_valid
            series = task.sources[name].time_series
            valid = valid & ok.reshape((-1,) + (1,) * (valid.ndim - 1))
            pixel_valid = valid[:, :, None] if series else valid[:, None]
            stored = _to_storage(data, np.broadcast_to(pixel_valid, data.shape), sensor, scenes[name].name)
            stored[~ok] = 0
            phys = np.moveaxis(sensor.transform.apply(data), 2 if series else 1, 0)
            stats[name].update(phys, np.broadcast_to(np.moveaxis(pixel_valid, 2 if series else 1, 0), phys.shape))
            for split, present_here in zip(splits, ok):
                if present_here:
                    present[name][split] = present[name].get(split, 0) + 1
            rows[name] += list(stored)
            rows[f"{name}.valid"] += list(valid.astype(np.uint8))
            rows[f"{name}.present"] += ok.tolist()
            if series:
                dates = [_date(d) for d in scenes[name].band_dates[::len(sensor.bands)]]
                rows[f"{name}.dates"] += [dates] * len(keep)
            else:
                rows[f"{name}.date"] += [_date(scenes[name].acquired)] * len(keep)
        if label is not None:
            ldata, lvalid = label.read(strip)
            lab = np.where(lvalid[0], ldata[0].astype(np.float64) - task.label.get("first_class", 0), -1)
            rows["label"] += list(windows(lab.astype(np.int16))[keep])
        result.chips += len(keep)
        for split in splits:
            result.by_split[split] = result.by_split.get(split, 0) + 1
        if len(rows["sample_id"]) >= task.rows_per_group:
            flush()
    flush()
    result.stats = {n: s.to_dict() for n, s in stats.items()}
    result.present = present
