"""GeoTIFF / COG writers that stream windows in and land the file atomically.

A half-written output is never left under the final name: writes go to a temporary
file beside it, renamed on success (COGs are rewritten from a tiled temporary).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from earthray.io.grid import Grid


class RasterWriter:
    """``with RasterWriter(path, grid, count, dtype) as w: w.write(window, block)``."""

    def __init__(self, path: str | Path, grid: Grid, count: int, dtype: str | np.dtype,
                 nodata: float | None = None, tags: Mapping[str, str] | None = None,
                 band_names: Sequence[str] | None = None, cog: bool = False, compress: str = "deflate"):
        self.path = Path(path)
        self.cog = cog
        self.compress = compress
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tiled = grid.width >= 256 and grid.height >= 256
        profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=count, dtype=np.dtype(dtype).name,
                       crs=grid.crs, transform=grid.transform, nodata=nodata, compress=compress,
                       tiled=tiled, BIGTIFF="IF_SAFER")
        if tiled:
            profile.update(blockxsize=256, blockysize=256)
        self._ds = rasterio.open(self._tmp, "w", **profile)
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

    def __enter__(self) -> RasterWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(ok=exc_type is None)


def write_raster(path: str | Path, data: np.ndarray, grid: Grid, nodata: float | None = None,
                 tags: Mapping[str, str] | None = None, band_names: Sequence[str] | None = None,
                 cog: bool = False) -> Path:
    """Write a whole in-memory array; for large outputs use :class:`RasterWriter` window by window."""
    data = data if data.ndim == 3 else data[None]
    with RasterWriter(path, grid, data.shape[0], data.dtype, nodata, tags, band_names, cog) as w:
        w.write(Window(0, 0, grid.width, grid.height), data)
    return Path(path)
