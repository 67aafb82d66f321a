from datetime import datetime

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.windows import Window

from earthray.io import Grid, RasterError, RasterWriter, open_scene, write_raster

S1 = "s1_camargue/S1A__IW___D_20170309T054356_VV_grd_mli_geo_norm_db.tif"
SERIES = "s1_camargue/S1_GRD_VV_France_Camargue_2017-01-01_2017-12-31"


def test_geotiff_window_nodata_and_date(sample_dir):
    with open_scene(str(sample_dir / S1)) as scene, rasterio.open(sample_dir / S1) as ds:
        assert scene.grid.crs.to_epsg() == 32631 and scene.count == 1 and scene.nodata == -99
        assert scene.acquired == datetime(2017, 3, 9, 5, 43, 56)
        win = Window(10, 20, 64, 48)
        data, valid = scene.read(win)
        direct = ds.read(window=win)
        np.testing.assert_array_equal(data, direct)
        np.testing.assert_array_equal(valid, direct != -99)
        assert 0 < valid.mean() <= 1


def test_envi_series_dates_from_band_names(sample_dir):
    with open_scene(str(sample_dir / SERIES)) as scene:
        assert scene.count == 160 and len(scene.band_dates) == 160
        assert scene.band_dates[0] == datetime(2017, 1, 1, 5, 52, 10)
        assert all(d.year == 2017 for d in scene.band_dates)
        assert scene.band_dates == sorted(scene.band_dates)
        data, valid = scene.read(Window(0, 0, 8, 8))
        assert data.shape == (160, 8, 8) and data.dtype == np.float32


def test_sentinel2_safe_bands_on_one_grid(sample_dir):
    safe = str(next((sample_dir / "s2_t55hfa").glob("*.zip")))
    with open_scene(safe) as scene:
        assert scene.band_names == ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12"]
        assert (scene.grid.width, scene.grid.height) == (240, 240)  # the 10 m (here 50 m) grid
        assert scene.acquired == datetime(2020, 10, 11, 0, 2, 49)  # PRODUCT_START_TIME in MTD_MSIL1C.xml
        data, valid = scene.read()
        assert data.shape == (12, 240, 240) and data.dtype == np.uint16
        b01 = next(p for p in scene.paths if p.endswith("_B01.jp2"))
        with rasterio.open(b01) as ds:  # the 60 m band, resampled 6x: same radiometry
            native = ds.read(1).astype(float)
        assert abs(data[0][valid[0]].mean() / native[native > 0].mean() - 1) < 0.03


def test_band_stack_equals_separate_files(sample_dir):
    files = [str(sample_dir / f"landsat8_parana/LC08_L1TP_224077_20200518_20200518_01_RT_{b}.TIF") for b in ("B2", "B3", "B4")]
    with open_scene(files, nodata=0) as scene:
        win = Window(100, 50, 32, 32)
        data, valid = scene.read(win)
        assert scene.acquired == datetime(2020, 5, 18)
        for i, f in enumerate(files):
            with rasterio.open(f) as ds:
                np.testing.assert_array_equal(data[i], ds.read(1, window=win))
        np.testing.assert_array_equal(valid, data != 0)


def test_reproject_onto_another_grid_matches_gdal_warp(sample_dir):
    rgb = open_scene(str(sample_dir / "rmnp_rgb_dem/rmnp-rgb.tif"))
    dem = open_scene(str(sample_dir / "rmnp_rgb_dem/rmnp-dem.tif"))
    with rgb, dem.reproject(rgb.grid, Resampling.nearest) as warped:
        assert warped.grid == rgb.grid
        data, valid = warped.read()
        with rasterio.open(sample_dir / "rmnp_rgb_dem/rmnp-dem.tif") as ds:
            expected = np.full((rgb.grid.height, rgb.grid.width), 65535, np.uint16)
            reproject(ds.read(1), expected, src_transform=ds.transform, src_crs=ds.crs, src_nodata=65535,
                      dst_transform=rgb.grid.transform, dst_crs=rgb.grid.crs, dst_nodata=65535,
                      resampling=Resampling.nearest)
        both = valid[0] & (expected != 65535)
        assert both.mean() > 0.3
        assert (data[0][both] == expected[both]).mean() > 0.99


def test_corrupt_and_missing_files_raise_clear_errors(tmp_path):
    bad = tmp_path / "not_a_raster.tif"
    bad.write_text("hello")
    with pytest.raises(RasterError, match="not_a_raster.tif: cannot open"):
        open_scene(str(bad))
    with pytest.raises(RasterError, match="missing.tif: cannot open"):
        open_scene(str(tmp_path / "missing.tif"))


@pytest.mark.parametrize("cog", [False, True])
def test_write_roundtrip_keeps_georeferencing(sample_dir, tmp_path, cog):
    with open_scene(str(sample_dir / S1)) as scene:
        data, _ = scene.read()
        out = write_raster(tmp_path / "out.tif", data, scene.grid, nodata=-99,
                           tags={"ACQUISITIONDATETIME": "2017-03-09T05:43:56"}, band_names=["VV"], cog=cog)
    with rasterio.open(out) as ds:
        assert ds.crs == scene.grid.crs and ds.transform == scene.grid.transform and ds.nodata == -99
        assert ds.tags()["ACQUISITIONDATETIME"] == "2017-03-09T05:43:56" and ds.descriptions == ("VV",)
        np.testing.assert_array_equal(ds.read(), data)
        if cog:
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    assert open_scene(str(out)).acquired == datetime(2017, 3, 9, 5, 43, 56)


def test_writer_streams_windows_and_leaves_nothing_on_failure(tmp_path):
    grid = Grid(rasterio.crs.CRS.from_epsg(32631), rasterio.transform.from_origin(600000, 4800000, 10, 10), 300, 260)
    with RasterWriter(tmp_path / "ok.tif", grid, 1, "uint8", nodata=0) as w:
        for r in range(0, 260, 100):
            h = min(100, 260 - r)
            w.write(Window(0, r, 300, h), np.full((h, 300), r // 100 + 1, np.uint8))
    with rasterio.open(tmp_path / "ok.tif") as ds:
        assert ds.read(1)[250, 0] == 3 and ds.block_shapes[0] == (256, 256)
    with pytest.raises(RuntimeError, match="model crashed"):
        with RasterWriter(tmp_path / "failed.tif", grid, 1, "uint8") as w:
            raise RuntimeError("model crashed")
    assert list(tmp_path.iterdir()) == [tmp_path / "ok.tif"]


def test_quicklook_draws_classes_and_nodata_at_bounded_size(tmp_path):
    from PIL import Image

    from earthray.io import quicklook
    from earthray.io.write import CLASS_COLOURS as PALETTE

    grid = Grid(rasterio.crs.CRS.from_epsg(32631), rasterio.transform.from_origin(600000, 4800000, 10, 10), 400, 200)
    labels = np.repeat(np.arange(4, dtype=np.uint8), 100)[None].repeat(200, axis=0)  # 4 vertical stripes
    labels[:50] = 255
    write_raster(tmp_path / "map.tif", labels[None], grid, nodata=255)
    png = np.asarray(Image.open(quicklook(tmp_path / "map.tif", tmp_path / "map.png", max_side=100)))
    assert png.shape[0] >= 50 and png.shape[1] > 100 and png.shape[2] == 3  # the map, then its legend
    assert (png[:12, :100] == 0).all()  # nodata rows are black
    for k in range(4):
        assert (png[30, k * 25 + 12] == PALETTE[k]).all()
        assert (png[:, 100:] == PALETTE[k]).all(axis=-1).any()  # the legend holds each class's swatch

    grid1 = Grid(grid.crs, grid.transform, 40, 20)
    ramp = np.linspace(-5, 5, 40, dtype=np.float32)[None].repeat(20, axis=0)
    grey = np.asarray(Image.open(quicklook(write_raster(tmp_path / "v.tif", ramp[None], grid1), tmp_path / "v.png")))
    assert grey.shape == (20, 40, 3) and grey[0, 0, 0] == 0 and grey[0, -1, 0] == 255
    assert (np.diff(grey[0, :, 0].astype(int)) >= 0).all()  # a monotone stretch
