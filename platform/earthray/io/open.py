"""One entry point for every kind of scene earthray reads."""

from __future__ import annotations

from collections.abc import Sequence

from rasterio.enums import Resampling

from earthray.io.safe import is_safe, safe_bands
from earthray.io.scene import RasterError, Scene


def open_scene(source: str | Sequence[str], nodata: float | None = None,
               resampling: Resampling = Resampling.bilinear) -> Scene:
    """Open a GeoTIFF/COG/ENVI file, a Sentinel-2 SAFE (zip or folder), or a list of one-band files.

    ``nodata`` is the fallback for files that declare none (e.g. the sensor's catalogue value).
    Bands on coarser grids (S2 20/60 m, a Landsat pan band) are resampled onto the finest
    (SAFE) or first (band list) member's grid.
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise RasterError("empty band stack")
        return Scene.from_datasets(list(source), name=str(source[0]), nodata=nodata, resampling=resampling)
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
