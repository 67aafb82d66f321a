"""netCDF / Zarr datacubes (WorldCereal's real cubes) read as scenes, checked against independent reads."""

from __future__ import annotations

import ast
from datetime import datetime
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from earthray.io import RasterError, open_scene
from earthray.io.cube import open_cube

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "data/sample/worldcereal_flanders/00002806639B424A"
S2_10 = str(next(PATCH.glob("S2_L2A_10m_*.nc")))
S2_20 = str(next(PATCH.glob("S2_L2A_20m_*.nc")))
S1 = str(next(PATCH.glob("S1_GRD-*.nc")))
LABELS = str(next(PATCH.glob("OUTPUT_POLY-*.nc")))
MONTHLY = str(ROOT / "data/sample/worldcereal_monthly/worldcereal_preprocessed_inputs.nc")
CLEAR = [4, 5, 6, 7, 11]


def raw(path: str, variable: str) -> np.ndarray:
    with netCDF4.Dataset(path) as ds:
        var = ds[variable]
        var.set_auto_maskandscale(False)
        return np.asarray(var[...])


def dates(path: str) -> list[datetime]:
    with netCDF4.Dataset(path) as ds:
        t = ds["timestamp"]
        return [d.replace(microsecond=0) for d in netCDF4.num2date(t[:], t.units, only_use_cftime_datetimes=False)]


def attr_grid(path: str) -> tuple[Affine, int, int]:
    """The grid from the file's own ``bounds`` and ``resolution`` attributes (not its coordinates)."""
    with netCDF4.Dataset(path) as ds:
        left, bottom, right, top = ast.literal_eval(ds.getncattr("bounds"))
        res = float(ds.getncattr("resolution"))
    return Affine(res, 0, left, 0, -res, top), round((right - left) / res), round((top - bottom) / res)


def test_cube_values_are_cf_decoded_with_crs_transform_and_dates():
    with open_scene(S2_10, variables=["B02", "B08"], band_names=["B02", "B08"]) as scene:
        data, valid = scene.read(Window(8, 4, 20, 12))
        transform, width, height = attr_grid(S2_10)
        assert scene.grid.crs.to_epsg() == 32631 and scene.grid.transform.almost_equals(transform)
        assert (scene.grid.width, scene.grid.height) == (width, height) == (64, 64)
        assert scene.dates == dates(S2_10) and len(scene.dates) == 118 and scene.physical
        assert scene.count == 2 * 118 and scene.band_dates[::2] == scene.dates
    b08 = raw(S2_10, "B08")[:, 4:16, 8:28]
    got = data.reshape(118, 2, 12, 20)[:, 1]
    ok = valid.reshape(118, 2, 12, 20)[:, 1]
    np.testing.assert_array_equal(ok, b08 != 0)  # _FillValue 0
    np.testing.assert_allclose(got[ok], b08[ok] * 1e-4, rtol=1e-6)


def test_bands_split_over_files_come_to_the_finest_grid():
    with open_cube([S2_10, S2_20], ["B04", "B05"], ["B04", "B05"]) as scene:
        assert scene.grid.res == (10.0, 10.0)
        data, valid = scene.read()
    b05 = data.reshape(118, 2, 64, 64)[:, 1]
    ok = valid.reshape(118, 2, 64, 64)[:, 1]
    # independently: the 20 m band as a GeoTIFF georeferenced from the file's attributes, warped by GDAL
    transform, width, height = attr_grid(S2_20)
    source = raw(S2_20, "B05")
    target, _, _ = attr_grid(S2_10)
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=width, height=height, count=118, dtype="uint16", crs="EPSG:32631",
                      transform=transform, nodata=0) as ds:
            ds.write(source)
        with mem.open() as ds, WarpedVRT(ds, crs="EPSG:32631", transform=target, width=64, height=64,
                                         resampling=Resampling.bilinear, src_nodata=0, nodata=0) as vrt:
            expect = vrt.read().astype(np.float64) * 1e-4
    both = ok & (expect > 0)
    assert both.mean() > 0.5
    np.testing.assert_allclose(b05[both], expect[both], atol=2e-4)  # GDAL rounds its uint16 output


def test_scl_mask_invalidates_clouds_in_every_band():
    with open_cube([S2_10, S2_20], ["B02", "B11"], ["B02", "B11"], mask=("SCL", CLEAR)) as scene:
        _, valid = scene.read()
    scl = np.repeat(np.repeat(raw(S2_20, "SCL"), 2, axis=1), 2, axis=2)  # nearest 20 m -> 10 m, aligned grids
    valid = valid.reshape(118, 2, 64, 64)
    clear = np.isin(scl, CLEAR)
    assert not valid[:, 0][~clear].any() and not valid[:, 1][~clear].any()
    np.testing.assert_array_equal(valid[:, 0], clear & (raw(S2_10, "B02") != 0))


def test_one_date_clearest_or_nearest():
    scl = raw(S2_20, "SCL")
    clearest = int(np.argmax(np.isin(scl, CLEAR).mean(axis=(1, 2))))
    with open_cube([S2_10, S2_20], ["B02"], ["B02"], time_series=False, date="clearest", mask=("SCL", CLEAR)) as s:
        assert s.acquired == dates(S2_10)[clearest] and s.count == 1 and s.band_names == ["B02"]
        data, _ = s.read()
    np.testing.assert_allclose(data[0], raw(S2_10, "B02")[clearest] * 1e-4, rtol=1e-6)
    with open_cube(S2_10, ["B02"], ["B02"], time_series=False, date="2018-06-30") as s:
        gaps = [abs((d - datetime(2018, 6, 30)).total_seconds()) for d in dates(S2_10)]
        assert s.acquired == dates(S2_10)[int(np.argmin(gaps))]
    with pytest.raises(RasterError, match="has 118 dates .* time_series: true, or pick one with date"):
        open_cube(S2_10, ["B02"], ["B02"], time_series=False)


def test_static_label_layer_and_undeclared_nodata():
    with open_cube(LABELS, ["CT"], ["crop_type"], time_series=False) as s:
        assert s.dates == [] and s.count == 1
        data, valid = s.read()
    ct = raw(LABELS, "CT")
    np.testing.assert_array_equal(valid[0], ct != 0)
    np.testing.assert_array_equal(data[0][valid[0]], ct[ct != 0])
    with open_cube(MONTHLY, ["S2-L2A-B02"], ["B02"], nodata=65535) as s:
        _, valid = s.read()
    stored = raw(MONTHLY, "S2-L2A-B02").view(np.uint16)  # int16 with _Unsigned = true
    np.testing.assert_array_equal(valid, stored != 65535)
    assert not valid[1].any() and not valid[2].any() and valid[0].all()  # December and January are empty


def test_zarr_store_reads_like_the_netcdf(tmp_path):
    import xarray as xr

    store = tmp_path / "s1.zarr"
    with xr.open_dataset(S1, mask_and_scale=False) as ds:
        ds.to_zarr(store)
    with open_scene(S1, variables=["VV", "VH"], band_names=["VV", "VH"]) as a, \
            open_scene(str(store), variables=["VV", "VH"], band_names=["VV", "VH"]) as b:
        assert a.grid == b.grid and a.dates == b.dates
        (da, va), (db, vb) = a.read(Window(3, 5, 20, 11)), b.read(Window(3, 5, 20, 11))
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_array_equal(da, db)
    np.testing.assert_allclose(da.reshape(159, 2, 11, 20)[:, 0], raw(S1, "VV")[:, 5:16, 3:23] * 1e-4, rtol=1e-6)


def test_bad_cubes_name_what_they_hold(tmp_path):
    with pytest.raises(RasterError, match=r"no variable 'B8B' \(for band B8B\).*variables B05 \('timestamp', 'y', "
                                          r"'x'\).*dims timestamp: 118, y: 32, x: 32"):
        open_cube(S2_20, ["B8B"], ["B8B"])
    with pytest.raises(RasterError, match=r"'sunAzimuthAngles' has dims \('timestamp',\), no x/y axes"):
        open_cube(S2_20, ["sunAzimuthAngles"], ["X"])
    nocrs = tmp_path / "nocrs.nc"
    with netCDF4.Dataset(S1) as src, netCDF4.Dataset(nocrs, "w") as dst:
        for name, dim in src.dimensions.items():
            dst.createDimension(name, len(dim))
        for name in ("x", "y", "timestamp", "VV"):
            var = src[name]
            var.set_auto_maskandscale(False)
            out = dst.createVariable(name, var.datatype, var.dimensions)
            out.setncatts({k: var.getncattr(k) for k in var.ncattrs()
                           if k not in ("grid_mapping", "crs", "epsg", "_FillValue")})
            out[...] = var[...]
    with pytest.raises(RasterError, match=r"has no CRS .*variables VV \('timestamp', 'y', 'x'\); dims timestamp: 159"):
        open_cube(str(nocrs), ["VV"], ["VV"])
    with netCDF4.Dataset(nocrs, "a") as ds:
        ds.setncattr("epsg", "32631")  # the WorldCereal files also carry their EPSG code as an attribute
    with open_cube(str(nocrs), ["VV"], ["VV"]) as scene:
        assert scene.grid.crs.to_epsg() == 32631 and scene.grid.transform.almost_equals(attr_grid(S1)[0])
    broken = tmp_path / "truncated.nc"
    broken.write_bytes(Path(S1).read_bytes()[:5000])
    with pytest.raises(RasterError, match="truncated.nc: not a readable netCDF or Zarr cube"):
        open_cube(str(broken), ["VV"], ["VV"])
    with rasterio.open(ROOT / "data/sample/rgbn_haiti/rgbn.tif"):
        with pytest.raises(RasterError, match="mixes datacubes and rasters"):
            open_scene([S1, str(ROOT / "data/sample/rgbn_haiti/rgbn.tif")], variables=["VV"])
