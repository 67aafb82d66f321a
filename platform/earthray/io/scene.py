"""A scene: the bands of one acquisition (or one time series) readable window by window on one grid.

A scene may be one file (GeoTIFF, COG, ENVI), several one-band files (a Landsat-style
band stack) or a Sentinel-2 SAFE product; members on other grids are warped onto the
scene's grid on the fly (rasterio ``WarpedVRT``), so a read never touches more than
the window asked for. ``reproject(grid)`` puts the whole scene on another scene's grid,
which is how co-located sensors are paired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import MaskFlags, Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from earthray.errors import EarthrayError
from earthray.io.dates import date_from_tags, parse_date
from earthray.io.grid import Grid


class RasterError(EarthrayError):
    """A raster that cannot be used as asked; the message names the file and the problem."""


@dataclass
class _Member:
    """One opened dataset and which of its bands the scene uses."""

    path: str
    dataset: rasterio.io.DatasetReader | WarpedVRT
    indexes: list[int]
    nodata: float | None
    masked: bool  # validity comes from GDAL's mask band (alpha, internal mask), not from values


def _open(path: str) -> rasterio.io.DatasetReader:
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise RasterError(f"{path}: cannot open: {e}") from None


def _uses_mask_band(ds) -> bool:
    flags = ds.mask_flag_enums[0]
    return MaskFlags.alpha in flags or MaskFlags.per_dataset in flags


class Scene:
    """Bands from one or more datasets, all on ``grid``."""

    def __init__(self, members: list[_Member], grid: Grid, band_names: list[str], name: str,
                 dates: list[datetime | None] | None = None, acquired: datetime | None = None):
        self._members = members
        self.grid = grid
        self.band_names = band_names
        self.name = name
        self.band_dates = dates
        self.acquired = acquired

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_datasets(cls, paths: Sequence[str], name: str | None = None, reference: int | str = 0,
                      nodata: float | None = None, resampling: Resampling = Resampling.bilinear,
                      band_names: list[str] | None = None) -> Scene:
        """Stack every band of ``paths`` on the grid of ``paths[reference]`` (or the finest, 'finest')."""
        datasets = [_open(p) for p in paths]
        try:
            if reference == "finest":
                reference = min(range(len(datasets)), key=lambda i: datasets[i].res[0])
            ref = datasets[reference]
            grid = Grid(ref.crs, ref.transform, ref.width, ref.height)
            members: list[_Member] = []
            names: list[str] = []
            for path, ds in zip(paths, datasets):
                src_nodata = ds.nodata if ds.nodata is not None else nodata
                if (ds.crs, ds.transform, ds.width, ds.height) != (grid.crs, grid.transform, grid.width, grid.height):
                    if ds.crs is None or grid.crs is None:
                        raise RasterError(f"{path}: has no CRS, cannot be aligned with {paths[reference]}")
                    ds = _warp(ds, grid, src_nodata, resampling)
                members.append(_Member(path, ds, list(range(1, ds.count + 1 - int(_has_alpha(ds)))),
                                       src_nodata, _uses_mask_band(ds)))
                stem = Path(path).stem
                descs = ds.descriptions[: len(members[-1].indexes)]
                if len(paths) > 1 and len(members[-1].indexes) == 1:
                    names.append(descs[0] or stem)
                else:
                    names += [d or f"{stem}:{i + 1}" for i, d in enumerate(descs)]
        except Exception:
            for ds in datasets:
                ds.close()
            raise
        dates = [parse_date(n) for n in names]
        if len(set(dates)) == 1 and len(dates) > 1:
            dates = [None]  # one acquisition, not a series
        ref_ds = datasets[reference]
        acquired = (date_from_tags(ref_ds.tags()) or parse_date(Path(paths[reference]).name)
                    or next((d for d in dates if d), None))
        return cls(members, grid, band_names or names, name or str(paths[0]),
                   dates if all(dates) else None, acquired)

    # -- properties -----------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(len(m.indexes) for m in self._members)

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(*[np.dtype(m.dataset.dtypes[0]) for m in self._members])

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self._members]

    @property
    def nodata(self) -> float | None:
        return self._members[0].nodata

    def __repr__(self) -> str:
        return f"Scene({self.name!r}, {self.count} bands, {self.grid.width}x{self.grid.height}, {self.grid.crs_string()})"

    # -- reading --------------------------------------------------------------------------------
    def read(self, window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Bands ``(C, h, w)`` in their common dtype and a per-band validity mask of the same shape."""
        window = window or Window(0, 0, self.grid.width, self.grid.height)
        datas, valids = [], []
        for m in self._members:
            try:
                data = m.dataset.read(m.indexes, window=window)
                if m.masked:
                    valid = m.dataset.read_masks(m.indexes, window=window) > 0
                else:
                    valid = np.ones(data.shape, bool)
            except rasterio.errors.RasterioError as e:
                raise RasterError(f"{m.path}: read failed at {window}: {e}") from None
            if m.nodata is not None:
                valid &= data != np.array(m.nodata).astype(data.dtype)
            if data.dtype.kind == "f":
                valid &= np.isfinite(data)
            datas.append(data)
            valids.append(valid)
        dtype = self.dtype
        data = datas[0] if len(datas) == 1 else np.concatenate([d.astype(dtype, copy=False) for d in datas])
        return data, valids[0] if len(valids) == 1 else np.concatenate(valids)

    # -- reprojection ---------------------------------------------------------------------------
    def reproject(self, grid: Grid, resampling: Resampling = Resampling.bilinear) -> Scene:
        """The same bands warped onto ``grid`` (lazily: reads still go window by window)."""
        if self.grid.crs is None or grid.crs is None:
            raise RasterError(f"{self.name}: has no CRS, cannot be reprojected")
        members = [
            _Member(m.path, w, list(range(1, w.count + 1 - int(_has_alpha(w)))), m.nodata, _uses_mask_band(w))
            for m in self._members
            for w in [_warp(m.dataset, grid, m.nodata, resampling)]
        ]
        warped = Scene(members, grid, self.band_names, self.name, self.band_dates, self.acquired)
        warped._parent = self
        return warped

    def overlaps(self, grid: Grid) -> bool:
        """Whether this scene's footprint intersects ``grid``'s (compared in ``grid``'s CRS)."""
        from rasterio.warp import transform_bounds

        if self.grid.crs is None or grid.crs is None:
            return False
        left, bottom, right, top = transform_bounds(self.grid.crs, grid.crs, *self.grid.bounds)
        gl, gb, gr, gt = grid.bounds
        return left < gr and right > gl and bottom < gt and top > gb

    _parent: Scene | None = None

    def close(self) -> None:
        for m in self._members:
            m.dataset.close()
        if self._parent is not None:
            self._parent.close()

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _has_alpha(ds) -> bool:
    return bool(ds.count) and ds.colorinterp[-1] == rasterio.enums.ColorInterp.alpha and isinstance(ds, WarpedVRT)


def _warp(ds, grid: Grid, nodata: float | None, resampling: Resampling) -> WarpedVRT:
    src = ds.src_dataset if isinstance(ds, WarpedVRT) else ds
    kwargs = dict(crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                  resampling=resampling)
    if nodata is not None:
        kwargs.update(src_nodata=nodata, nodata=nodata)
    else:
        kwargs.update(add_alpha=True)
    return WarpedVRT(src, **kwargs)
