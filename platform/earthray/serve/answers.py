"""A model host's answer -> what the client gets: JSON, or a GeoTIFF on the input's grid."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from earthray.serve.inputs import NODATA_CLASS, SCENE, ModelInfo


def to_json(info: ModelInfo, answer: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, Any]:
    base = {"model": info.name, "task": info.task}
    if info.task in SCENE:
        scores = {c: float(p) for c, p in zip(info.classes, answer["scores"])}
        out = base | {"scores": scores, "top": max(scores, key=scores.get)}
        if info.task == "multilabel":
            out["labels"] = [c for c, p in scores.items() if p >= 0.5]
        return out
    h, w = valid.shape
    invalid = int((~valid).sum())
    if info.task == "segmentation":
        counts = np.bincount(answer["labels"][valid].ravel(), minlength=len(info.classes))
        return base | {"height": h, "width": w, "invalid_pixels": invalid,
                       "pixels": {c: int(n) for c, n in zip(info.classes, counts)},
                       "mean_scores": {c: float(p) for c, p in zip(info.classes, answer["scores"])}}
    values = answer["values"]
    stats = {b: {"mean": float(v[valid].mean()), "min": float(v[valid].min()), "max": float(v[valid].max())}
             for b, v in zip(info.outputs, values)}
    return base | {"height": h, "width": w, "invalid_pixels": invalid, "stats": stats}


def to_geotiff(info: ModelInfo, answer: dict[str, np.ndarray], grid) -> bytes:
    """The answer on the input's grid (CRS and transform; arrays without georeferencing get none): a class map
    with its colour table and class names, or float32 values in the target's physical units."""
    from affine import Affine
    from rasterio.errors import NotGeoreferencedWarning

    from earthray.io import Grid, write_raster

    classes = None
    if info.task == "segmentation":
        data, nodata, names, classes = answer["labels"], NODATA_CLASS, ["class"], info.classes
        tags = {"nodata_class": str(NODATA_CLASS)}
    else:
        data, nodata, names = answer["values"], float("nan"), info.outputs
        tags = {"target": info.target or "", "units": "physical (the target sensor's)"}
    h, w = data.shape[-2:]
    grid = grid or Grid(None, Affine.identity(), w, h)
    with tempfile.TemporaryDirectory(prefix="earthray-answer-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        path = write_raster(Path(tmp) / "answer.tif", data, grid, nodata=nodata,
                            tags={"model": info.name, "task": info.task, **tags}, band_names=names, classes=classes)
        return path.read_bytes()
