"""The Ray Serve application: fine-tuned heads online, many models on one deployment.

Two deployments (import path ``earthray.serve.app:build_app``, an application builder taking the
``args`` of a Serve config file, see ``AppArgs``):

- ``Gateway`` (FastAPI ingress, cheap replicas): authentication, decoding (GeoTIFF, ``.npy``, JSON),
  the checks of ``earthray.serve.predictor`` against each model's contract, normalisation with the
  bundle's statistics, formatting of answers (JSON or GeoTIFF). Every client mistake is a 4xx
  ``{"error": ...}`` here, before the model is involved.
- ``ModelServer`` (the models): ``@serve.multiplexed`` keeps at most ``max_models_per_replica`` models per
  replica (LRU; the router sends a model's requests to replicas that hold it), and one ``@serve.batch``
  method batches requests dynamically. Serve splits every batch by multiplexed model id, so a batch
  only ever holds one model's requests; the batched method reads that id with
  ``serve.get_multiplexed_model_id()``. The gateway calls it through
  ``handle.options(multiplexed_model_id="NAME|SOURCE")``, SOURCE being the bundle the gateway checked
  requests against (a registry alias pinned to its version).

Overload: each deployment has ``max_queued_requests``; beyond it Serve rejects with 503 and a
``Retry-After`` header (``backpressure_config``), and the gateway turns a rejection by the model host
into the same 503 with a JSON body.

Building the app does no I/O (``serve build``, config checks work offline). Each gateway replica reads
the models' metadata when it starts, resolving ``models:/landcover@champion`` to the version the alias
names then; that version is what its requests are served by (redeploy to follow the alias).
"""

import asyncio
import base64
import binascii
import hmac
import io
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from earthray.config import ConfigError, StrictModel, format_validation_error, resolve_path
from earthray.serve.predictor import NODATA_CLASS, SCENE, ModelInfo, Predictor, RequestError, pixel_valid, prepare

IMPORT_PATH = "earthray.serve.app:build_app"
TOKEN_ENV = "EARTHRAY_SERVE_TOKEN"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_NPY_MAGIC = b"\x93NUMPY"


class AppArgs(StrictModel):
    """The ``args`` of the application in a Serve config file."""

    models: dict[str, str] = Field(min_length=1, description="name -> bundle folder or models:/NAME@ALIAS URI")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI for models:/ (default: MLFLOW_TRACKING_URI)")
    max_models_per_replica: int = Field(3, ge=1, description="models a ModelServer replica keeps loaded (LRU)")
    max_batch_size: int = Field(8, ge=1, description="requests per dynamic batch; also windows per forward pass")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    max_pixels: int = Field(2048 * 2048, ge=1, description="largest height x width accepted (413 beyond)")
    max_request_bytes: int = Field(64 * 2**20, ge=1024, description="largest request body (413 beyond)")
    auth_token: str | None = Field(None, description=f"bearer token required on /models* (or env {TOKEN_ENV})")
    overlap: float = Field(0.25, ge=0, lt=1, description="window overlap when tiling large images")
    device: str = Field("auto", description="auto (cuda if present), cpu, cuda, cuda:N")
    max_ongoing_requests: int = Field(16, ge=1, description="per ModelServer replica; at least max_batch_size")
    max_queued_requests: int = Field(64, ge=-1, description="per deployment; beyond it 503 + Retry-After")
    retry_after_s: float = Field(1.0, ge=0, description="the Retry-After a rejected request is given")

    @model_validator(mode="after")
    def _batches_can_fill(self) -> "AppArgs":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches never fill")
        return self

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [n for n in v if not _NAME.match(n)]
        if bad:
            raise ValueError(f"model names must be letters, digits, '_', '.', '-' (used in URLs): {bad}")
        return v


def parse_args(args: dict[str, Any] | AppArgs) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "earthray serve args")) from None


def model_infos(args: AppArgs) -> dict[str, ModelInfo]:
    """Each model's contract from its bundle metadata; registry aliases pinned to the version they name now."""
    from earthray import registry
    from earthray.bundle import BundleError, local_bundle, read_meta

    infos = {}
    for name, source in args.models.items():
        try:
            if registry.is_registry_uri(source):
                reg_name, version = registry.resolve(source, args.tracking_uri)
                source = f"{registry.SCHEME}{reg_name}/{version}"
            infos[name] = ModelInfo.from_meta(name, source, read_meta(local_bundle(source, args.tracking_uri)))
        except (BundleError, LookupError, OSError, ValueError) as e:
            raise ConfigError(f"model {name!r} ({args.models[name]}): {e}") from None
    return infos


# ---------------------------------------------------------------------------------------------- model host


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
class ModelServer:
    """Loads models on demand (multiplexed) and predicts batches of one model's requests."""

    def __init__(self, args: dict[str, Any]):
        self.args = parse_args(args)

        async def load(model_id: str) -> Predictor:
            name, _, source = model_id.partition("|")
            if name not in self.args.models:
                raise KeyError(f"model {name!r} is not configured here")
            return await asyncio.to_thread(Predictor.load, name, source, self.args.tracking_uri,
                                           self.args.device, max_tiles=self.args.max_batch_size,
                                           overlap=self.args.overlap)

        self._load = load
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.args.max_models_per_replica)(load)
        self.batches = self.requests = 0
        self._batched.set_max_batch_size(self.args.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    async def ready(self) -> bool:
        return True

    async def loaded_models(self) -> list[str]:
        """Models (``NAME|SOURCE``) this replica holds now, least recently used first."""
        wrapper = getattr(self._load, "__serve_multiplex_wrapper", None)
        return list(wrapper.models) if wrapper else []

    async def batch_stats(self) -> dict[str, int]:
        """Batches run and requests in them since the replica started (mean batch size = requests / batches)."""
        import torch

        return {"batches": self.batches, "requests": self.requests, "torch_threads": torch.get_num_threads()}

    async def predict(self, image: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self._batched(image)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, images: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        predictor = await self.get_model(serve.get_multiplexed_model_id())
        self.batches, self.requests = self.batches + 1, self.requests + len(images)
        return await asyncio.to_thread(predictor.predict_answers, images)


# ---------------------------------------------------------------------------------------------- decoding


def decode(info: ModelInfo, content_type: str, body: bytes, fields: dict[str, Any], max_pixels: int
           ) -> tuple[dict[str, np.ndarray], Any]:
    """A request body -> the prepared image and the input's grid (None for arrays)."""
    names = _band_list(fields.get("bands"))
    nodata = _nodata(fields.get("nodata"))
    if content_type.startswith("application/json"):
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"invalid JSON: {e}", 400) from None
        if not isinstance(doc, dict):
            raise RequestError("the JSON body must be an object with 'array', 'geotiff' or 'npy'", 422)
        try:
            req = PredictJSON.model_validate(doc)
        except ValidationError as e:
            raise RequestError(format_validation_error(e, "request").replace("\n", "; "), 422) from None
        given = [k for k in ("array", "geotiff", "npy") if getattr(req, k) is not None]
        if len(given) != 1:
            raise RequestError(f"give exactly one of 'array', 'geotiff', 'npy' (got {given or 'none'})", 422)
        names = req.bands or names
        nodata = _nodata(req.nodata) if req.nodata is not None else nodata
        if req.array is not None:
            return _from_array(info, _json_array(req.array), names, nodata, max_pixels), None
        try:
            body = base64.b64decode(getattr(req, given[0]), validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"'{given[0]}' is not valid base64: {e}", 422) from None
    if body.startswith(_NPY_MAGIC):
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except ValueError as e:
            raise RequestError(f"not a usable .npy array: {e}", 422) from None
        return _from_array(info, array, names, nodata, max_pixels), None
    if body[:4] in _TIFF_MAGIC:
        return _from_geotiff(info, body, names, nodata, max_pixels)
    raise RequestError("the body is not an image: expected a GeoTIFF, a .npy array, or JSON "
                       "(Content-Type: application/json)", 415)


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
        raise RequestError(f"nodata must be a number or 'nan', got {value!r}", 422) from None


def _json_array(value: list) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError as e:  # ragged
        raise RequestError(f"'array' must be a rectangular bands x rows x cols list: {e}", 422) from None
    if array.dtype == object:
        raise RequestError("'array' must be a rectangular bands x rows x cols list of numbers (ragged, or holds "
                           "null / non-numbers)", 422)
    return array


def _check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise RequestError(f"image of {height}x{width} = {height * width} pixels exceeds the limit of "
                           f"{max_pixels}; split it", 413)


def _from_array(info: ModelInfo, array: np.ndarray, names, nodata, max_pixels) -> dict[str, np.ndarray]:
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise RequestError(f"expected an array (bands, rows, cols); got {array.ndim} dimensions {array.shape}", 422)
    _check_pixels(array.shape[1], array.shape[2], max_pixels)
    if array.dtype.kind not in "iuf":
        raise RequestError(f"pixel values must be integers or floats; got dtype {array.dtype}", 422)
    info, order = info.select(names, array.shape[0])
    info.check_size(*array.shape[1:])
    return prepare(info, array[order], None, "sensor" if nodata is None else nodata)


def _from_geotiff(info: ModelInfo, body: bytes, names, nodata, max_pixels):
    import rasterio
    from rasterio.io import MemoryFile

    from earthray.io import Grid, RasterError, open_scene

    with MemoryFile(body, ext=".tif") as mem:
        try:
            with mem.open() as ds:
                count, (height, width), dtypes = ds.count, ds.shape, set(ds.dtypes)
                descriptions, file_nodata = ds.descriptions, ds.nodata
                grid = Grid(ds.crs, ds.transform, width, height)
        except rasterio.errors.RasterioError as e:
            raise RequestError(f"not a readable GeoTIFF: {e}", 415) from None
        _check_pixels(height, width, max_pixels)
        bad = [d for d in dtypes if np.dtype(d).kind not in "iuf"]
        if bad:
            raise RequestError(f"pixel values must be integers or floats; got dtype {bad[0]}", 422)
        if names is None and all(descriptions):
            names = list(descriptions)
        info, order = info.select(names, count)
        info.check_size(height, width)
        fallback = nodata if nodata is not None else info.sensors[0].nodata
        try:
            scene = open_scene(mem.name, nodata=fallback)
            with scene:
                data, valid = scene.read()
        except RasterError as e:
            raise RequestError(f"cannot read the GeoTIFF's pixels: {e}", 422) from None
    declared = file_nodata if file_nodata is not None else fallback
    nan_nodata = declared is not None and math.isnan(declared)
    return prepare(info, data[order], valid[order], declared, nan_is_nodata=nan_nodata), grid


# ---------------------------------------------------------------------------------------------- answers


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
    """The answer on the input's grid (CRS and transform); arrays without georeferencing get none."""
    from affine import Affine
    from rasterio.errors import NotGeoreferencedWarning

    from earthray.io import Grid, write_raster

    if info.task == "segmentation":
        data, nodata, names = answer["labels"], NODATA_CLASS, ["class"]
        tags = {"classes": json.dumps(info.classes), "nodata_class": str(NODATA_CLASS)}
    else:
        data, nodata, names = answer["values"], float("nan"), info.outputs
        tags = {"target": info.target or "", "units": "physical (the target sensor's)"}
    h, w = data.shape[-2:]
    grid = grid or Grid(None, Affine.identity(), w, h)
    with tempfile.TemporaryDirectory(prefix="earthray-answer-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        path = write_raster(Path(tmp) / "answer.tif", data, grid, nodata=nodata,
                            tags={"model": info.name, "task": info.task, **tags}, band_names=names)
        return path.read_bytes()


# ---------------------------------------------------------------------------------------------- gateway


class ErrorBody(BaseModel):
    error: str


class ModelCard(BaseModel):
    name: str
    task: str
    recipe: str
    preset: str
    source: str = Field(description="bundle folder or pinned models:/NAME/VERSION")
    sensors: list[dict[str, Any]]
    bands: list[str] = Field(description="band names a request gives, in the model's order")
    input_size: int
    size: str
    classes: list[str] | None
    target: str | None
    target_bands: list[str] | None


class ModelList(BaseModel):
    models: list[ModelCard]


class SceneAnswer(BaseModel):
    model: str
    task: str
    scores: dict[str, float] = Field(description="class -> probability (softmax; sigmoid for multilabel)")
    top: str
    labels: list[str] | None = Field(None, description="multilabel: classes scoring >= 0.5")


class SegmentationAnswer(BaseModel):
    model: str
    task: str
    height: int
    width: int
    pixels: dict[str, int] = Field(description="class -> predicted pixel count")
    mean_scores: dict[str, float] = Field(description="class -> mean probability over valid pixels")
    invalid_pixels: int


class RegressionAnswer(BaseModel):
    model: str
    task: str
    height: int
    width: int
    stats: dict[str, dict[str, float]] = Field(description="target band -> mean/min/max in physical units")
    invalid_pixels: int


class PredictJSON(StrictModel):
    """A JSON request: exactly one of ``array``, ``geotiff`` (base64) or ``npy`` (base64)."""

    array: list | None = Field(None, description="bands x rows x cols nested list of numbers")
    geotiff: str | None = Field(None, description="base64 of a GeoTIFF")
    npy: str | None = Field(None, description="base64 of a .npy array (bands, rows, cols)")
    bands: list[str] | None = Field(None, description="names of the input's bands, in its order")
    nodata: float | str | None = Field(None, description="value marking missing pixels ('nan' allowed)")


_BINARY = {"type": "string", "format": "binary"}
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {**_BINARY, "description": "a GeoTIFF or .npy (bands, rows, cols)"},
        "bands": {"type": "string", "description": "comma-separated band names"},
        "nodata": {"type": "string"}}}},
    "application/json": {"schema": PredictJSON.model_json_schema()},
    "image/tiff": {"schema": _BINARY},
    "application/x-npy": {"schema": _BINARY},
}}}
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503)}

api = FastAPI(title="earthray", description="Fine-tuned earthray heads: classification, segmentation, regression.",
              version="1")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return _error(getattr(exc, "status", 422), str(exc))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    msgs = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return _error(422, "; ".join(msgs))


# Everything the gateway's methods use is defined above it: Serve serialises the ingress class when it is
# decorated, with the module globals that exist at that moment.
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16})
@serve.ingress(api)
class Gateway:
    def __init__(self, host, args: dict[str, Any]):
        self.host = host
        self.args = parse_args(args)
        self.infos = model_infos(self.args)
        self.token = self.args.auth_token or os.environ.get(TOKEN_ENV) or None

    def _authorise(self, request: Request) -> None:
        if not self.token:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise StarletteHTTPException(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                         headers={"WWW-Authenticate": "Bearer"})

    def _info(self, name: str) -> ModelInfo:
        info = self.infos.get(name)
        if info is None:
            raise RequestError(f"unknown model {name!r}; models: {', '.join(self.infos)}", 404)
        return info

    @api.get("/healthz", summary="liveness: the gateway answers")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready", summary="readiness: the model host answers", responses={503: {"model": ErrorBody}})
    async def ready(self):
        try:
            await asyncio.wait_for(self.host.ready.remote(), timeout=10)
        except Exception as e:  # not ready, whatever the reason
            return _error(503, f"model host not ready: {type(e).__name__}: {e}", {"Retry-After": "5"})
        return {"ready": True, "models": list(self.infos)}

    @api.get("/models", response_model=ModelList, responses=_ERRORS, summary="the models served and their inputs")
    async def list_models(self, request: Request):
        self._authorise(request)
        return {"models": [info.card() | {"source": info.source} for info in self.infos.values()]}

    @api.get("/models/{name}", response_model=ModelCard, responses=_ERRORS, summary="one model's inputs and outputs")
    async def get_model(self, name: str, request: Request):
        self._authorise(request)
        info = self._info(name)
        return info.card() | {"source": info.source}

    @api.post("/models/{name}/predict", openapi_extra=_PREDICT_BODY, summary="predict one image",
              responses={**_ERRORS, 200: {"model": SceneAnswer | SegmentationAnswer | RegressionAnswer,
                                          "content": {"image/tiff": {"schema": _BINARY}}}})
    async def predict(self, name: str, request: Request,
                      format: str = Query("json", pattern="^(json|geotiff)$",
                                          description="json, or geotiff (dense tasks: classes or values)"),
                      bands: str | None = Query(None, description="comma-separated band names of the input"),
                      nodata: str | None = Query(None, description="value marking missing pixels ('nan' allowed)")):
        self._authorise(request)
        info = self._info(name)
        if format == "geotiff" and info.task in SCENE:
            raise RequestError(f"model {name!r} ({info.task}) answers JSON only; GeoTIFF answers are for "
                               "segmentation and regression")
        body, fields = await self._read(request)
        fields = {"bands": bands, "nodata": nodata} | {k: v for k, v in fields.items() if v is not None}
        image, grid = await asyncio.to_thread(decode, info, request.headers.get("content-type", ""), body, fields,
                                              self.args.max_pixels)
        try:
            answer = await self.host.options(multiplexed_model_id=f"{name}|{info.source}").predict.remote(image)
        except BackPressureError as e:
            return _error(503, f"overloaded: {e}; retry later", {"Retry-After": str(math.ceil(self.args.retry_after_s))})
        valid_pixels = pixel_valid(info, image)
        if format == "geotiff":
            data = await asyncio.to_thread(to_geotiff, info, answer, grid)
            return Response(data, media_type="image/tiff",
                            headers={"Content-Disposition": f'attachment; filename="{name}.tif"'})
        return to_json(info, answer, valid_pixels)

    async def _read(self, request: Request) -> tuple[bytes, dict[str, str | None]]:
        limit = self.args.max_request_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise RequestError(f"request body of {int(length)} bytes exceeds the limit of {limit}", 413)
        body = await request.body()
        if len(body) > limit:
            raise RequestError(f"request body of {len(body)} bytes exceeds the limit of {limit}", 413)
        if not body:
            raise RequestError("empty request body: send a GeoTIFF, a .npy array or JSON", 400)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return body, {}
        try:
            form = await request.form()
        except Exception as e:  # malformed multipart
            raise RequestError(f"malformed multipart body: {e}", 400) from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RequestError("multipart request needs a 'file' part holding a GeoTIFF or .npy", 422)
        fields = {k: form.get(k) for k in ("bands", "nodata")}
        return await upload.read(), {k: v for k, v in fields.items() if isinstance(v, str) and v}


# ---------------------------------------------------------------------------------------------- building, running


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for ``import_path: earthray.serve.app:build_app`` (``args`` as in ``AppArgs``)."""
    parsed = parse_args(args)
    plain = parsed.model_dump()
    backpressure = {"retry_after_s": parsed.retry_after_s}
    host = ModelServer.options(max_ongoing_requests=parsed.max_ongoing_requests,
                               max_queued_requests=parsed.max_queued_requests,
                               backpressure_config=backpressure).bind(plain)
    return Gateway.options(max_queued_requests=parsed.max_queued_requests,
                           backpressure_config=backpressure).bind(host, plain)


def load_serve_config(path: str | Path, port: int | None = None, host: str | None = None):
    """A Serve config file (as ``serve deploy`` takes it), checked; earthray apps' args checked and their
    relative paths (bundle folders, ``sqlite:///`` tracking URIs) made relative to the file."""
    from ray.serve.schema import ServeDeploySchema

    from earthray.config import read_yaml

    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a Serve config (a mapping with 'applications')")
    if port is not None or host is not None:
        http = raw.setdefault("http_options", {}) or {}
        raw["http_options"] = http | ({"port": port} if port is not None else {}) | ({"host": host} if host else {})
    for i, app in enumerate(raw.get("applications") or []):
        if isinstance(app, dict) and app.get("import_path") == IMPORT_PATH:
            args = app.get("args") or {}
            try:
                parsed = AppArgs.model_validate(args)
            except ValidationError as e:
                raise ConfigError(format_validation_error(e, f"{path}: applications.{i}.args")) from None
            app["args"] = _resolve_paths(parsed, path.parent).model_dump(exclude_none=True)
    try:
        return ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None


def _resolve_paths(args: AppArgs, base: Path) -> AppArgs:
    models = {n: resolve_path(s, base) for n, s in args.models.items()}
    uri = resolve_path(args.tracking_uri, base) if args.tracking_uri else None
    return args.model_copy(update={"models": models, "tracking_uri": uri})


def run_config(path: str | Path, port: int | None = None, host: str | None = None, address: str | None = None,
               on_status: Callable[[str], None] = print, block: bool = True, timeout_s: float = 600) -> None:
    """``earthray serve``: deploy a Serve config file on local Ray (or ``address``), as ``serve run`` does,
    wait until every application runs, then block until interrupted (Ctrl-C shuts Serve down)."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    from earthray.runtime import ensure_ray

    config = load_serve_config(path, port, host)
    ensure_ray(address)
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location,
                                   grpc_options=gRPCOptions(**config.grpc_options.model_dump()))
    client.deploy_apps(config, _blocking=False)
    names = [a.name for a in config.applications]
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            apps = serve.status().applications
            states = {n: apps[n] for n in names if n in apps}
            failed = {n: a.message for n, a in states.items() if str(a.status).endswith("DEPLOY_FAILED")}
            if failed:
                raise ConfigError("; ".join(f"application {n}: {m}" for n, m in failed.items()))
            if len(states) == len(names) and all(str(a.status).endswith("RUNNING") for a in states.values()):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"applications not running after {timeout_s:.0f}s: "
                                   f"{ {n: str(a.status) for n, a in states.items()} }")
            time.sleep(1)
        http = config.http_options
        on_status(f"serving {', '.join(names)} on http://{http.host}:{http.port} "
                  f"(OpenAPI: /openapi.json, docs: /docs); Ctrl-C stops")
        while block:
            time.sleep(3600)
    except KeyboardInterrupt:
        on_status("shutting down")
        serve.shutdown()
    except BaseException:
        serve.shutdown()
        raise
