"""The gateway: the FastAPI ingress in front of the model host (cheap replicas).

It authenticates, reads and decodes requests (``earthray.serve.decode``), checks them against each
model's contract, normalises them with the bundle's statistics, asks the model host and formats the
answer. Every client mistake is a 4xx ``{"error": ...}`` here, before the model is involved.

Staying up under abuse (``earthray.serve.limits``): a prediction holds one of ``max_requests`` slots from
arrival to answer and, while its body arrives, one of ``max_uploads`` (``body_timeout_s`` for all of it);
its bytes come out of ``max_inflight_bytes``. Past any of these it is answered 503 + Retry-After at once.
The model host's own queue (``max_queued_requests``) refuses at once too, and a prediction the host has
not answered within ``max_wait_s`` is cancelled and answered 503: an answered request never waited
longer. The Gateway deployment has more slots than ``max_requests`` (``AppArgs.gateway_slots``), so
/healthz, /ready and /models are answered however busy the predictions keep it; none of them touches the
model host's queue (readiness asks Serve's controller for the host's state).

With a bearer token (``auth_token`` / ``EARTHRAY_SERVE_TOKEN``), /models*, /openapi.json and /docs need it;
it is checked (constant-time, on its sha256) before a byte of the body is read.
"""

# No ``from __future__ import annotations``: FastAPI must see the endpoints' real types (``Request``), and
# Serve's class-based view hides the module that string annotations would be resolved in.
import asyncio
import hmac
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from earthray.bundle import BundleError
from earthray.serve.answers import to_geotiff, to_json
from earthray.serve.config import TOKEN_ENV, parse_args, token_sha256
from earthray.serve.decode import DecodeLimits, decode
from earthray.serve.inputs import SCENE, RequestError, pixel_valid
from earthray.serve.limits import Budget, Overloaded, Slots, read_body, read_form
from earthray.serve.models import served_models
from earthray.serve.schemas import ERRORS, PREDICT_ANSWERS, PREDICT_BODY, ErrorBody, ModelCard, ModelList

log = logging.getLogger("ray.serve")
READY_CACHE_S = 2.0
_READY_STATES = ("HEALTHY", "UPSCALING", "DOWNSCALING")

api = FastAPI(title="earthray", description="Fine-tuned earthray heads: classification, segmentation, regression.",
              version="1", openapi_url=None, docs_url=None, redoc_url=None)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return _error(exc.status, str(exc), exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    msgs = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return _error(422, "; ".join(msgs))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
    return _error(500, f"internal error ({type(exc).__name__}); it is in the gateway's log")


# Everything the gateway's methods use is defined or imported above it: Serve serialises the ingress class
# when it is decorated, with the module globals that exist at that moment.
@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=96,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32})
@serve.ingress(api)
class Gateway:
    def __init__(self, host, args: dict[str, Any]):
        self.host = host
        self.args = a = parse_args(args)
        self.models = served_models(a)
        plain = a.auth_token or os.environ.get(TOKEN_ENV)
        self.token = a.auth_token_sha256 or (token_sha256(plain) if plain else None)
        self.requests = Slots(a.max_requests, "predictions in this gateway", a.retry_after_s, close=True)
        self.uploads = Slots(a.max_uploads, "requests still sending their body", a.retry_after_s, close=True)
        self.budget = Budget(a.max_inflight_bytes, a.retry_after_s)
        self.decode_limits = DecodeLimits(a.max_pixels, a.max_decoded_bytes)
        self._ready: tuple[float, str | None] = (0.0, "not checked yet")

    def _authorise(self, request: Request) -> None:
        if not self.token:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_sha256(value), self.token):
            raise StarletteHTTPException(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                         headers={"WWW-Authenticate": "Bearer"})

    def _served(self, name: str):
        served = self.models.get(name)
        if served is None:
            raise RequestError(f"unknown model {name!r}; models: {', '.join(self.models)}", 404)
        return served

    @api.get("/healthz", summary="liveness: the gateway answers")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready", summary="readiness: the model host has running replicas", responses={503: {"model": ErrorBody}})
    async def ready(self):
        problem = await self._host_problem()
        if problem:
            return _error(503, f"not ready: {problem}", {"Retry-After": "5"})
        return {"ready": True}

    async def _host_problem(self) -> str | None:
        """Why the model host cannot take requests now (None: it can), from Serve's controller, cached briefly."""
        checked, problem = self._ready
        if time.monotonic() - checked < READY_CACHE_S:
            return problem
        try:
            status = await asyncio.to_thread(serve.status)
            app = status.applications[serve.get_replica_context().app_name]
            host = app.deployments[self.host.deployment_name]
            state = str(host.status).rsplit(".", 1)[-1]
            problem = None if state in _READY_STATES else f"the model host is {state}"
        except Exception as e:  # the controller unreachable, the app going away: not ready, whatever the cause
            problem = f"cannot see the model host ({type(e).__name__})"
        self._ready = (time.monotonic(), problem)
        return problem

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        self._authorise(request)
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        self._authorise(request)
        return get_swagger_ui_html(openapi_url=f"{request.scope.get('root_path', '')}/openapi.json",
                                   title="earthray API")

    @api.get("/models", response_model=ModelList, responses=ERRORS, summary="the models served and their inputs")
    async def list_models(self, request: Request):
        self._authorise(request)
        return {"models": [m.card() for m in self.models.values()]}

    @api.get("/models/{name}", response_model=ModelCard, responses=ERRORS, summary="one model's inputs and outputs")
    async def get_model(self, name: str, request: Request):
        self._authorise(request)
        return self._served(name).card()

    @api.post("/models/{name}/predict", openapi_extra=PREDICT_BODY, summary="predict one image",
              responses=PREDICT_ANSWERS)
    async def predict(self, name: str, request: Request,
                      format: str = Query("json", pattern="^(json|geotiff)$",
                                          description="json, or geotiff (dense tasks: classes or values)"),
                      bands: str | None = Query(None, description="comma-separated band names of the input"),
                      nodata: str | None = Query(None, description="value marking missing pixels ('nan' allowed)")):
        self._authorise(request)
        info = self._served(name).info
        if format == "geotiff" and info.task in SCENE:
            raise RequestError(f"model {name!r} ({info.task}) answers JSON only; GeoTIFF answers are for "
                               "segmentation and regression")
        a = self.args
        content_type = request.headers.get("content-type", "")
        with self.requests.take(), self.budget.hold() as reserve:
            body = await read_body(request, a.max_request_bytes, a.body_timeout_s, self.uploads, reserve)
            fields: dict[str, Any] = {"bands": bands, "nodata": nodata}
            if content_type.startswith("multipart/form-data"):
                body, form = await read_form(request, body)
                fields |= form
            image, grid = await asyncio.to_thread(decode, info, content_type, body, fields, self.decode_limits,
                                                  reserve)
            del body
            answer = await self._ask(name, info, image)
            if format == "geotiff":
                data = await asyncio.to_thread(to_geotiff, info, answer, grid)
                return Response(data, media_type="image/tiff",
                                headers={"Content-Disposition": f'attachment; filename="{name}.tif"'})
            return to_json(info, answer, pixel_valid(info, image))

    async def _ask(self, name: str, info, image):
        """The model host's answer within ``max_wait_s``; its refusals and failures as JSON errors."""
        response = self.host.options(multiplexed_model_id=f"{name}|{info.source}").predict.remote(image)
        try:
            async with asyncio.timeout(self.args.max_wait_s):
                return await response
        except TimeoutError:
            response.cancel()
            raise Overloaded(f"model {name!r} did not answer within {self.args.max_wait_s:g} s (max_wait_s)",
                             self.args.retry_after_s) from None
        except BackPressureError:
            raise Overloaded(f"the model host's queue is full (max_queued_requests {self.args.max_queued_requests})",
                             self.args.retry_after_s) from None
        except RequestError:
            raise
        except BundleError as e:  # the operator's log names the bundle; the client learns only what is wrong
            cause = getattr(e, "cause", e)
            log.error("model %s is unavailable: %s", name, cause)
            raise RequestError(f"model {name!r} is unavailable: its bundle cannot be loaded "
                               f"({getattr(cause, 'reason', 'see the server log')})", 503) from None
        except Exception as e:  # the host failed on a valid request: say which model, keep the trace in the logs
            log.exception("model %s failed", name)
            cause = getattr(e, "cause", None) or e
            raise RequestError(f"model {name!r} failed ({type(cause).__name__}); the error is in the model "
                               "host's log", 500) from None
