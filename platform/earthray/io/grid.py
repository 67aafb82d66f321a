"""A raster grid (CRS + affine transform + size): what co-registration aligns scenes onto."""

from __future__ import annotations

from dataclasses import dataclass

from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from rasterio.windows import transform as window_transform


@dataclass(frozen=True)
class Grid:
    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @property
    def res(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return window_bounds(Window(0, 0, self.width, self.height), self.transform)

    def window_transform(self, window: Window) -> Affine:
        return window_transform(window, self.transform)

    def window_bounds(self, window: Window) -> tuple[float, float, float, float]:
        return window_bounds(window, self.transform)

    def crs_string(self) -> str:
        if self.crs is None:
            return ""
        epsg = self.crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else self.crs.to_wkt()
