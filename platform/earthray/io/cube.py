"""Datacubes: netCDF and Zarr time series (the openEO / WorldCereal layout) as scenes.

A cube holds one variable per band over dims ``(time, y, x)`` (or ``(y, x)`` for a static
layer such as a label map). xarray opens it lazily; each window read is decoded as CF says
(``_Unsigned``, ``_FillValue`` / ``missing_value``, ``scale_factor``, ``add_offset``), so
values arrive in physical units with their validity; rioxarray finds the spatial dims and the
CRS (from the grid-mapping variable), with fallbacks for a ``crs`` / ``spatial_ref`` variable
and an ``epsg`` attribute. A read touches only the window asked for. The decoding is done
here rather than by xarray because real files trip xarray's: WorldCereal's SCL is uint8 with an
integer ``scale_factor`` of 1, which xarray decodes to int64 and then cannot mask with NaN.

Bands of one sensor may be split over several files at different resolutions (Sentinel-2's
10 m and 20 m files): each file is one member, and members on coarser grids are warped onto
the finest one window by window, as the bands of a SAFE product are. A quality variable
(Sentinel-2's SCL) can mask every band of its date. A cube read as a single date picks one
time step (``date: clearest`` or the step nearest an ISO date).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import rasterio.warp
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.windows import Window, from_bounds

from earthray.io.grid import Grid
from earthray.io.scene import RasterError, Scene

SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".zarr")
CLEAR_SAMPLES = 512
"""Side of the decimated sample ``date: clearest`` scores each date on (bounded cost at any cube size)."""


def is_cube(path: str) -> bool:
    """Whether ``path`` names a netCDF file or a Zarr store (by suffix, or a folder holding Zarr metadata)."""
    p = Path(str(path).rstrip("/"))
    if p.suffix.lower() in SUFFIXES:
        return True
    return p.is_dir() and any((p / m).exists() for m in ("zarr.json", ".zgroup", ".zmetadata"))


_SIGNATURES = (b"CDF\x01", b"CDF\x02", b"CDF\x05", b"\x89HDF\r\n\x1a\n")  # netCDF classic / 64-bit / netCDF-4


def _open(path: str):
    import xarray as xr

    zarr = Path(str(path).rstrip("/")).suffix.lower() == ".zarr" or Path(path).is_dir()
    if not zarr and "://" not in str(path):
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError as e:
            raise RasterError(f"{path}: cannot open: {e.strerror}") from None
        if not head.startswith(_SIGNATURES):
            raise RasterError(f"{path}: not a readable netCDF or Zarr cube (no netCDF or HDF5 signature)")
    try:
        if zarr:
            return xr.open_zarr(path, decode_coords=True, mask_and_scale=False)
        return xr.open_dataset(path, decode_coords=True, mask_and_scale=False)
    except Exception as e:  # netCDF4 / HDF5 / zarr each raise their own types for an unreadable file
        cause = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise RasterError(f"{path}: not a readable netCDF or Zarr cube ({cause})") from None


def describe(ds) -> str:
    """What a cube holds, for error messages: its variables with their dims, and the dim sizes."""
    variables = ", ".join(f"{v} {tuple(ds[v].dims)}" for v in ds.data_vars)
    dims = ", ".join(f"{d}: {n}" for d, n in ds.sizes.items())
    return f"variables {variables or '(none)'}; dims {dims or '(none)'}"


def _crs(ds, da) -> CRS | None:
    """The CRS as rioxarray finds it, else a grid-mapping / crs / spatial_ref variable, else an epsg attribute."""
    for obj in (da, ds):
        try:
            if obj.rio.crs is not None:
                return CRS.from_user_input(obj.rio.crs)
        except Exception:  # rioxarray raises on malformed CRS metadata; try the fallbacks
            pass
    names = [da.attrs.get("grid_mapping"), da.encoding.get("grid_mapping"), "crs", "spatial_ref"]
    for name in names:
        if name and name in ds.variables:
            attrs = ds[name].attrs
            for key in ("crs_wkt", "spatial_ref", "epsg_code"):
                if attrs.get(key):
                    try:
                        return CRS.from_user_input(attrs[key])
                    except Exception:  # noqa: S112 - the next key may hold a usable form
                        continue
    for attrs in (da.attrs, ds.attrs):
        epsg = attrs.get("epsg")
        if epsg is not None:
            try:
                return CRS.from_epsg(int(np.ravel(epsg)[0]))
            except (ValueError, TypeError, rasterio.errors.CRSError):
                pass
    return None


def _dates(values: np.ndarray) -> list[datetime]:
    import pandas as pd

    stamps = pd.to_datetime(np.asarray(values).astype(str) if np.asarray(values).dtype.kind in "US" else values)
    return [t.to_pydatetime().replace(microsecond=0, tzinfo=None) for t in stamps]


def decode(raw: np.ndarray, attrs: dict, nodata: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stored values -> (physical float32, valid): ``_Unsigned``, fill and missing values, scale and offset.

    ``nodata`` is one more stored value that marks a missing pixel, for files that do not declare
    theirs (openEO's uint16 composites fill empty months with 65535 and say nothing)."""
    if str(attrs.get("_Unsigned", "")).lower() == "true" and raw.dtype.kind == "i":
        raw = raw.view(raw.dtype.str.replace("i", "u"))
    valid = np.isfinite(raw) if raw.dtype.kind == "f" else np.ones(raw.shape, bool)
    for fills in (attrs.get("_FillValue"), attrs.get("missing_value"), nodata):
        if fills is not None:
            for fill in np.ravel(fills):
                valid &= ~np.isnan(raw) if np.isnan(float(fill)) else raw != np.asarray(fill).astype(raw.dtype)
    data = raw.astype(np.float32)
    scale, offset = attrs.get("scale_factor"), attrs.get("add_offset")
    if scale is not None or offset is not None:
        data = (raw * np.float64(1 if scale is None else scale) + np.float64(offset or 0)).astype(np.float32)
    return data, valid


class _Member:
    """The variables one cube file contributes, readable by window on the file's own grid."""

    def __init__(self, path: str, ds, variables: list[str], nodata: float | None = None):
        self.path, self.ds, self.variables, self.nodata = path, ds, variables, nodata
        first = ds[variables[0]]
        try:
            self.xdim, self.ydim = first.rio.x_dim, first.rio.y_dim
        except Exception:  # rioxarray's MissingSpatialDimensionError
            raise RasterError(f"{path}: variable {variables[0]!r} has dims {tuple(first.dims)}, no x/y axes; "
                              f"{describe(ds)}") from None
        for v in variables:
            dims = tuple(ds[v].dims)
            if self.xdim not in dims or self.ydim not in dims:
                raise RasterError(f"{path}: variable {v!r} has dims {dims}: not a band (a band spans "
                                  f"{self.ydim} and {self.xdim}); {describe(ds)}")
        extra = [d for d in first.dims if d not in (self.xdim, self.ydim)]
        if len(extra) > 1:
            raise RasterError(f"{path}: variable {variables[0]!r} has dims {tuple(first.dims)}: more than one "
                              f"non-spatial dim; {describe(ds)}")
        self.tdim = extra[0] if extra else None
        for v in variables[1:]:
            if tuple(ds[v].dims) != tuple(first.dims) or ds[v].shape != first.shape:
                raise RasterError(f"{path}: variables {variables[0]!r} {tuple(first.dims)} and {v!r} "
                                  f"{tuple(ds[v].dims)} differ in shape; one sensor's bands share their dims")
        crs = _crs(ds, first)
        if crs is None:
            raise RasterError(f"{path}: the cube has no CRS (no grid-mapping variable, no crs/spatial_ref variable, "
                              f"no epsg attribute); {describe(ds)}")
        x, y = ds[self.xdim].values.astype(np.float64), ds[self.ydim].values.astype(np.float64)
        if len(x) < 2 or len(y) < 2:
            raise RasterError(f"{path}: the cube is {len(x)}x{len(y)} pixels, too small to georeference")
        dx, dy = (x[-1] - x[0]) / (len(x) - 1), (y[-1] - y[0]) / (len(y) - 1)
        if not (np.allclose(np.diff(x), dx, rtol=1e-6) and np.allclose(np.diff(y), dy, rtol=1e-6)):
            raise RasterError(f"{path}: the {self.xdim}/{self.ydim} coordinates are not evenly spaced")
        self.flip = dy > 0  # south-up storage: rows are read reversed so the grid is north-up
        top = y.max() + abs(dy) / 2
        self.grid = Grid(crs, Affine(dx, 0, x[0] - dx / 2, 0, -abs(dy), top), len(x), len(y))
        self.dates = _dates(ds[self.tdim].values) if self.tdim else []
        self.steps: list[int] | None = None  # time steps read; None: all

    @property
    def nsteps(self) -> int:
        if not self.tdim:
            return 1
        return len(self.steps) if self.steps is not None else len(self.dates)

    def read(self, window: Window, variables: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(T, C, h, w)`` float32 physical values and their validity (T = 1 without a time axis)."""
        r0, c0 = int(window.row_off), int(window.col_off)
        r1, c1 = r0 + int(window.height), c0 + int(window.width)
        if self.flip:
            r0, r1 = self.grid.height - r1, self.grid.height - r0
        index = {self.ydim: slice(r0, r1), self.xdim: slice(c0, c1)}
        if self.tdim and self.steps is not None:
            index[self.tdim] = self.steps
        order = [self.tdim, self.ydim, self.xdim] if self.tdim else [self.ydim, self.xdim]
        datas, valids = [], []
        for v in variables or self.variables:
            da = self.ds[v]
            try:
                raw = np.asarray(da.isel(index).transpose(*order).values)
            except (OSError, RuntimeError, ValueError) as e:
                raise RasterError(f"{self.path}: reading {v!r} failed at {window}: {e}") from None
            data, valid = decode(raw if self.tdim else raw[None], da.attrs, self.nodata)
            datas.append(data)
            valids.append(valid)
        data, valid = np.stack(datas, axis=1), np.stack(valids, axis=1)
        if self.flip:
            data, valid = data[..., ::-1, :], valid[..., ::-1, :]
        return data, valid

    def close(self) -> None:
        self.ds.close()


class _Warped:
    """A member read on another grid: each window's source footprint is read and reprojected."""

    def __init__(self, member: _Member, grid: Grid, resampling: Resampling):
        self.member, self.grid, self.resampling = member, grid, resampling

    def __getattr__(self, name):
        return getattr(self.member, name)

    def read(self, window: Window, variables: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        src = self.member.grid
        n = len(variables or self.member.variables)
        t = self.member.nsteps
        bounds = self.grid.window_bounds(window)
        if self.grid.crs != src.crs:
            bounds = rasterio.warp.transform_bounds(self.grid.crs, src.crs, *bounds)
        sw = from_bounds(*bounds, transform=src.transform)
        c0, r0 = max(0, math.floor(sw.col_off) - 2), max(0, math.floor(sw.row_off) - 2)
        c1 = min(src.width, math.ceil(sw.col_off + sw.width) + 2)
        r1 = min(src.height, math.ceil(sw.row_off + sw.height) + 2)
        h, w = int(window.height), int(window.width)
        dest = np.full((t * n, h, w), np.nan, np.float32)
        if c1 > c0 and r1 > r0:
            piece = Window(c0, r0, c1 - c0, r1 - r0)
            data, valid = self.member.read(piece, variables)
            source = np.where(valid, data, np.nan).reshape(t * n, *data.shape[-2:])
            rasterio.warp.reproject(source, dest, src_transform=src.window_transform(piece), src_crs=src.crs,
                                    src_nodata=np.nan, dst_transform=self.grid.window_transform(window),
                                    dst_crs=self.grid.crs, dst_nodata=np.nan, resampling=self.resampling)
        dest = dest.reshape(t, n, h, w)
        return dest, np.isfinite(dest)


class CubeScene(Scene):
    """A sensor's bands from one or more cube files, on one grid, date-major ``(T * C, h, w)``.

    ``physical``: the files declare a CF ``scale_factor`` / ``add_offset``, so the values read are
    physical and ingest stores them in the sensor's own units (its value transform inverted); without
    one, values are the file's stored numbers, taken as the sensor's raw units as a raster's are.
    """

    def __init__(self, members: list, bands: list[tuple[int, str]], grid: Grid, band_names: list[str], name: str,
                 dates: list[datetime], mask: tuple | None = None, physical: bool = False):
        self.physical = physical
        self._cube = members
        self._bands = bands  # per output band: (member index, variable)
        self._mask = mask  # (member, variable, valid values) or None
        single = len(dates) <= 1
        names = band_names if single else [f"{b}@{d:%Y-%m-%d}" for d in dates for b in band_names]
        band_dates = None if single else [d for d in dates for _ in band_names]
        super().__init__([], grid, names, name, band_dates, dates[0] if single and dates else None)
        self._base_names = list(band_names)
        self._nbands = len(band_names)
        self.dates = dates

    @property
    def count(self) -> int:
        return self._nbands * max(1, len(self.dates))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self._cube]

    @property
    def nodata(self) -> float | None:
        return None

    def read(self, window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
        window = window or Window(0, 0, self.grid.width, self.grid.height)
        t = max(1, len(self.dates))
        data = np.zeros((t, self._nbands, int(window.height), int(window.width)), np.float32)
        valid = np.zeros(data.shape, bool)
        for i, member in enumerate(self._cube):
            slots = [k for k, (m, _) in enumerate(self._bands) if m == i]
            if slots:
                d, v = member.read(window, [self._bands[k][1] for k in slots])
                data[:, slots], valid[:, slots] = d, v
        if self._mask is not None:
            member, variable, values = self._mask
            classes, known = member.read(window, [variable])
            valid &= known & np.isin(classes, values)
        return data.reshape(-1, *data.shape[2:]), valid.reshape(-1, *valid.shape[2:])

    def reproject(self, grid: Grid, resampling: Resampling = Resampling.bilinear) -> CubeScene:
        members = [_Warped(getattr(m, "member", m), grid, resampling) for m in self._cube]
        mask = None
        if self._mask is not None:
            member, variable, values = self._mask
            mask = (_Warped(getattr(member, "member", member), grid, Resampling.nearest), variable, values)
        warped = CubeScene(members, self._bands, grid, self._base_names, self.name, self.dates, mask, self.physical)
        warped._parent = self
        return warped

    def close(self) -> None:
        for m in self._cube:
            getattr(m, "member", m).close()
        if self._mask is not None:
            getattr(self._mask[0], "member", self._mask[0]).close()


def open_cube(paths: str | Sequence[str], variables: Sequence[str], band_names: Sequence[str], *,
              time_series: bool = True, date: str | None = None, mask: tuple[str, Sequence[int]] | None = None,
              nodata: float | None = None, resampling: Resampling = Resampling.bilinear) -> CubeScene:
    """The bands ``band_names`` read from cube variables ``variables`` (one per band, in any of ``paths``).

    ``time_series`` keeps every date; otherwise the cube must have one date or ``date`` picks one
    (``"clearest"``: the most valid pixels, after ``mask``; or an ISO date: the nearest step).
    ``mask`` is ``(variable, valid values)``: a per-date quality layer in any of the files.
    ``nodata``: a stored value meaning "missing" beyond what the files declare.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if len(variables) != len(band_names):
        raise ValueError(f"{len(variables)} variables for {len(band_names)} bands")
    datasets = [_open(p) for p in paths]
    try:
        return _assemble(paths, datasets, list(variables), list(band_names), time_series, date, mask, nodata,
                         resampling)
    except Exception:
        for ds in datasets:
            ds.close()
        raise


def _assemble(paths, datasets, variables, band_names, time_series, date, mask, nodata, resampling) -> CubeScene:
    wanted = dict(zip(variables, (f"band {b}" for b in band_names)))
    if mask:
        wanted.setdefault(mask[0], "the mask")
    where = {}
    for v, role in wanted.items():
        holder = next((i for i, ds in enumerate(datasets) if v in ds.data_vars), None)
        if holder is None:
            found = "; ".join(f"{Path(p).name}: {describe(ds)}" for p, ds in zip(paths, datasets))
            raise RasterError(f"{paths[0]}: no variable {v!r} (for {role}) in the cube; found {found}")
        where[v] = holder
    used = sorted({where[v] for v in variables})
    members = {i: _Member(paths[i], datasets[i], [v for v in variables if where[v] == i], nodata) for i in used}
    mask_member = None
    if mask:
        i = where[mask[0]]
        mask_member = members[i] if i in members else _Member(paths[i], datasets[i], [mask[0]])
    everyone = list(members.values()) + ([mask_member] if mask_member and mask_member not in members.values() else [])
    timed = [m for m in everyone if m.tdim]
    for m in timed[1:]:
        if m.dates != timed[0].dates:
            raise RasterError(f"{m.path} and {timed[0].path} hold different dates ({len(m.dates)} vs "
                              f"{len(timed[0].dates)}); one sensor's files must share their time steps")
    dates = timed[0].dates if timed else []
    if dates and not time_series:
        step = _pick_date(date, dates, everyone[0], variables[0], mask_member, mask, paths)
        for m in timed:
            m.steps = [step]
        dates = [dates[step]]
    elif date is not None and time_series:
        raise RasterError(f"{paths[0]}: date {date!r} picks one step, but the source is read as a time series")
    order = sorted(members, key=lambda i: members[i].grid.res[0])
    grid = members[order[0]].grid
    slot = {i: n for n, i in enumerate(used)}
    readers = [members[i] if members[i].grid == grid else _Warped(members[i], grid, resampling) for i in used]
    mask_reader = None
    if mask_member is not None:
        reader = mask_member if mask_member.grid == grid else _Warped(mask_member, grid, Resampling.nearest)
        mask_reader = (reader, mask[0], np.asarray(list(mask[1])))
    bands = [(slot[where[v]], v) for v in variables]
    scaled = {v: any(k in datasets[where[v]][v].attrs for k in ("scale_factor", "add_offset")) for v in variables}
    if len(set(scaled.values())) > 1:
        raise RasterError(f"{paths[0]}: variables {[v for v, s in scaled.items() if s]} declare a scale/offset and "
                          f"{[v for v, s in scaled.items() if not s]} do not; one sensor's bands share one encoding")
    return CubeScene(readers, bands, grid, band_names, paths[0], dates, mask_reader, physical=all(scaled.values()))


def _pick_date(date: str | None, dates: list[datetime], member: _Member, variable: str, mask_member, mask,
               paths: list[str]) -> int:
    if date is None:
        if len(dates) == 1:
            return 0
        raise RasterError(f"{paths[0]}: the cube has {len(dates)} dates ({dates[0]:%Y-%m-%d} .. {dates[-1]:%Y-%m-%d}); "
                          f"read it with time_series: true, or pick one with date: clearest or date: YYYY-MM-DD")
    if date != "clearest":
        try:
            target = datetime.fromisoformat(date)
        except ValueError:
            raise RasterError(f"date {date!r}: expected 'clearest' or an ISO date such as 2018-06-30") from None
        return int(np.argmin([abs((d - target).total_seconds()) for d in dates]))
    g = member.grid
    step = max(1, math.ceil(max(g.width, g.height) / CLEAR_SAMPLES))
    index = {member.ydim: slice(None, None, step), member.xdim: slice(None, None, step)}
    if mask_member is not None:
        da = mask_member.ds[mask[0]]
        classes, known = decode(da.isel(index).transpose(mask_member.tdim, ...).values, da.attrs)
        ok = known & np.isin(classes, list(mask[1]))
    else:
        da = member.ds[variable]
        ok = decode(da.isel(index).transpose(member.tdim, ...).values, da.attrs)[1]
    return int(np.argmax(ok.reshape(len(dates), -1).mean(axis=1)))
