"""Batch inference over whole scenes: Ray Data over windows, the model in an actor pool, stitched GeoTIFFs.

``infer(spec)``:

1. plans every scene on the driver (opens it, matches its bands to the model's by name, lists the
   windows: ``input_size`` squares overlapping by ``overlap``, the last flush with the far edge; see
   ``predictor.tile_starts``). A scene whose output already exists from the same model and settings is
   skipped (resume); one that cannot be opened or has the wrong bands is reported as failed;
2. streams the windows of all scenes through Ray Data: a read stage (tasks) reads each window with
   ``earthray.io`` and normalises it exactly as the online app does (``inputs.prepare``; non-finite
   pixels are missing, as in ingest), then ``map_batches`` with an actor pool runs the model
   (``ActorPoolStrategy``, a GPU per actor when the cluster has GPUs). The actors are not restarted:
   Ray Data passes them arguments in the object store, with which a restart is not reliable in Ray 2.60
   (ray#53727, ray#57733, and it says so on every run); a failed run is re-run and resumes by scene;
3. stitches on the driver: each window's output (class probabilities, or physical values) is added to a
   strip buffer with a Hann weight (``predictor.blend_weight``) and normalised by the summed weights;
   as soon as every window of a window row has arrived, the rows above the next window row are final
   and are written (classes ``uint8``, 255 where the input is invalid; or ``float32`` values, NaN there).

Memory is bounded by the windows in flight: Ray Data streams (its backpressure bounds the blocks in the
object store), the actors hold one batch, and the driver holds, per scene being written, a strip of
about ``input_size + stride`` rows of the scene's width (K float32 channels + weights), never the scene.
Windows arrive in order (``preserve_order``), so the blending sums in a fixed order: runs are repeatable.

Outputs per scene (in ``output``): ``<stem>.tif`` (COG by default) on the scene's CRS and transform (a
class map carries a colour table and its class names), optionally ``<stem>.probabilities.tif`` and
``<stem>.chips.parquet``: GeoParquet, one row per window with its footprint polygon (``geometry``, WKB, in
the scene's CRS, recorded as PROJJSON), the scene's acquisition ``date``, its position and centroid
(lon/lat) and, with ``embeddings``, the encoder's pooled features, so a region's embeddings can be
searched or clustered; for scene-level classification models this table, with class scores, is the
output. It is streamed, a row group every ``CHIP_ROWS`` windows. Every file is written under a
temporary name and renamed when complete, the class GeoTIFF last, so an existing ``<stem>.tif``
carrying this run's fingerprint means the scene is done.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from earthray.compat import map_batches_without_restarts
from earthray.config import ConfigError
from earthray.io.write import GeoParquetWriter, RasterWriter, footprint_wkb
from earthray.serve.inputs import (
    NODATA_CLASS,
    SCENE,
    ModelInfo,
    RequestError,
    blend_weight,
    pixel_valid,
    prepare,
    tile_starts,
)
from earthray.serve.spec import InferSpec, load_infer_spec

__all__ = ["InferResult", "InferSpec", "SceneResult", "infer", "load_infer_spec"]

FINGERPRINT_TAG = "EARTHRAY_INFER"
CHIP_ROWS = 256
"""Chip rows per GeoParquet row group: the driver holds at most this many per scene."""


@dataclass
class SceneResult:
    scene: str
    status: str
    """done, skipped (done before) or failed"""
    output: str | None = None
    windows: int = 0
    reason: str | None = None


@dataclass
class InferResult:
    scenes: list[SceneResult] = field(default_factory=list)
    windows: int = 0
    seconds: float = 0.0


@dataclass
class _Plan:
    index: int
    name: str
    source: str | list[str]
    order: list[int]
    sensors: list[str]
    """The model's sensors this scene carries (a multi-sensor model runs on any of them)."""
    grid: Any
    rows: list[int]
    cols: list[int]
    stem: str
    acquired: Any = None
    """The scene's acquisition time (a datetime), when its files or tags tell it."""


# ---------------------------------------------------------------------------------------------- planning


def _expand(entries: list[str | list[str]]) -> list[str | list[str]]:
    out: list[str | list[str]] = []
    for e in entries:
        if isinstance(e, list):
            out.append(e)
        elif glob.has_magic(e):
            found = sorted(glob.glob(e))
            if not found:
                raise ConfigError(f"scenes: {e!r} matches no file")
            out += found
        else:
            out.append(e)
    return out


def _resolve_model(spec: InferSpec) -> tuple[str, ModelInfo, str]:
    """The model pinned (an alias to its version) and verified, its contract, and a fingerprint of its weights."""
    from earthray import registry
    from earthray.bundle import check_bundle, local_bundle

    source = spec.model
    try:
        if registry.is_registry_uri(source):
            name, version = registry.resolve(source, spec.tracking_uri)
            source = f"{registry.SCHEME}{name}/{version}"
        meta = check_bundle(local_bundle(source, spec.tracking_uri))  # a broken bundle: one line, here
        info = ModelInfo.from_meta("model", source, meta)
    except (LookupError, ValueError, OSError) as e:
        raise ConfigError(f"model {spec.model}: {e}") from None
    weights = {k: v["sha256"] for k, v in meta["weights"].items()}
    return source, info, json.dumps(weights, sort_keys=True)


READ_TASK_BYTES = 16 * 2**20
BAND_ROWS = 4
"""Window rows a read task's windows span (the stitcher then holds about this many rows, plus one window)."""


def windows_per_read(info: ModelInfo) -> int:
    """Windows per read task when the spec leaves it open: about ``READ_TASK_BYTES`` of prepared input.

    A read task costs Ray some milliseconds whatever it holds; at 32 windows of 6x32x32 that overhead
    capped batch inference at about 550 windows/s, at 128 it ran at about 3400 (benchmarks/batch_infer.py,
    16x scene, 2 CPUs). The upper bound keeps reads and the model overlapping on small scenes."""
    per_window = sum(len(s.bands) * 4 + 1 for s in info.sensors) * info.input_size ** 2
    return max(8, min(256, READ_TASK_BYTES // per_window))


def _read_order(plan: _Plan, per_read: int) -> list[tuple[int, int]]:
    """The windows as read tasks get them: blocks of ``BAND_ROWS`` rows by ``per_read / BAND_ROWS`` columns.

    A read task opens the scene afresh, so every compressed tile its windows touch is decoded again; in
    row-major order a task's windows lie in one strip across the scene, and the number of tasks decoding
    each tile grows with the scene's width. Square-ish blocks keep it constant (measured in one process:
    read tasks 13 % faster on a 16x scene, 8 % on 1x; the task size in ``windows_per_read`` matters more)."""
    width = max(1, per_read // BAND_ROWS)
    return [(r, c) for b in range(0, len(plan.rows), BAND_ROWS) for k in range(0, len(plan.cols), width)
            for r in plan.rows[b:b + BAND_ROWS] for c in plan.cols[k:k + width]]


def _fingerprint(spec: InferSpec, weights: str, order: list[int]) -> str:
    keys = {"weights": weights, "overlap": spec.overlap, "probabilities": spec.probabilities,
            "embeddings": spec.embeddings, "bands": order}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _outputs(spec: InferSpec, info: ModelInfo, stem: str) -> dict[str, Path]:
    out = Path(spec.output)
    files = {}
    if info.task not in SCENE:
        files["main"] = out / f"{stem}.tif"
        if spec.probabilities and info.task == "segmentation":
            files["probabilities"] = out / f"{stem}.probabilities.tif"
    if spec.embeddings or info.task in SCENE:
        files["chips"] = out / f"{stem}.chips.parquet"
    return files


def _done_before(files: dict[str, Path], fingerprint: str) -> bool | None:
    """True: finished with this fingerprint; False: something else is there; None: nothing there."""
    import pyarrow.parquet as pq
    import rasterio

    marker = files.get("main") or files["chips"]
    if not marker.exists():
        return None
    try:
        if marker.suffix == ".tif":
            with rasterio.open(marker) as ds:
                found = ds.tags().get(FINGERPRINT_TAG)
        else:
            found = (pq.read_schema(marker).metadata or {}).get(FINGERPRINT_TAG.encode(), b"").decode()
    except Exception:  # unreadable: not ours to trust
        return False
    return found == fingerprint and all(p.exists() for p in files.values())


def _plan(spec: InferSpec, info: ModelInfo, weights: str) -> tuple[list[_Plan], list[SceneResult], dict[int, str]]:
    from earthray.io import RasterError, open_scene

    plans, results, prints = [], [], {}
    stems: dict[str, str] = {}
    size = info.input_size
    for i, source in enumerate(_expand(spec.scenes)):
        name = source[0] if isinstance(source, list) else source
        stem = Path(name).name.split(".")[0]
        if stem in stems:
            results.append(SceneResult(name, "failed", reason=f"output name {stem} collides with {stems[stem]}"))
            continue
        stems[stem] = name
        try:
            with open_scene(source, nodata=info.sensors[0].nodata) as scene:
                grid, count, names, acquired = scene.grid, scene.count, scene.band_names, scene.acquired
            if spec.bands and len(spec.bands) != count:
                raise RequestError(f"the spec names {len(spec.bands)} bands ({', '.join(spec.bands)}); the scene "
                                   f"has {count}")
            carried, order = info.select(spec.bands or names, count)
            if grid.height < size or grid.width < size:
                raise RequestError(f"{grid.width}x{grid.height} is smaller than the model's input "
                                   f"{size}x{size}")
        except (RasterError, RequestError) as e:
            results.append(SceneResult(name, "failed", reason=str(e)))
            continue
        files = _outputs(spec, info, stem)
        fp = _fingerprint(spec, weights, order)
        done = _done_before(files, fp)
        if done:
            results.append(SceneResult(name, "skipped", str(next(iter(files.values())))))
            continue
        if done is False and not spec.overwrite:
            results.append(SceneResult(name, "failed", reason=f"{next(iter(files.values()))} exists from another "
                                       "model or other settings (overwrite: true replaces it)"))
            continue
        prints[i] = fp
        plans.append(_Plan(i, name, source, order, [s.name for s in carried.sensors], grid,
                           tile_starts(grid.height, size, spec.overlap), tile_starts(grid.width, size, spec.overlap),
                           stem, acquired))
    return plans, results, prints


# ---------------------------------------------------------------------------------------------- Ray Data stages


def read_windows(batch: dict[str, np.ndarray], scenes: dict[int, dict], info: ModelInfo) -> dict[str, np.ndarray]:
    """Read and normalise windows (a Ray Data task); a read error marks the window instead of failing the job."""
    from rasterio.windows import Window

    from earthray.io import RasterError, open_scene

    size = info.input_size
    n = len(batch["scene"])
    keys = [s.name for s in info.sensors]
    out: dict[str, Any] = {k: np.zeros((n, len(s.bands), size, size), np.float32) for k, s in zip(keys, info.sensors)}
    out |= {f"{k}.valid": np.zeros((n, size, size), bool) for k in keys}
    out |= {f"{k}.present": np.zeros(n, bool) for k in keys}
    errors = [""] * n
    opened: dict[int, Any] = {}
    carried = {i: info.only(scene["sensors"]) for i, scene in scenes.items()}
    try:
        for j in range(n):
            i = int(batch["scene"][j])
            try:
                if i not in opened:
                    opened[i] = open_scene(scenes[i]["source"], nodata=carried[i].sensors[0].nodata)
                data, valid = opened[i].read(Window(int(batch["col"][j]), int(batch["row"][j]), size, size))
                order = scenes[i]["order"]
                image = prepare(carried[i], data[order], valid[order], None, nan_is_nodata=True, require_valid=False)
            except (RasterError, RequestError) as e:
                errors[j] = f"window at row {int(batch['row'][j])}, column {int(batch['col'][j])}: {e}"
                continue
            for k, v in image.items():
                out[k][j] = v
            for s in carried[i].sensors:
                out[f"{s.name}.present"][j] = True
    finally:
        for scene in opened.values():
            scene.close()
    return {"scene": batch["scene"], "row": batch["row"], "col": batch["col"], "error": np.array(errors, object),
            **out}


class WindowPredictor:
    """The model in a Ray Data actor: prepared windows -> outputs (and embeddings)."""

    def __init__(self, source: str, tracking_uri: str | None, embeddings: bool):
        from earthray.serve.predictor import Predictor  # here: the read tasks import this module, not torch

        self.predictor = Predictor.load("model", source, tracking_uri, device="auto")
        self.embeddings = embeddings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        info = self.predictor.info
        keys = [s.name for s in info.sensors]
        flags = [f"{k}.{f}" for k in keys for f in ("valid", "present")]
        valid = pixel_valid(info, {f: batch[f] for f in flags})
        run = np.flatnonzero((batch["error"] == "") & valid.any(axis=(1, 2)))
        n, size, k = len(batch["scene"]), info.input_size, len(info.outputs)
        shape = (n, k) if info.task in SCENE else (n, k, size, size)
        out = np.zeros(shape, np.float32)
        emb = None
        if len(run):
            sub = {key: batch[key][run] for key in keys + flags}
            o, e = self.predictor.forward(sub, embed=self.embeddings)
            out[run] = o
            if e is not None:
                emb = np.zeros((n, e.shape[1]), np.float32)
                emb[run] = e
        result = {"scene": batch["scene"], "row": batch["row"], "col": batch["col"], "error": batch["error"],
                  "valid": valid, "predicted": np.isin(np.arange(n), run), "out": out}
        if self.embeddings:
            result["embedding"] = emb if emb is not None else np.zeros((n, 1), np.float32)
        return result


# ---------------------------------------------------------------------------------------------- stitching


class _Stitcher:
    """One scene's outputs, written strip by strip as window rows complete."""

    def __init__(self, plan: _Plan, info: ModelInfo, spec: InferSpec, fingerprint: str):
        self.plan, self.info, self.spec = plan, info, spec
        self.files = _outputs(spec, info, plan.stem)
        self.size = info.input_size
        self.weight = blend_weight(self.size)
        self.pending = {r: len(plan.cols) for r in plan.rows}
        self.next_row = 0  # index into plan.rows of the first window row still incomplete
        self.base = 0      # first scene row not yet written
        g = plan.grid
        k = len(info.outputs)
        self.acc = np.zeros((k, 0, g.width), np.float32)
        self.wsum = np.zeros((0, g.width), np.float32)
        self.valid = np.zeros((0, g.width), bool)
        self.windows = 0
        tags = {FINGERPRINT_TAG: fingerprint, "model": info.source, "task": info.task}
        self.writers = {}
        try:
            if "main" in self.files:
                if info.task == "segmentation":
                    self.writers["main"] = RasterWriter(self.files["main"], g, 1, "uint8", NODATA_CLASS, tags,
                                                        ["class"], cog=spec.cog, classes=info.classes)
                else:
                    self.writers["main"] = RasterWriter(self.files["main"], g, k, "float32", float("nan"), tags,
                                                        info.outputs, cog=spec.cog)
            if "probabilities" in self.files:
                self.writers["probabilities"] = RasterWriter(self.files["probabilities"], g, k, "float32",
                                                             float("nan"), tags, info.outputs, cog=spec.cog)
            if "chips" in self.files:
                self.writers["chips"] = GeoParquetWriter(self.files["chips"], self._chip_schema(), g.crs, {
                    FINGERPRINT_TAG: fingerprint, "crs": g.crs_string(), "window": str(self.size),
                    "classes": json.dumps(info.classes)})
        except BaseException:
            self.abort()
            raise
        self.chips: list[dict] = []
        """Chip rows not yet written (a row group is written every ``CHIP_ROWS``)."""

    @property
    def complete(self) -> bool:
        return self.next_row == len(self.plan.rows)

    def add(self, row: int, col: int, out: np.ndarray, valid: np.ndarray, predicted: bool,
            embedding: np.ndarray | None) -> None:
        self.windows += 1
        if "chips" in self.files:
            self._chip(row, col, out, valid, predicted, embedding)
        if "main" in self.files:
            s = self.size
            top = row + s - self.base
            if top > self.wsum.shape[0]:
                grow = top - self.wsum.shape[0]
                self.acc = np.concatenate([self.acc, np.zeros((self.acc.shape[0], grow, self.acc.shape[2]),
                                                              np.float32)], axis=1)
                self.wsum = np.concatenate([self.wsum, np.zeros((grow, self.wsum.shape[1]), np.float32)])
                self.valid = np.concatenate([self.valid, np.zeros((grow, self.valid.shape[1]), bool)])
            r = row - self.base
            self.valid[r:r + s, col:col + s] |= valid
            if predicted:
                self.acc[:, r:r + s, col:col + s] += out * self.weight
                self.wsum[r:r + s, col:col + s] += self.weight
        self.pending[row] -= 1
        rows = self.plan.rows
        while self.next_row < len(rows) and self.pending[rows[self.next_row]] == 0:
            self.next_row += 1
        if "main" in self.files:
            limit = rows[self.next_row] if self.next_row < len(rows) else self.plan.grid.height
            if limit > self.base:
                self._flush(limit)

    def _flush(self, limit: int) -> None:
        from rasterio.windows import Window

        n = limit - self.base
        acc, wsum, valid = self.acc[:, :n], self.wsum[:n], self.valid[:n]
        ok = valid & (wsum > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = acc / wsum
        window = Window(0, self.base, self.plan.grid.width, n)
        if self.info.task == "segmentation":
            labels = out.argmax(0).astype(np.uint8)
            labels[~ok] = NODATA_CLASS
            self.writers["main"].write(window, labels)
        else:
            self.writers["main"].write(window, np.where(ok, out, np.nan).astype(np.float32))
        if "probabilities" in self.writers:
            self.writers["probabilities"].write(window, np.where(ok, out, np.nan).astype(np.float32))
        self.acc, self.wsum, self.valid = self.acc[:, n:].copy(), self.wsum[n:].copy(), self.valid[n:].copy()
        self.base = limit

    def _chip_schema(self):
        import pyarrow as pa

        fields = [("row", pa.int32()), ("col", pa.int32()), ("x", pa.float64()), ("y", pa.float64()),
                  ("lon", pa.float64()), ("lat", pa.float64()), ("valid_fraction", pa.float32()),
                  ("date", pa.timestamp("us", tz="UTC"))]
        if self.spec.embeddings:
            fields.append(("embedding", pa.list_(pa.float32())))
        if self.info.task in SCENE:
            fields += [("scores", pa.list_(pa.float32())), ("class", pa.string())]
        return pa.schema(fields + [("geometry", pa.binary())])

    def _chip(self, row, col, out, valid, predicted, embedding) -> None:
        g, s = self.plan.grid, self.size
        x, y = g.transform * (col + s / 2, row + s / 2)
        entry = {"row": row, "col": col, "x": float(x), "y": float(y), "valid_fraction": float(valid.mean()),
                 "geometry": footprint_wkb(g.transform, col, row, s, s)}
        if embedding is not None:
            entry["embedding"] = embedding.astype(np.float32) if predicted else None
        if self.info.task in SCENE:
            entry["scores"] = out.astype(np.float32) if predicted else None
            entry["class"] = self.info.classes[int(out.argmax())] if predicted else None
        self.chips.append(entry)
        if len(self.chips) >= CHIP_ROWS:
            self._write_chips()

    def finish(self) -> SceneResult:
        try:
            if "chips" in self.files:
                self._write_chips()
            for key in ("chips", "probabilities", "main"):  # the class GeoTIFF last: its presence means done
                if key in self.writers:
                    self.writers.pop(key).close(ok=True)
        except BaseException:
            self.abort()
            raise
        return SceneResult(self.plan.name, "done", str(next(iter(self.files.values()))), self.windows)

    def _write_chips(self) -> None:
        """The buffered chip rows as one row group: centroids also in lon/lat, the scene's date on each."""
        from rasterio.warp import transform as warp_transform

        if not self.chips:
            return
        crs, n = self.plan.grid.crs, len(self.chips)
        xs, ys = [c["x"] for c in self.chips], [c["y"] for c in self.chips]
        lons, lats = warp_transform(crs, "EPSG:4326", xs, ys) if crs is not None else ([math.nan] * n,) * 2
        acquired = self.plan.acquired
        if acquired is not None and acquired.tzinfo is None:
            acquired = acquired.replace(tzinfo=dt.UTC)  # dates in file names and TIFF tags carry no zone
        columns = {k: [c.get(k) for c in self.chips] for k in self.writers["chips"].schema.names}
        self.writers["chips"].write(columns | {"lon": list(lons), "lat": list(lats), "date": [acquired] * n})
        self.chips = []

    def abort(self) -> None:
        for w in self.writers.values():
            w.close(ok=False)
        self.writers = {}


# ---------------------------------------------------------------------------------------------- the job


def infer(spec: InferSpec, on_scene: Callable[[SceneResult], None] | None = None,
          on_windows: Callable[[int, int], None] | None = None) -> InferResult:
    """Run batch inference; finished scenes are skipped, a scene that fails is reported and the rest go on."""
    import ray
    import ray.data

    from earthray.runtime import ensure_ray

    start = time.monotonic()
    source, info, weights = _resolve_model(spec)
    plans, results, prints = _plan(spec, info, weights)
    for r in results:
        if on_scene:
            on_scene(r)
    total = sum(len(p.rows) * len(p.cols) for p in plans)
    result = InferResult(list(results))
    if not plans:
        result.seconds = time.monotonic() - start
        return result

    ensure_ray(spec.address)
    gpus = spec.gpus_per_actor
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    per_read = spec.windows_per_read or windows_per_read(info)
    items = [{"scene": p.index, "row": r, "col": c} for p in plans for r, c in _read_order(p, per_read)]
    scenes = {p.index: {"source": p.source, "order": p.order, "sensors": p.sensors} for p in plans}
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // per_read)))
    ds.context.execution_options.preserve_order = True  # the dataset's own copy of the context
    ds = ds.map_batches(read_windows, fn_kwargs={"scenes": scenes, "info": info}, batch_size=per_read,
                        num_cpus=spec.read_cpus, batch_format="numpy")
    ds = map_batches_without_restarts(  # see the module doc: a re-run resumes by scene
        ds, WindowPredictor, fn_constructor_kwargs={"source": source, "tracking_uri": spec.tracking_uri,
                                                    "embeddings": spec.embeddings},
        compute=ray.data.ActorPoolStrategy(size=spec.actors), batch_size=spec.batch_size,
        num_cpus=spec.actor_cpus, num_gpus=gpus, batch_format="numpy")

    by_index = {p.index: p for p in plans}
    open_: dict[int, _Stitcher] = {}
    failed: set[int] = set()
    done_windows = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            for j in range(len(batch["scene"])):
                i = int(batch["scene"][j])
                done_windows += 1
                if i in failed:
                    continue
                error = batch["error"][j]
                if error:
                    failed.add(i)
                    st = open_.pop(i, None)
                    if st:
                        st.abort()
                    _report(result, on_scene, SceneResult(by_index[i].name, "failed", reason=str(error)))
                    continue
                st = open_.get(i) or open_.setdefault(i, _Stitcher(by_index[i], info, spec, prints[i]))
                st.add(int(batch["row"][j]), int(batch["col"][j]), batch["out"][j], batch["valid"][j],
                       bool(batch["predicted"][j]), batch["embedding"][j] if spec.embeddings else None)
                if st.complete:
                    _report(result, on_scene, open_.pop(i).finish())
            if on_windows:
                on_windows(done_windows, total)
    finally:
        for st in open_.values():
            st.abort()
    result.windows = done_windows
    result.seconds = time.monotonic() - start
    return result


def _report(result: InferResult, on_scene, r: SceneResult) -> None:
    result.scenes.append(r)
    if on_scene:
        on_scene(r)
