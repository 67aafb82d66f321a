"""A fine-tuned bundle as a predictor: what it accepts, how raw pixels become its input, tiled prediction.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from earthray.data.chipper import fits
from earthray.data.pipeline import SensorNorm, normalise
from earthray.errors import ConfigError, EarthrayError
from earthray.sensors import Sensor
from earthray.tasks import TASKS

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


# ---------------------------------------------------------------------------------------------- prediction


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Predictor:
    """A loaded fine-tuned model with the contract it was checked against."""

    def __init__(self, model, info: ModelInfo, device: str = "cpu", max_tiles: int = 16, overlap: float = 0.25):
        self.model = model.to(device).eval()
        self.info = info
        self.device = device
        self.max_tiles = max_tiles
        self.overlap = overlap
        self._weight = blend_weight(info.input_size)

    @classmethod
    def load(cls, name: str, source: str | Path, tracking_uri: str | None = None, device: str = "auto",
             **kwargs) -> Predictor:
        """``source``: a bundle folder or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``."""
        from earthray.bundle import load_bundle
        from earthray.tasks import TaskModel

        bundle = load_bundle(source, tracking_uri=tracking_uri)
        info = ModelInfo.from_meta(name, str(source), bundle.meta)
        device = pick_device(device)
        return cls(TaskModel.from_bundle(bundle), info, device, **kwargs)

    @torch.inference_mode()
    def forward(self, batch: dict[str, np.ndarray], embed: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Prepared windows ``{sensor: (B, C, S, S), sensor.valid: (B, S, S)}`` -> answers in the task's units:
        class probabilities ``(B, K)`` / ``(B, K, S, S)`` or physical target values ``(B, T, S, S)``;
        with ``embed``, also each window's encoder embedding ``(B, D)`` (last level, mean-pooled)."""
        n = len(next(iter(batch.values())))
        tensors: dict[str, torch.Tensor] = {}
        for s in self.info.sensors:
            if s.name not in batch:  # absent from every window: left out of the fusion
                continue
            for key in (s.name, f"{s.name}.valid", f"{s.name}.present"):
                value = batch[key] if key in batch else np.ones(n, bool)
                tensors[key] = torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
        emb = None
        if embed:  # TaskModel.predict, keeping the features it computes on the way
            feats = self.model.features(tensors)
            emb = feats[-1].float().mean(dim=(2, 3)).cpu().numpy()
            size = next(t for k, t in tensors.items() if "." not in k).shape[-2:]
            out = self.model.head(feats) if self.info.task in SCENE else self.model.head(feats, size)
        else:
            out = self.model.predict(tensors)
        out = out.float()
        task = self.info.task
        if task == "multilabel":
            out = out.sigmoid()
        elif task in ("classification", "segmentation"):
            out = out.softmax(dim=1)
        else:
            out = self.model.denormalise(out)
        return out.cpu().numpy(), emb

    def predict(self, images: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Whole prepared images -> per image ``(K,)`` or ``(K, H, W)``, windows batched across the images.

        Images may carry different subsets of the model's sensors; in a batch, a sensor some windows lack is
        zeros there with its ``.present`` flag off.
        """
        s = self.info.input_size
        tiles: list[tuple[int, int, int]] = []
        shapes = []
        for i, img in enumerate(images):
            h, w = next(v for k, v in img.items() if k.endswith(".valid")).shape
            self.info.check_size(h, w)
            shapes.append((h, w))
            tiles += [(i, r, c) for r in tile_starts(h, s, self.overlap) for c in tile_starts(w, s, self.overlap)]
        single = [sum(1 for t in tiles if t[0] == i) == 1 for i in range(len(images))]
        results: list[np.ndarray | None] = [None] * len(images)
        weights: list[np.ndarray | None] = [None] * len(images)
        for lo in range(0, len(tiles), self.max_tiles):
            chunk = tiles[lo:lo + self.max_tiles]
            batch: dict[str, np.ndarray] = {}
            for sensor in self.info.sensors:
                carried = [sensor.name in images[i] for i, _, _ in chunk]
                if not any(carried):
                    continue
                blank, nowhere = np.zeros((len(sensor.bands), s, s), np.float32), np.zeros((s, s), bool)
                batch[sensor.name] = np.stack([images[i][sensor.name][:, r:r + s, c:c + s] if has else blank
                                               for (i, r, c), has in zip(chunk, carried)])
                batch[f"{sensor.name}.valid"] = np.stack(
                    [images[i][f"{sensor.name}.valid"][r:r + s, c:c + s] if has else nowhere
                     for (i, r, c), has in zip(chunk, carried)])
                batch[f"{sensor.name}.present"] = np.array(carried)
            out, _ = self.forward(batch)
            for (i, r, c), o in zip(chunk, out):
                if single[i]:
                    results[i] = o
                    continue
                if results[i] is None:
                    h, w = shapes[i]
                    results[i] = np.zeros((o.shape[0], h, w), np.float32)
                    weights[i] = np.zeros((h, w), np.float32)
                results[i][:, r:r + s, c:c + s] += o * self._weight
                weights[i][r:r + s, c:c + s] += self._weight
        return [res if weights[i] is None else res / weights[i] for i, res in enumerate(results)]

    def answer(self, out: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
        """A prediction in the compact form the app returns: scores (scene tasks), a ``uint8`` class map with
        255 where the input was invalid plus mean class scores (segmentation), or values with NaN there."""
        if self.info.task in SCENE:
            return {"scores": out}
        if self.info.task == "segmentation":
            labels = out.argmax(0).astype(np.uint8)
            labels[~valid] = NODATA_CLASS
            return {"labels": labels, "scores": out[:, valid].mean(axis=1)}
        values = out.astype(np.float32, copy=True)
        values[:, ~valid] = np.nan
        return {"values": values}

    def predict_answers(self, images: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        outs = self.predict(images)
        return [self.answer(o, pixel_valid(self.info, img)) for o, img in zip(outs, images)]
