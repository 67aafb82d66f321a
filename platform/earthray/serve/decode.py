"""Request bodies -> the model's prepared input, every size checked before the memory is spent.

A body is a GeoTIFF, a ``.npy`` array or JSON (``array``, or base64 ``geotiff`` / ``npy``). What a
decoded input will take is known before decoding it: a GeoTIFF's and a ``.npy``'s headers declare
bands, rows, columns and dtype; a JSON body's parsed size is estimated from its separators (a parsed
number costs about ``JSON_ITEM_BYTES``, a list ``JSON_LIST_BYTES``). Inputs past ``max_pixels`` or
``max_decoded_bytes`` are refused (413) from that; the rest reserve their working memory from the
gateway's budget (``reserve``) and only then are decoded. A ``.npy`` is read in place from the body
(its header must match the bytes that follow), never allocated from what its header claims.

Messages name what is wrong with the client's input, never a server path or an object's repr.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from earthray.serve.inputs import ModelInfo, RequestError, prepare
from earthray.serve.limits import megabytes
from earthray.serve.schemas import PredictJSON

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
NPY_MAGIC = b"\x93NUMPY"
JSON_ITEM_BYTES = 32
JSON_LIST_BYTES = 64
WORKING_BYTES = 9
"""Bytes per band and pixel beyond the raw input while it is prepared: float32 copy, mask, normalised value."""
_INTERNAL = re.compile(r"['\"]?/vsimem/[^\s'\"]*['\"]?:?\s*")


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    max_decoded_bytes: int


def clean(message: str) -> str:
    """A library's error message without the in-memory file paths it names."""
    return " ".join(_INTERNAL.sub("", message).split()) or "unreadable"


def decode(info: ModelInfo, content_type: str, body: bytes, fields: dict[str, Any], limits: DecodeLimits,
           reserve: Callable[[int], None]) -> tuple[dict[str, np.ndarray], Any]:
    """A request body -> the prepared image and the input's grid (None for arrays)."""
    names = _band_list(fields.get("bands"))
    nodata = _nodata(fields.get("nodata"))
    if content_type.startswith("application/json"):
        req = _parse_json(body, limits, reserve)
        given = [k for k in ("array", "geotiff", "npy") if getattr(req, k) is not None]
        if len(given) != 1:
            raise RequestError(f"give exactly one of 'array', 'geotiff', 'npy' (got {', '.join(given) or 'none'})")
        names = req.bands or names
        nodata = _nodata(req.nodata) if req.nodata is not None else nodata
        if req.array is not None:
            array = _json_array(req.array)
            _check(array.shape, array.dtype, limits, reserve, "the JSON array", reserved=True)
            return _from_array(info, array, names, nodata), None
        try:
            body = base64.b64decode(getattr(req, given[0]), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"'{given[0]}' is not valid base64") from None
    if body.startswith(NPY_MAGIC):
        return _from_array(info, _npy(body, limits, reserve), names, nodata), None
    if body[:4] in TIFF_MAGIC:
        return _from_geotiff(info, body, names, nodata, limits, reserve)
    raise RequestError("the body is not an image: expected a GeoTIFF, a .npy array, or JSON "
                       "(Content-Type: application/json)", 415)


def _check(shape: tuple[int, ...], dtype: np.dtype, limits: DecodeLimits, reserve: Callable[[int], None],
           what: str, reserved: bool = False) -> None:
    """Refuse an input whose declared shape or size passes the limits; reserve what decoding it takes."""
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise RequestError(f"expected an array (bands, rows, cols); {what} has {len(shape)} dimensions {shape}")
    bands, height, width = shape
    if min(shape) < 1:
        raise RequestError(f"{what} has shape {shape}; every dimension must be at least 1")
    if height * width > limits.max_pixels:
        raise RequestError(f"image of {height}x{width} = {height * width} pixels exceeds the limit of "
                           f"{limits.max_pixels} (max_pixels); split it", 413)
    if dtype.kind not in "iuf":
        raise RequestError(f"pixel values must be integers or floats; {what} holds {_dtype_name(dtype)}")
    decoded = bands * height * width * dtype.itemsize
    if decoded > limits.max_decoded_bytes:
        raise RequestError(f"{what} decodes to {bands} bands x {height} x {width} pixels x {dtype.itemsize} bytes "
                           f"({dtype.name}) = {megabytes(decoded)}, more than the limit of "
                           f"{megabytes(limits.max_decoded_bytes)} (max_decoded_bytes); send fewer pixels or bands, "
                           "or a smaller dtype", 413)
    reserve(bands * height * width * WORKING_BYTES + (0 if reserved else decoded))


def _dtype_name(dtype: np.dtype) -> str:
    if dtype.fields:
        return "structured records"
    return {"O": "Python objects", "c": "complex numbers", "b": "booleans", "U": "text", "S": "bytes",
            "M": "dates", "m": "time spans"}.get(dtype.kind, dtype.name)


def _parse_json(body: bytes, limits: DecodeLimits, reserve: Callable[[int], None]) -> PredictJSON:
    estimate = len(body) + JSON_ITEM_BYTES * body.count(b",") + JSON_LIST_BYTES * body.count(b"[")
    if estimate > limits.max_decoded_bytes:
        raise RequestError(f"the JSON body of {megabytes(len(body))} would take about {megabytes(estimate)} to "
                           f"parse, more than the limit of {megabytes(limits.max_decoded_bytes)} "
                           "(max_decoded_bytes); send large images as a GeoTIFF or .npy body", 413)
    reserve(estimate)
    try:
        doc = json.loads(body)
    except RecursionError:
        raise RequestError("invalid JSON: nested too deeply (a request is an object holding a 3-level array)",
                           400) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"invalid JSON: {e}", 400) from None
    except ValueError as e:  # a number past Python's integer-string limit (4300 digits)
        raise RequestError(f"invalid JSON: a number is too long ({str(e)[:80]})", 400) from None
    if not isinstance(doc, dict):
        raise RequestError("the JSON body must be an object with 'array', 'geotiff' or 'npy'")
    try:
        return PredictJSON.model_validate(doc)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()]
        raise RequestError("; ".join(problems[:5])) from None


def _band_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value] or None


def _nodata(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RequestError(f"nodata must be a number or 'nan', got {str(value)[:40]!r}") from None


def _json_array(value: list) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, RecursionError):  # ragged, or nested past numpy's dimensions
        raise RequestError("'array' must be a rectangular bands x rows x cols list of numbers") from None
    if array.dtype == object:
        raise RequestError("'array' must be a rectangular bands x rows x cols list of numbers (ragged, or holds "
                           "null / non-numbers)")
    return array


def _npy(body: bytes, limits: DecodeLimits, reserve: Callable[[int], None]) -> np.ndarray:
    """The array a ``.npy`` body holds, read in place after its header was checked against the limits."""
    fmt = np.lib.format
    stream = io.BytesIO(body)
    try:
        version = fmt.read_magic(stream)
        shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(stream)
    except Exception:  # numpy parses the header as a Python literal: garbage raises errors of many kinds
        raise RequestError("not a usable .npy array: its header is malformed") from None
    _check(tuple(shape), dtype, limits, reserve, "the .npy array")
    count = math.prod(shape)
    data = len(body) - stream.tell()
    if data != count * dtype.itemsize:
        raise RequestError(f"not a usable .npy array: its header declares shape {tuple(shape)} of {dtype.name} "
                           f"({count * dtype.itemsize} bytes) but {data} bytes follow it")
    return np.frombuffer(body, dtype, count, stream.tell()).reshape(shape, order="F" if fortran else "C")


def _from_array(info: ModelInfo, array: np.ndarray, names, nodata) -> dict[str, np.ndarray]:
    if array.ndim == 2:
        array = array[None]
    info, order = info.select(names, array.shape[0])
    info.check_size(*array.shape[1:])
    return prepare(info, array[order], None, "sensor" if nodata is None else nodata)


def _from_geotiff(info: ModelInfo, body: bytes, names, nodata, limits: DecodeLimits, reserve):
    import rasterio
    from rasterio.io import MemoryFile

    from earthray.io import Grid, RasterError, open_scene

    with MemoryFile(body, ext=".tif") as mem:
        try:
            with mem.open() as ds:
                count, (height, width), dtypes = ds.count, ds.shape, [np.dtype(d) for d in ds.dtypes]
                descriptions, file_nodata = ds.descriptions, ds.nodata
                grid = Grid(ds.crs, ds.transform, width, height)
        except rasterio.errors.RasterioError as e:
            raise RequestError(f"not a readable GeoTIFF: {clean(str(e))}", 415) from None
        widest = max(dtypes, key=lambda d: d.itemsize)
        odd = next((d for d in dtypes if d.kind not in "iuf"), widest)
        _check((count, height, width), odd, limits, reserve, "the GeoTIFF")
        if names is None and all(descriptions):
            names = list(descriptions)
        info, order = info.select(names, count)
        info.check_size(height, width)
        fallback = nodata if nodata is not None else info.sensors[0].nodata
        try:
            with open_scene(mem.name, nodata=fallback) as scene:
                data, valid = scene.read()
        except RasterError as e:
            raise RequestError(f"cannot read the GeoTIFF's pixels: {clean(str(e))}") from None
    declared = file_nodata if file_nodata is not None else fallback
    nan_nodata = declared is not None and math.isnan(declared)
    return prepare(info, data[order], valid[order], declared, nan_is_nodata=nan_nodata), grid
