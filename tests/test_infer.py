"""Batch inference over whole real scenes: Ray Data windows, the model in an actor pool, stitched GeoTIFFs.

A six-band GeoTIFF built from the real Landsat 7 sample (and a band stack of its one-band files), a
fine-tuned bundle (random weights: answers are compared with direct ``TaskModel.predict`` calls on the same
windows, blended here the documented way, independently of earthray's code). Also: the class map's colour
table and class names, its PNG quicklook's legend, per-window embeddings as streamed GeoParquet (footprint,
CRS, date), resume skips a finished scene, a corrupt scene is reported while the others finish, the CLI and
the spec's errors (a tampered bundle is one line).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.crs import CRS
from rasterio.windows import Window

from earthray.bundle import load_bundle, save_bundle
from earthray.config import ConfigError
from earthray.io import Grid, open_scene, quicklook, write_raster
from earthray.io.write import CLASS_COLOURS
from earthray.recipes import create_recipe
from earthray.sensors import get_sensor
from earthray.serve.infer import CHIP_ROWS
from earthray.tasks import TaskModel, TaskSpec

ROOT = Path(__file__).resolve().parents[1]
L7 = ["B1", "B2", "B3", "B4", "B5", "B7"]
FILES = [str(ROOT / f"data/sample/landsat7_nc/lsat7_2000_{b}.tif") for b in (10, 20, 30, 40, 50, 70)]
CLASSES = [f"class_{i}" for i in range(1, 8)]
SIZE = 32
ACQUIRED = dt.datetime(2000, 5, 4, 15, 30, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory) -> Path:
    """The real scene as one six-band float32 GeoTIFF with named bands and nodata -99999."""
    with open_scene(FILES) as scene:
        data, valid = scene.read()
        grid = scene.grid
    path = tmp_path_factory.mktemp("scenes") / "l7_2000.tif"
    return write_raster(path, np.where(valid, data, np.float32(-99999)), grid, nodata=-99999, band_names=L7,
                        tags={"ACQUISITIONDATETIME": ACQUIRED.isoformat()})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    sensor = get_sensor("landsat7_etm").select(L7)
    model = TaskModel(create_recipe("ofa", [sensor], "tiny"), TaskSpec(task="segmentation", classes=CLASSES), SIZE)
    norm = {"landsat7_etm": {"mean": [75.0, 60.0, 55.0, 60.0, 70.0, 45.0], "std": [20.0, 20.0, 25.0, 25.0, 30.0, 25.0]}}
    return save_bundle(tmp_path_factory.mktemp("bundle") / "seg", model.encoder, recipe="ofa", preset="tiny",
                       config=model.encoder.config, sensors=[sensor], normalisation=norm, input_size=SIZE,
                       head=model.head, head_spec=model.head_spec, classes=model.spec.classes)


def starts(n: int) -> list[int]:
    """The documented window rule: every 24 pixels (32, overlap 0.25), the last flush with the edge."""
    s = list(range(0, n - SIZE + 1, 24))
    return s if s[-1] == n - SIZE else [*s, n - SIZE]


def expected_probabilities(bundle: Path, scene_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Direct model calls on every window, Hann-blended in the same window order; the pixel validity."""
    b = load_bundle(bundle)
    model = TaskModel.from_bundle(b).eval()
    stats = b.input_stats()["landsat7_etm"]
    mean, std = (np.array(stats[k], np.float32)[:, None, None] for k in ("mean", "std"))
    with rasterio.open(scene_file) as ds:
        raw = ds.read()
    ok = (raw != -99999).all(axis=0)
    x = np.where(ok, (raw - mean) / std, 0).astype(np.float32)
    h, w = ok.shape
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(SIZE) + 0.5) / SIZE)
    weight = np.outer(hann, hann).astype(np.float32)
    acc, wsum = np.zeros((len(CLASSES), h, w), np.float32), np.zeros((h, w), np.float32)
    windows = [(r, c) for r in starts(h) for c in starts(w) if ok[r:r + SIZE, c:c + SIZE].any()]
    with torch.no_grad():
        for i in range(0, len(windows), 64):
            chunk = windows[i:i + 64]
            xs = torch.from_numpy(np.stack([x[:, r:r + SIZE, c:c + SIZE] for r, c in chunk]))
            vs = torch.from_numpy(np.stack([ok[r:r + SIZE, c:c + SIZE] for r, c in chunk]))
            probs = model.predict({"landsat7_etm": xs, "landsat7_etm.valid": vs}).softmax(1).numpy()
            for (r, c), p in zip(chunk, probs):
                acc[:, r:r + SIZE, c:c + SIZE] += p * weight
                wsum[r:r + SIZE, c:c + SIZE] += weight
    with np.errstate(invalid="ignore"):
        return acc / wsum, ok


def spec_for(tmp_path: Path, bundle: Path, scenes: list, **kw):
    from earthray.serve.infer import InferSpec

    return InferSpec(model=str(bundle), scenes=scenes, output=str(tmp_path / "out"), batch_size=16,
                     actor_cpus=0.5, read_cpus=0.25, **kw)


def test_stitched_scene_matches_direct_model_calls(ray_session, bundle, scene_file, tmp_path):
    from earthray.serve.infer import infer

    spec = spec_for(tmp_path, bundle, [str(scene_file)], probabilities=True, embeddings=True, cog=True)
    seen = []
    result = infer(spec, on_scene=seen.append)
    [done] = result.scenes
    assert done.status == "done" and seen == [done]
    with rasterio.open(scene_file) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
    n_windows = len(starts(shape[0])) * len(starts(shape[1]))
    assert done.windows == result.windows == n_windows
    out = Path(spec.output)
    probs, ok = expected_probabilities(bundle, scene_file)
    with rasterio.open(out / "l7_2000.tif") as ds:
        assert ds.crs == crs and ds.transform == transform and ds.shape == shape
        assert ds.dtypes == ("uint8",) and ds.nodata == 255 and json.loads(ds.tags()["classes"]) == CLASSES
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        colours = ds.colormap(1)  # the colour table survives the COG rewrite
        labels = ds.read(1)
    assert [colours[i][:3] for i in range(len(CLASSES))] == [tuple(c) for c in CLASS_COLOURS[:len(CLASSES)]]
    categories = ElementTree.parse(out / "l7_2000.tif.aux.xml").findall(".//CategoryNames/Category")
    assert [c.text for c in categories] == CLASSES  # what GDAL and QGIS show as the classes' names
    with rasterio.open(out / "l7_2000.probabilities.tif") as ds:
        assert ds.count == len(CLASSES) and ds.transform == transform and ds.descriptions == tuple(CLASSES)
        got = ds.read()
    assert (labels[~ok] == 255).all() and np.isnan(got[:, ~ok]).all()
    np.testing.assert_allclose(got[:, ok], probs[:, ok], atol=2e-5)
    top2 = np.sort(probs, axis=0)[-2:]
    sure = ok & (top2[1] - top2[0] > 1e-4)
    assert sure.sum() > 0.99 * ok.sum()
    np.testing.assert_array_equal(labels[sure], probs.argmax(0)[sure])

    parquet = pq.ParquetFile(out / "l7_2000.chips.parquet")
    assert parquet.metadata.num_row_groups == -(-n_windows // CHIP_ROWS)  # streamed, a row group at a time
    geo = json.loads(parquet.schema_arrow.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert CRS.from_user_input(json.dumps(geo["columns"]["geometry"]["crs"])) == crs  # PROJJSON of the scene's
    chips = parquet.read().to_pandas()
    assert len(chips) == n_windows and set(chips.columns) >= {"row", "col", "lon", "lat", "embedding", "date"}
    assert (chips.date == pd.Timestamp(ACQUIRED)).all()
    first = chips[chips.valid_fraction > 0].iloc[0]
    dim = json.loads((bundle / "bundle.json").read_text())["head_spec"]["in_dims"][-1]
    assert len(first.embedding) == dim and np.isfinite(first.embedding).all()
    assert chips.lon.between(-80, -77).all() and chips.lat.between(35, 36.5).all()  # the scene is in North Carolina
    for chip in chips.sample(5, random_state=0).itertuples():  # each geometry is its window's footprint
        ring = polygon_ring(chip.geometry)
        corners = [transform * (chip.col + dc, chip.row + dr) for dc, dr in ((0, 0), (SIZE, 0), (SIZE, SIZE), (0, SIZE))]
        np.testing.assert_allclose(ring, [*corners, corners[0]])

    png = quicklook(out / "l7_2000.tif", tmp_path / "map.png")
    with Image.open(png) as image:
        legend = np.asarray(image.convert("RGB"))[:, shape[1]:]
    assert legend.shape[1] > 20  # a legend column beside the map: a swatch of every class's colour
    swatches = {tuple(p) for p in legend.reshape(-1, 3)}
    assert {tuple(int(v) for v in c) for c in CLASS_COLOURS[:len(CLASSES)]} <= swatches


def polygon_ring(wkb: bytes) -> list[tuple[float, float]]:
    """The exterior ring of a little-endian WKB polygon with one ring."""
    order, kind, rings, points = struct.unpack_from("<BIII", wkb)
    assert (order, kind, rings) == (1, 3, 1)
    return [struct.unpack_from("<dd", wkb, 13 + 16 * i) for i in range(points)]


def crop(path: str, folder: Path, rows: slice, cols: slice) -> str:
    """A part of a real raster, with its georeferencing."""
    win = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
    with rasterio.open(path) as src:
        profile = src.profile | {"width": win.width, "height": win.height, "transform": src.window_transform(win),
                                 "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        out = folder / Path(path).name
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(src.read(window=win))
            dst.descriptions = src.descriptions
    return str(out)


def test_resume_skips_finished_scenes_and_reports_a_corrupt_one(ray_session, bundle, scene_file, tmp_path):
    from earthray.serve.infer import infer

    part = tmp_path / "part"
    part.mkdir()
    rows, cols = slice(100, 180), slice(60, 160)  # a part of the real scene keeps this test quick
    scene = crop(str(scene_file), part, rows, cols)
    stack = [crop(f, part, rows, cols) for f in FILES]
    with rasterio.open(scene_file) as src:
        win = Window(60, 100, 200, 160)
        whole = write_raster(tmp_path / "whole.tif", src.read(window=win),
                             Grid(src.crs, src.window_transform(win), 200, 160), nodata=-99999)
    truncated = tmp_path / "truncated.tif"  # opens (the header is intact), but its last rows are gone
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a tiff at all")
    spec = spec_for(tmp_path, bundle, [str(truncated), scene, str(garbage), stack], bands=L7, cog=False)
    first = {Path(r.scene).name: r for r in infer(spec).scenes}
    assert first["l7_2000.tif"].status == "done"
    assert first["lsat7_2000_10.tif"].status == "done"  # the same scene as a stack of one-band files
    assert first["garbage.tif"].status == "failed" and "cannot open" in first["garbage.tif"].reason
    assert first["truncated.tif"].status == "failed" and "read failed" in first["truncated.tif"].reason
    out = Path(spec.output)
    assert sorted(p.name for p in out.iterdir()) == ["l7_2000.tif", "l7_2000.tif.aux.xml", "lsat7_2000_10.tif",
                                                     "lsat7_2000_10.tif.aux.xml"]  # maps + class names, no partials
    with rasterio.open(out / "l7_2000.tif") as a, rasterio.open(out / "lsat7_2000_10.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())
    stamp = (out / "l7_2000.tif").stat().st_mtime_ns

    second = {Path(r.scene).name: r for r in infer(spec).scenes}
    assert second["l7_2000.tif"].status == "skipped" and second["lsat7_2000_10.tif"].status == "skipped"
    assert second["truncated.tif"].status == "failed"
    assert (out / "l7_2000.tif").stat().st_mtime_ns == stamp

    other = spec.model_copy(update={"overlap": 0.5})  # other settings: not taken as done, not overwritten
    third = {Path(r.scene).name: r for r in infer(other).scenes}
    assert third["l7_2000.tif"].status == "failed" and "overwrite" in third["l7_2000.tif"].reason
    assert (out / "l7_2000.tif").stat().st_mtime_ns == stamp


@pytest.mark.timeout(240)  # two `earthray infer` processes
def test_cli_and_spec_errors(bundle, scene_file, tmp_path):
    from earthray.serve.infer import infer, load_infer_spec

    spec = tmp_path / "infer.yaml"
    spec.write_text(f"model: {bundle}\nscenes: [{scene_file}]\noutput: out\nbatch_size: 0\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_infer_spec(spec)
    earthray = Path(sys.executable).parent / "earthray"
    run = subprocess.run([str(earthray), "infer", str(spec)], capture_output=True, text=True)
    assert run.returncode == 2 and "batch_size" in run.stderr
    spec.write_text(f"model: nope\nscenes: ['{tmp_path}/*.none']\noutput: out\n")
    with pytest.raises(ConfigError, match="not a bundle"):
        infer(load_infer_spec(spec))
    spec.write_text(f"model: {bundle}\nscenes: ['{tmp_path}/*.none']\noutput: out\n")
    with pytest.raises(ConfigError, match="matches no file"):
        infer(load_infer_spec(spec))
    tampered = Path(shutil.copytree(bundle, tmp_path / "tampered"))
    weights = tampered / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    spec.write_text(f"model: {tampered}\nscenes: [{scene_file}]\noutput: out\n")
    run = subprocess.run([str(earthray), "infer", str(spec)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "model.safetensors sha256 mismatch" in " ".join(run.stderr.split())
    assert "Traceback" not in run.stderr and run.stderr.strip().startswith("error:"), run.stderr  # one (wrapped) line
    assert run.stderr.count("error:") == 1, run.stderr
    # bundle.json edited (its weights still pass their sha256s): the driver rebuilds the recipe on the meta
    # device and compares shapes, so this is one line too, not a failure in every inference actor
    edited = Path(shutil.copytree(bundle, tmp_path / "edited"))
    meta = json.loads((edited / "bundle.json").read_text())
    meta["config"]["embed_dim"] *= 2
    (edited / "bundle.json").write_text(json.dumps(meta))
    spec.write_text(f"model: {edited}\nscenes: [{scene_file}]\noutput: out\n")
    with pytest.raises(ConfigError, match=r"model.safetensors does not fit recipe .*other shape"):
        infer(load_infer_spec(spec))
    shipped = load_infer_spec(ROOT / "jobs" / "infer-landcover.yaml")
    assert shipped.model == "models:/landcover@champion" and shipped.scenes[0][0].endswith("lsat7_2000_10.tif")
    assert shipped.output == str(ROOT / "work" / "inference" / "landcover")


def test_read_tasks_do_not_import_torch():
    """Ray Data's read tasks run ``read_windows`` from ``earthray.serve.infer``: importing torch with it would
    add about 480 MB to every read worker (benchmarks/batch_infer.py shows it per process)."""
    code = ("import sys, earthray.serve.infer\n"
            "sys.exit(' '.join(m for m in sys.modules if m.split('.')[0] == 'torch')[:200] or None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
