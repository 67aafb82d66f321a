"""Raster I/O on rasterio: scenes from GeoTIFF/COG, ENVI, Sentinel-2 SAFE and band stacks; writers."""

from earthray.io.grid import Grid
from earthray.io.open import open_scene
from earthray.io.quicklook import quicklook
from earthray.io.scene import RasterError, Scene
from earthray.io.write import RasterWriter, category_sidecar, write_raster

__all__ = ["Grid", "RasterError", "RasterWriter", "Scene", "category_sidecar", "open_scene", "quicklook", "write_raster"]
