"""What a fine-tuned model accepts and how raw pixels become its input (numpy only).

Shared by the online app (``earthray.serve.app``) and batch inference (``earthray.serve.infer``), so a
pixel is checked, normalised and predicted the same way whichever path it takes, and the same way
training fed the model: physical = ``sensor.transform.apply(raw)``, ``(physical - mean) / std`` with the
bundle's statistics, 0 wherever a pixel is invalid (``earthray.data.pipeline.normalise``).

Rules for input pixels (documented in ``serve/README.md``):

- bands are matched by name (``B4``, or ``sensor:B4`` where a band name occurs in several input
  sensors); without names, the count must equal the model's and the order is the model's;
- dtype must be an integer or float type; values of a sensor stored as integers must be whole numbers
  in that integer type's range (the check ingest makes), so reflectances sent to a DN model are refused;
- a pixel is valid when every band of its sensor is valid: not masked, not the declared nodata
  (the input's own, else the sensor catalogue's), finite;
- NaN/inf count as missing only where NaN is the declared nodata (a float GeoTIFF with nodata NaN, or
  ``nodata=nan`` with an array); otherwise they are refused (they usually mean an upstream bug).
  Batch inference follows ingest instead: non-finite pixels of a scene are missing;
- an input with no valid pixel is refused.

Dense tasks (segmentation, regression, translation) take any image at least ``input_size`` on each
side: it is cut into ``input_size`` windows overlapping by ``overlap`` (the last window flush with the
far edge) and the windows' outputs are blended with a separable Hann weight (``blend_weight``),
probabilities for class outputs, physical values for regression. Scene-level tasks (classification,
multilabel) take exactly ``input_size`` x ``input_size``.

The model itself is in ``earthray.serve.predictor``. This module does not import torch, so the processes
that only read and check pixels (batch inference's read tasks) do not pay for it: about 480 MB each here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from earthray.data.chipper import fits
from earthray.data.pipeline import SensorNorm, normalise
from earthray.errors import ConfigError, EarthrayError
from earthray.sensors import Sensor
from earthray.task_types import TASKS

SCENE = tuple(t for t, kind in TASKS.items() if not kind.dense)
DENSE = tuple(t for t, kind in TASKS.items() if kind.dense and kind.dates == 1)
"""The tasks served: one date per request (change detection needs two)."""
NODATA_CLASS = 255


class RequestError(EarthrayError, ValueError):
    """An input the model cannot take; ``status`` is the HTTP status the app answers with, ``headers`` any
    headers the answer needs (``Retry-After``, ``Connection: close``)."""

    def __init__(self, message: str, status: int = 422, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or {}


# ---------------------------------------------------------------------------------------------- the contract


@dataclass
class ModelInfo:
    """What a bundle accepts and answers, from its metadata alone (no weights loaded)."""

    name: str
    source: str
    task: str
    sensors: list[Sensor]
    """The input sensors, in the model's order."""
    stats: dict[str, dict[str, list[float]]]
    input_size: int
    classes: list[str] | None = None
    target: str | None = None
    target_bands: list[str] | None = None
    recipe: str = ""
    preset: str = ""
    bands: list[tuple[str, str]] = field(default_factory=list)
    """(sensor, band) for every input band, in the order the model takes them."""

    @classmethod
    def from_meta(cls, name: str, source: str, meta: dict[str, Any]) -> ModelInfo:
        head = meta.get("head_spec")
        if not head:
            raise ConfigError(f"model {name!r} ({source}): the bundle has no task head; only fine-tuned bundles "
                             "are served")
        task = head["task"]
        if task not in DENSE + SCENE:
            raise ConfigError(f"model {name!r} ({source}): task {task!r} is not served (change detection needs two "
                             f"dates per request); served tasks: {', '.join(DENSE + SCENE)}")
        sensors = {s["name"]: Sensor.model_validate(s) for s in meta["sensors"]}
        inputs = head.get("inputs") or [n for n in sensors if n != head.get("target")]
        info = cls(name=name, source=str(source), task=task, sensors=[sensors[n] for n in inputs],
                   stats={n: meta["normalisation"][n] for n in inputs}, input_size=int(meta["input_size"]),
                   classes=meta.get("classes") or head.get("classes"), target=head.get("target"),
                   target_bands=head.get("target_bands"), recipe=meta.get("recipe", ""),
                   preset=meta.get("preset", ""))
        info.bands = [(s.name, b) for s in info.sensors for b in s.band_names]
        return info

    @property
    def dense(self) -> bool:
        return self.task in DENSE

    @property
    def band_names(self) -> list[str]:
        """Names a client uses: the bare band name, or ``sensor:band`` where it is ambiguous."""
        counts: dict[str, int] = {}
        for _, b in self.bands:
            counts[b] = counts.get(b, 0) + 1
        return [b if counts[b] == 1 else f"{s}:{b}" for s, b in self.bands]

    @property
    def outputs(self) -> list[str]:
        """Names of the answer's channels: classes, or the target's bands."""
        return list(self.classes) if TASKS[self.task].classes else list(self.target_bands or [])

    def card(self) -> dict[str, Any]:
        return {
            "name": self.name, "task": self.task, "recipe": self.recipe, "preset": self.preset,
            "sensors": [{"name": s.name, "bands": s.band_names, "dtype": s.dtype, "nodata": s.nodata}
                        for s in self.sensors],
            "bands": self.band_names, "input_size": self.input_size,
            "size": ("any height and width >= input_size (tiled)" if self.dense
                     else "exactly input_size x input_size"),
            "classes": self.classes, "target": self.target, "target_bands": self.target_bands,
        }

    # -- checks ---------------------------------------------------------------------------------------

    def select(self, names: Sequence[str] | None, count: int) -> tuple[ModelInfo, list[int]]:
        """The model restricted to the sensors the input carries in full, and the indices into the input's
        ``count`` bands giving those sensors' bands in the model's order.

        A multi-sensor model answers from any non-empty subset of its sensors: the absent ones drop out of
        the fusion (``fuse_sensors``), as in MaRS's missing-modality setting. A sensor given in part is refused.
        """
        expected = ", ".join(self.band_names)
        if not names:
            if count != len(self.bands):
                raise RequestError(f"model {self.name!r} takes {len(self.bands)} bands ({expected}); the input has "
                                   f"{count} (name the input's bands to pick a subset)")
            return self, list(range(count))
        names = [str(n).strip() for n in names]
        if len(names) != count:
            raise RequestError(f"{len(names)} band names given ({', '.join(names)}) for an input with {count} bands")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RequestError(f"duplicate band names {dup}")
        where: dict[tuple[str, str], int] = {}
        for i, n in enumerate(names):
            if ":" in n:
                sensor, band = n.split(":", 1)
                matches = [(s, b) for s, b in self.bands if s == sensor and b == band]
            else:
                matches = [(s, b) for s, b in self.bands if b == n]
                if len(matches) > 1:
                    raise RequestError(f"band name {n!r} is ambiguous for model {self.name!r}; write "
                                       f"{' or '.join(f'{s}:{b}' for s, b in matches)}")
            for m in matches:
                where[m] = i
        label = dict(zip(self.bands, self.band_names))
        listed = {s.name: ", ".join(label[(s.name, b)] for b in s.band_names) for s in self.sensors}
        present = []
        for s in self.sensors:
            missing = [label[(s.name, b)] for b in s.band_names if (s.name, b) not in where]
            if missing and (len(missing) < len(s.bands) or len(self.sensors) == 1):
                of = f" for {s.name}" if len(self.sensors) > 1 else ""
                raise RequestError(f"model {self.name!r} needs bands {listed[s.name]}{of}; missing "
                                   f"{', '.join(missing)} (the input has {', '.join(names)})")
            if not missing:
                present.append(s.name)
        if not present:
            options = "; ".join(f"{n}: {bands}" for n, bands in listed.items())
            raise RequestError(f"model {self.name!r} needs every band of at least one of its sensors ({options}); "
                               f"the input has {', '.join(names)}")
        sub = self if len(present) == len(self.sensors) else self.only(present)
        return sub, [where[key] for key in sub.bands]

    def only(self, sensors: Sequence[str]) -> ModelInfo:
        """This contract restricted to some of its input sensors (kept in the model's order)."""
        keep = [s for s in self.sensors if s.name in sensors]
        return replace(self, sensors=keep, stats={s.name: self.stats[s.name] for s in keep},
                       bands=[(s, b) for s, b in self.bands if s in sensors])

    def check_size(self, height: int, width: int) -> None:
        s = self.input_size
        if self.dense and (height < s or width < s):
            raise RequestError(f"model {self.name!r} needs images at least {s}x{s} pixels; got {height}x{width}")
        if not self.dense and (height, width) != (s, s):
            raise RequestError(f"model {self.name!r} ({self.task}) classifies {s}x{s} chips; got {height}x{width} "
                               "(cut the image into chips of that size)")


def prepare(info: ModelInfo, data: np.ndarray, valid: np.ndarray | None = None,
            nodata: float | None | str = "sensor", nan_is_nodata: bool = False,
            require_valid: bool = True) -> dict[str, np.ndarray]:
    """Raw pixels ``(C, H, W)`` in ``info``'s band order -> ``{sensor: (C_s, H, W) float32, sensor.valid: (H, W)}``.

    ``info`` is the model's contract, or the part of it an input carries (``ModelInfo.select``).

    ``valid`` (per band, like ``Scene.read``'s) comes from the source's masks; ``nodata`` is the value
    that marks missing pixels (NaN allowed), ``"sensor"`` each sensor's catalogue value, None none;
    ``nan_is_nodata`` counts every non-finite value as missing; ``require_valid`` refuses an input
    without a valid pixel (a request; a scene's border window is just empty).
    """
    if data.ndim != 3 or data.shape[0] != len(info.bands):
        raise RequestError(f"expected an array of shape ({len(info.bands)}, height, width), got {tuple(data.shape)}")
    if data.dtype.kind not in "iuf":
        raise RequestError(f"pixel values must be integers or floats; got dtype {data.dtype}")
    valid = np.ones(data.shape, bool) if valid is None else valid.astype(bool, copy=True)
    per_band = [s.nodata for s in info.sensors for _ in s.bands] if nodata == "sensor" else [nodata] * len(data)
    nan_declared = nan_is_nodata or any(v is not None and math.isnan(v) for v in per_band)
    for i, v in enumerate(per_band):
        if v is not None and not math.isnan(v) and _representable(v, data.dtype):
            valid[i] &= data[i] != np.asarray(v).astype(data.dtype)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not nan_declared and not finite.all():
            band, row, col = (int(v[0]) for v in np.nonzero(~finite))
            raise RequestError(f"band {info.band_names[band]} has {int((~finite[band]).sum())} NaN/inf values "
                               f"(first at row {row}, column {col}); NaN counts as missing only where it is the "
                               "declared nodata (nodata=nan)")
        valid &= finite
    out: dict[str, np.ndarray] = {}
    start = 0
    for s in info.sensors:
        part, ok = data[start:start + len(s.bands)], valid[start:start + len(s.bands)].all(axis=0)
        start += len(s.bands)
        dtype = np.dtype(s.dtype)
        if dtype.kind in "iu" and part.dtype != dtype and not fits(part[:, ok], dtype):
            lo, hi = (float(part[:, ok].min()), float(part[:, ok].max())) if ok.any() else (0.0, 0.0)
            raise RequestError(f"values of {s.name} do not fit its stored type {dtype} (range {lo:g}..{hi:g}); "
                               f"the model takes raw {dtype} values, e.g. digital numbers, not scaled ones")
        stats = info.stats[s.name]
        out[s.name] = normalise(part, SensorNorm.of(s.transform, stats["mean"], stats["std"]), ok, axis=0)
        out[f"{s.name}.valid"] = ok
    if require_valid and not pixel_valid(info, out).any():
        raise RequestError("the input has no valid pixel (every pixel is masked, nodata or NaN)")
    return out


def _representable(value: float, dtype: np.dtype) -> bool:
    if dtype.kind in "iu":
        return float(value).is_integer() and np.iinfo(dtype).min <= value <= np.iinfo(dtype).max
    return True


def pixel_valid(info: ModelInfo, image: dict[str, np.ndarray]) -> np.ndarray:
    """Where every sensor the input carries is valid: where an answer is given (elsewhere: nodata).

    A sensor is carried when its ``.valid`` key is there and, for batches, its ``.present`` flag is set.
    """
    masks = []
    for s in info.sensors:
        if f"{s.name}.valid" not in image:
            continue
        valid = image[f"{s.name}.valid"]
        if f"{s.name}.present" in image:
            absent = ~np.asarray(image[f"{s.name}.present"], bool)
            valid = valid | absent.reshape(absent.shape + (1,) * (valid.ndim - absent.ndim))
        masks.append(valid)
    return np.logical_and.reduce(masks)


# ---------------------------------------------------------------------------------------------- tiling


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Window starts along one axis: every ``size - round(size * overlap)`` pixels, the last flush with the end."""
    if length < size:
        raise ValueError(f"length {length} is smaller than the window {size}")
    stride = max(1, size - int(round(size * overlap)))
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def blend_weight(size: int) -> np.ndarray:
    """Separable Hann weight ``(size, size)``, highest in the middle and positive up to the edge, so a window's
    border (where its context is cut off) counts least where windows overlap."""
    w = 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(size) + 0.5) / size)
    return np.outer(w, w).astype(np.float32)
