"""Quicklook PNGs of written rasters: a look at a whole scene's output without a GIS.

The raster is read at reduced resolution (GDAL picks overviews when the file has them), so a
quicklook of any scene size costs a bounded amount of memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Distinct colours for up to 12 classes (ColorBrewer "Paired"); nodata is black.
PALETTE = np.array([
    (166, 206, 227), (31, 120, 180), (178, 223, 138), (51, 160, 44), (251, 154, 153), (227, 26, 28),
    (253, 191, 111), (255, 127, 0), (202, 178, 214), (106, 61, 154), (255, 255, 153), (177, 89, 40),
], np.uint8)


def quicklook(raster: str | Path, png: str | Path, max_side: int = 1024) -> Path:
    """A PNG of ``raster``'s first band, at most ``max_side`` pixels on its longer side.

    Integer bands are drawn as classes (the palette, repeating past 12), float bands as a grey
    2-98 % stretch; the raster's nodata pixels are black.
    """
    import rasterio
    from PIL import Image
    from rasterio.enums import Resampling

    with rasterio.open(raster) as src:
        scale = min(1.0, max_side / max(src.width, src.height))
        shape = (max(1, round(src.height * scale)), max(1, round(src.width * scale)))
        band = src.read(1, out_shape=shape, resampling=Resampling.nearest, masked=True)
        classes = np.dtype(src.dtypes[0]).kind in "iu"
    valid = ~np.ma.getmaskarray(band)
    rgb = np.zeros(shape + (3,), np.uint8)
    if classes:
        rgb[valid] = PALETTE[band.data[valid].astype(np.int64) % len(PALETTE)]
    elif valid.any():
        values = band.data[valid].astype(np.float64)
        lo, hi = np.percentile(values, [2, 98])
        rgb[valid] = (np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)[:, None]
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(png)
    return png
