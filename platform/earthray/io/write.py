"""GeoTIFF / COG writers that stream windows in and land the file atomically.

A half-written output is never left under the final name: writes go to a temporary
file beside it, renamed on success (COGs are rewritten from a tiled temporary).

A class map (``classes=[...]``) carries a colour table, so GIS tools draw it paletted with a
legend, its class names as a ``classes`` tag (JSON) and, beside the file, a GDAL PAM sidecar
(``<file>.aux.xml``) naming each class value, which GDAL and QGIS show as category names.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from earthray.io.categories import category_sidecar
from earthray.io.grid import Grid

# Distinct colours for up to 12 classes (ColorBrewer "Paired"), repeating beyond; nodata is transparent black.
CLASS_COLOURS = np.array([
    (166, 206, 227), (31, 120, 180), (178, 223, 138), (51, 160, 44), (251, 154, 153), (227, 26, 28),
    (253, 191, 111), (255, 127, 0), (202, 178, 214), (106, 61, 154), (255, 255, 153), (177, 89, 40),
], np.uint8)


def class_colormap(n: int, nodata: int | None = None) -> dict[int, tuple[int, int, int, int]]:
    """Class value -> RGBA for ``n`` classes (and the nodata value, transparent)."""
    cmap = {i: (*map(int, CLASS_COLOURS[i % len(CLASS_COLOURS)]), 255) for i in range(n)}
    if nodata is not None:
        cmap[int(nodata)] = (0, 0, 0, 0)
    return cmap


class RasterWriter:
    """``with RasterWriter(path, grid, count, dtype) as w: w.write(window, block)``.

    ``classes`` makes a one-band integer raster a class map (colour table, class names; see the module doc).
    """

    def __init__(self, path: str | Path, grid: Grid, count: int, dtype: str | np.dtype,
                 nodata: float | None = None, tags: Mapping[str, str] | None = None,
                 band_names: Sequence[str] | None = None, cog: bool = False, compress: str = "deflate",
                 classes: Sequence[str] | None = None):
        self.path = Path(path)
        self.cog = cog
        self.compress = compress
        self.classes = list(classes) if classes is not None else None
        if self.classes is not None and (count != 1 or np.dtype(dtype).kind != "u" or np.dtype(dtype).itemsize > 2):
            raise ValueError(f"a class map is one uint8/uint16 band, not {count} x {np.dtype(dtype).name}")
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tiled = grid.width >= 256 and grid.height >= 256
        profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=count, dtype=np.dtype(dtype).name,
                       crs=grid.crs, transform=grid.transform, nodata=nodata, compress=compress,
                       tiled=tiled, BIGTIFF="IF_SAFER")
        if tiled:
            profile.update(blockxsize=256, blockysize=256)
        self._ds = rasterio.open(self._tmp, "w", **profile)
        if self.classes is not None:
            tags = {**(tags or {}), "classes": json.dumps(self.classes)}
            self._ds.write_colormap(1, class_colormap(len(self.classes), nodata))
        if tags:
            self._ds.update_tags(**{k: str(v) for k, v in tags.items()})
        if band_names:
            self._ds.descriptions = tuple(band_names)

    def write(self, window: Window, block: np.ndarray) -> None:
        """``block`` is ``(count, h, w)`` or ``(h, w)`` for one band."""
        self._ds.write(block if block.ndim == 3 else block[None], window=window)

    def close(self, ok: bool = True) -> None:
        if self._ds.closed:
            return
        self._ds.close()
        if not ok:
            self._tmp.unlink(missing_ok=True)
            return
        if self.cog:
            cog_tmp = self._tmp.with_suffix(".cog.tmp")
            rasterio.shutil.copy(self._tmp, cog_tmp, driver="COG", compress=self.compress)
            self._tmp.unlink()
            os.replace(cog_tmp, self.path)
        else:
            os.replace(self._tmp, self.path)
        if self.classes is not None:
            category_sidecar(self.path, self.classes)

    def __enter__(self) -> RasterWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ok=exc_type is None)


def write_raster(path: str | Path, data: np.ndarray, grid: Grid, nodata: float | None = None,
                 tags: Mapping[str, str] | None = None, band_names: Sequence[str] | None = None,
                 cog: bool = False, classes: Sequence[str] | None = None) -> Path:
    """Write a whole in-memory array; for large outputs use :class:`RasterWriter` window by window."""
    data = data if data.ndim == 3 else data[None]
    with RasterWriter(path, grid, data.shape[0], data.dtype, nodata, tags, band_names, cog,
                      classes=classes) as w:
        w.write(Window(0, 0, grid.width, grid.height), data)
    return Path(path)


def footprint_wkb(transform, col: float, row: float, width: float, height: float) -> bytes:
    """The WKB polygon of the pixel window ``(col, row, width, height)`` through ``transform`` (its CRS's units)."""
    corners = [(col, row), (col + width, row), (col + width, row + height), (col, row + height), (col, row)]
    points = [transform * c for c in corners]
    return struct.pack("<BIII", 1, 3, 1, len(points)) + b"".join(struct.pack("<dd", x, y) for x, y in points)


class GeoParquetWriter:
    """Rows with a polygon each, streamed into a GeoParquet file: one row group per ``write``.

    ``schema`` holds a binary ``geometry`` column (WKB, e.g. ``footprint_wkb``); ``crs`` is the geometries'
    (recorded as PROJJSON in the ``geo`` metadata; None writes an explicit unknown CRS). Rows go to a
    temporary file renamed into place on ``close``, so the file under its name is always complete.
    """

    def __init__(self, path: str | Path, schema, crs, metadata: Mapping[str, str] | None = None):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        geo = {"version": "1.1.0", "primary_column": "geometry",
               "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                        "crs": crs.to_dict(projjson=True) if crs is not None else None}}}
        self.schema = schema.with_metadata({**(metadata or {}), "geo": json.dumps(geo)})
        self._writer = pq.ParquetWriter(self._tmp, self.schema)

    def write(self, columns: Mapping[str, Sequence]) -> None:
        import pyarrow as pa

        if columns and len(next(iter(columns.values()))):
            self._writer.write_table(pa.table(dict(columns), schema=self.schema))

    def close(self, ok: bool = True) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        if ok:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)
