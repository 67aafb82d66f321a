"""Rebuild data/sample/ from the shared real-imagery folder (../shared/data).

Crops and recompresses (lossless) so the bundled set stays a few MB; values,
CRS, transforms, nodata and metadata are kept. Run once; the output is committed.
    python scripts/make_sample_data.py [SHARED_DATA] [OUT]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import rasterio
from rasterio.windows import Window

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "data/sample")


def copy_tif(src: Path, dst: Path, window: Window | None = None) -> None:
    """Lossless re-encode (deflate) of a GeoTIFF, optionally cropped."""
    with rasterio.open(src) as ds:
        win = window or Window(0, 0, ds.width, ds.height)
        profile = ds.profile | {
            "driver": "GTiff", "width": int(win.width), "height": int(win.height),
            "transform": ds.window_transform(win), "compress": "deflate", "tiled": False,
        }
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(dst, "w", **profile) as out:
            out.write(ds.read(window=win))
            out.update_tags(**ds.tags())
            out.descriptions = ds.descriptions


def copy_envi(src: Path, dst: Path, window: Window) -> None:
    with rasterio.open(src) as ds:
        profile = ds.profile | {"width": int(window.width), "height": int(window.height),
                                "transform": ds.window_transform(window)}
        with rasterio.open(dst, "w", **profile) as out:
            out.write(ds.read(window=window))
            out.descriptions = ds.descriptions


def crop_safe(src_zip: Path, dst_zip: Path, size_10m: int) -> None:
    """Keep the SAFE layout (metadata XML + one JP2 per band), cropping each band to the same footprint."""
    with zipfile.ZipFile(src_zip) as zin, zipfile.ZipFile(dst_zip, "w", zipfile.ZIP_STORED) as zout, \
            tempfile.TemporaryDirectory() as tmp:
        for info in zin.infolist():
            name = info.filename
            if name.endswith("/") or "DATASTRIP" in name or name.endswith("_TCI.jp2"):
                continue
            if name.endswith(".jp2"):
                with rasterio.open(f"/vsizip/{src_zip}/{name}") as ds:
                    factor = round(ds.res[0] / 50.0)  # this product's 10 m bands are at 50 m
                    n = size_10m // factor
                    win = Window(0, 0, n, n)
                    path = Path(tmp) / Path(name).name
                    with rasterio.open(path, "w", driver="JP2OpenJPEG", width=n, height=n, count=1,
                                       dtype=ds.dtypes[0], crs=ds.crs, transform=ds.window_transform(win),
                                       QUALITY=100, REVERSIBLE="YES") as out:
                        out.write(ds.read(1, window=win), 1)
                zout.write(path, name)
            else:
                zout.writestr(info, zin.read(name))


def copy_cube(src: Path, dst: Path) -> None:
    """Lossless re-encode of a netCDF cube: dims, variables, stored values and attributes as they are, zlib on."""
    import netCDF4

    dst.parent.mkdir(parents=True, exist_ok=True)
    with netCDF4.Dataset(src) as a, netCDF4.Dataset(dst, "w", format=a.data_model) as b:
        b.setncatts({k: a.getncattr(k) for k in a.ncattrs()})
        for name, dim in a.dimensions.items():
            b.createDimension(name, None if dim.isunlimited() else len(dim))
        for name, var in a.variables.items():
            var.set_auto_maskandscale(False)
            fill = var.getncattr("_FillValue") if "_FillValue" in var.ncattrs() else None
            out = b.createVariable(name, var.datatype, var.dimensions, zlib=var.ndim >= 2, complevel=6,
                                   shuffle=var.ndim >= 2, fill_value=fill)
            out.set_auto_maskandscale(False)
            out.setncatts({k: var.getncattr(k) for k in var.ncattrs() if k != "_FillValue"})
            out[...] = var[...]


# Landsat 8 SR/ST cubes are left out: the catalogue has no Landsat 8 surface-reflectance sensor yet.
WORLDCEREAL = ("S1_GRD-ASCENDING_20m_", "S2_L2A_10m_", "S2_L2A_20m_", "OUTPUT_POLY-110_10m_")


def main() -> None:
    for folder in OUT.iterdir() if OUT.exists() else []:
        if folder.is_dir():
            shutil.rmtree(folder)  # PROVENANCE.md stays
    s1 = SRC / "sentinel1_camargue"
    for tif in sorted(s1.glob("*.tif")):
        copy_tif(tif, OUT / "s1_camargue" / tif.name)
    series = "S1_GRD_VV_France_Camargue_2017-01-01_2017-12-31"
    copy_envi(s1 / series, OUT / "s1_camargue" / series, Window(0, 0, 48, 48))

    (OUT / "s2_t55hfa").mkdir(parents=True)
    src_zip = next((SRC / "sentinel2_l1c_t55hfa").glob("*.zip"))
    crop_safe(src_zip, OUT / "s2_t55hfa" / src_zip.name, size_10m=240)

    for band in ("B2", "B3", "B4"):
        name = f"LC08_L1TP_224077_20200518_20200518_01_RT_{band}.TIF"
        copy_tif(SRC / "landsat8_parana" / name, OUT / "landsat8_parana" / name, Window(600, 400, 384, 384))

    copy_tif(SRC / "rgbn_haiti" / "rgbn.tif", OUT / "rgbn_haiti" / "rgbn.tif")
    for name in ("rmnp-rgb.tif", "rmnp-dem.tif"):
        copy_tif(SRC / "rmnp_rgb_dem" / name, OUT / "rmnp_rgb_dem" / name)
    for tif in sorted((SRC / "landsat7_nc_labelled").glob("*.tif")):
        copy_tif(tif, OUT / "landsat7_nc" / tif.name)

    for patch in sorted(p for p in (SRC / "worldcereal_flanders").iterdir() if p.is_dir()):
        for nc in sorted(patch.glob("*.nc")):
            if nc.name.startswith(WORLDCEREAL):
                copy_cube(nc, OUT / "worldcereal_flanders" / patch.name / nc.name)
    shutil.copy(SRC / "worldcereal_flanders" / "LICENSE", OUT / "worldcereal_flanders" / "LICENSE")
    cube = SRC / "worldcereal_monthly_cube"
    copy_cube(cube / "worldcereal_preprocessed_inputs.nc", OUT / "worldcereal_monthly" / "worldcereal_preprocessed_inputs.nc")
    shutil.copy(cube / "LICENSE", OUT / "worldcereal_monthly" / "LICENSE")
    ben = SRC / "bigearthnet_pairs"
    for tif in sorted(ben.glob("*/*/*.tif")):
        copy_tif(tif, OUT / "bigearthnet" / tif.parent.parent.name / tif.parent.name / tif.name)
    for meta in sorted(ben.glob("*/*/*_labels_metadata.json")):
        shutil.copy(meta, OUT / "bigearthnet" / meta.parent.parent.name / meta.parent.name / meta.name)
    shutil.copy(ben / "LICENSE", OUT / "bigearthnet" / "LICENSE")


if __name__ == "__main__":
    main()
