"""Raster I/O on rasterio: scenes from GeoTIFF/COG, ENVI, Sentinel-2 SAFE and band stacks; writers."""

from earthray.io.categories import category_sidecar, read_categories
from earthray.io.grid import Grid
from earthray.io.open import open_scene
from earthray.io.quicklook import quicklook
from earthray.io.scene import RasterError, Scene
from earthray.io.write import RasterWriter, write_raster

__all__ = ["Grid", "RasterError", "RasterWriter", "Scene", "category_sidecar", "open_scene", "quicklook",
           "read_categories", "write_raster"]
