"""Quicklook PNGs of written rasters: a look at a whole scene's output without a GIS.

The raster is read at reduced resolution (GDAL picks overviews when the file has them), so a
quicklook of any scene size costs a bounded amount of memory. A class map gets a legend: each
class's colour (the raster's colour table, else ``CLASS_COLOURS``) and name (the raster's
``classes`` tag, which earthray writes from the label source's class names, else ``class N``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from earthray.io.write import CLASS_COLOURS

SWATCH = 14
PAD = 6


def quicklook(raster: str | Path, png: str | Path, max_side: int = 1024) -> Path:
    """A PNG of ``raster``'s first band, at most ``max_side`` pixels on its longer side (plus the legend).

    Integer bands are drawn as classes, float bands as a grey 2-98 % stretch; the raster's nodata
    pixels are black.
    """
    import rasterio
    from PIL import Image
    from rasterio.enums import Resampling

    with rasterio.open(raster) as src:
        scale = min(1.0, max_side / max(src.width, src.height))
        shape = (max(1, round(src.height * scale)), max(1, round(src.width * scale)))
        band = src.read(1, out_shape=shape, resampling=Resampling.nearest, masked=True)
        classes = np.dtype(src.dtypes[0]).kind in "iu"
        names = json.loads(src.tags().get("classes") or "null")
        try:
            table = src.colormap(1)
        except ValueError:  # no colour table
            table = None
    valid = ~np.ma.getmaskarray(band)
    rgb = np.zeros(shape + (3,), np.uint8)
    if classes:
        values = band.data[valid].astype(np.int64)
        palette = _palette(table, max(len(names or ()), int(values.max()) + 1 if values.size else 0))
        rgb[valid] = palette[values]
        image = _with_legend(Image.fromarray(rgb), palette, names)
    else:
        if valid.any():
            values = band.data[valid].astype(np.float64)
            lo, hi = np.percentile(values, [2, 98])
            rgb[valid] = (np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)[:, None]
        image = Image.fromarray(rgb)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    image.save(png)
    return png


def _palette(table: dict[int, tuple] | None, n: int) -> np.ndarray:
    """RGB per class value 0..n-1: the raster's colour table where it has one, else the default colours."""
    palette = CLASS_COLOURS[np.arange(n) % len(CLASS_COLOURS)]
    if table:
        palette = palette.copy()
        for value, colour in table.items():
            if value < n:
                palette[value] = colour[:3]
    return palette


def _with_legend(image, palette: np.ndarray, names: list[str] | None):
    """``image`` with a column on its right: a swatch and a name per class."""
    from PIL import Image, ImageDraw, ImageFont

    labels = [names[i] if names and i < len(names) else f"class {i}" for i in range(len(palette))]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(image)
    width = SWATCH + 3 * PAD + max((int(probe.textlength(t, font=font)) for t in labels), default=0)
    height = max(image.height, PAD + len(labels) * (SWATCH + PAD))
    out = Image.new("RGB", (image.width + width, height), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, (colour, label) in enumerate(zip(palette, labels)):
        x, y = image.width + PAD, PAD + i * (SWATCH + PAD)
        draw.rectangle([x, y, x + SWATCH, y + SWATCH], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + SWATCH + PAD, y), label, fill="black", font=font)
    return out
