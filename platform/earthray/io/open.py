"""One entry point for every kind of scene earthray reads."""

from __future__ import annotations

from collections.abc import Sequence

from rasterio.enums import Resampling

from earthray.io.cube import is_cube, open_cube
from earthray.io.safe import is_safe, safe_bands
from earthray.io.scene import RasterError, Scene


def open_scene(source: str | Sequence[str], nodata: float | None = None,
               resampling: Resampling = Resampling.bilinear, *, variables: Sequence[str] | None = None,
               band_names: Sequence[str] | None = None, time_series: bool = True, date: str | None = None,
               mask: tuple[str, Sequence[int]] | None = None) -> Scene:
    """Open a GeoTIFF/COG/ENVI file, a Sentinel-2 SAFE (zip or folder), a list of one-band files, or
    netCDF/Zarr datacubes (one file, or a list whose files hold different bands of one sensor).

    ``nodata`` is the fallback for files that declare none (e.g. the sensor's catalogue value).
    Bands on coarser grids (S2 20/60 m, a Landsat pan band) are resampled onto the finest member's
    grid. Cubes need ``variables`` (one per band, named ``band_names``); ``time_series``, ``date``
    and ``mask`` are as in :func:`earthray.io.cube.open_cube`.
    """
    members = [source] if isinstance(source, str) else list(source)
    if not members:
        raise RasterError("empty band stack")
    if any(is_cube(m) for m in members):
        if not all(is_cube(m) for m in members):
            raise RasterError(f"{members[0]}: a band stack mixes datacubes and rasters; give each its own sensor")
        if variables is None:
            raise RasterError(f"{members[0]}: a datacube needs its band variables named (bands: {{BAND: VARIABLE}})")
        return open_cube(members, variables, band_names or variables, time_series=time_series, date=date,
                         mask=mask, nodata=nodata, resampling=resampling)
    if date is not None or mask is not None:
        raise RasterError(f"{members[0]}: date and mask select dates and pixels of datacubes; this is a raster")
    if not isinstance(source, str):
        return Scene.from_datasets(members, name=members[0], reference="finest", nodata=nodata, resampling=resampling)
    if is_safe(source):
        try:
            bands, acquired = safe_bands(source)
        except (OSError, ValueError) as e:
            raise RasterError(f"{source}: not a readable SAFE product: {e}") from None
        if not bands:
            raise RasterError(f"{source}: SAFE product has no band JP2 files under IMG_DATA")
        scene = Scene.from_datasets(list(bands.values()), name=source, reference="finest", nodata=nodata,
                                    resampling=resampling, band_names=list(bands))
        scene.acquired = acquired or scene.acquired
        return scene
    return Scene.from_datasets([source], name=source, nodata=nodata, resampling=resampling)
