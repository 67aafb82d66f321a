"""The earthray Serve app's ``args`` and the Serve config files that carry them.

``AppArgs`` is what ``earthray.serve.app:build_app`` takes (the ``args`` of an application in a Serve
config file). ``load_serve_config`` reads a whole config file the way ``earthray serve`` deploys it:
unknown keys are errors (Serve itself ignores a typo such as ``http_option:``), the host is 127.0.0.1
unless the file or the caller names one (Serve's own default is every interface), the port must be a
port, the earthray app's args are checked, its relative paths are made relative to the file, and a
bearer token written in the file is replaced by its sha256, so the token never reaches Serve's stored
config or its logs.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from earthray.config import (
    ConfigError,
    InputPath,
    OutputPath,
    StrictModel,
    format_validation_error,
    read_yaml,
    resolve_paths,
)

IMPORT_PATH = "earthray.serve.app:build_app"
TOKEN_ENV = "EARTHRAY_SERVE_TOKEN"
PROBE_HEADROOM = 32
"""Gateway slots kept free of predictions, for /healthz, /ready and /models (see ``gateway_slots``)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class AppArgs(StrictModel):
    """The ``args`` of the application in a Serve config file."""

    models: dict[str, InputPath] = Field(min_length=1, description="name -> bundle folder or models:/NAME@ALIAS URI")
    tracking_uri: OutputPath | None = Field(None, description="MLflow tracking URI for models:/ (default: "
                                            "MLFLOW_TRACKING_URI)")
    max_models_per_replica: int = Field(3, ge=1, description="models a ModelServer replica keeps loaded (LRU)")
    max_batch_size: int = Field(8, ge=1, description="requests per dynamic batch; also windows per forward pass")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    max_pixels: int = Field(2048 * 2048, ge=1, description="largest height x width accepted (413 beyond)")
    max_request_bytes: int = Field(64 * 2**20, ge=1024, description="largest request body (413 beyond)")
    max_decoded_bytes: int = Field(128 * 2**20, ge=1024, description="largest decoded input, bands x pixels x "
                                   "itemsize (JSON: its parsed size, estimated before parsing); 413 beyond")
    max_inflight_bytes: int = Field(2**30, ge=1024, description="memory the requests in one gateway replica may "
                                    "hold together (bodies and decoded inputs); 503 + Retry-After beyond")
    body_timeout_s: float = Field(10.0, gt=0, description="time a client has to send its whole body (408 beyond)")
    max_uploads: int = Field(32, ge=1, description="requests per gateway replica still sending their body; "
                             "503 + Retry-After beyond")
    max_requests: int = Field(64, ge=1, description="predictions one gateway replica holds at once, at any "
                              "stage; 503 + Retry-After beyond")
    max_wait_s: float = Field(10.0, gt=0, description="longest a prediction waits for the model host; beyond it "
                              "the request is cancelled and answered 503 + Retry-After")
    auth_token: str | None = Field(None, description=f"bearer token required on /models* and the OpenAPI "
                                   f"docs (prefer env {TOKEN_ENV}: a token in a file ends up in logs)")
    auth_token_sha256: str | None = Field(None, description="hex sha256 of the bearer token (earthray serve "
                                          "writes this in place of auth_token)")
    overlap: float = Field(0.25, ge=0, lt=1, description="window overlap when tiling large images")
    device: str = Field("auto", description="auto (cuda if present), cpu, cuda, cuda:N")
    max_ongoing_requests: int = Field(16, ge=1, description="per ModelServer replica; at least max_batch_size")
    max_queued_requests: int = Field(16, ge=-1, description="requests a gateway replica queues for the model "
                                     "host; beyond it 503 + Retry-After at once")
    retry_after_s: float = Field(1.0, ge=0, description="the Retry-After a rejected request is given")

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches never fill")
        if self.max_decoded_bytes > self.max_inflight_bytes:
            raise ValueError(f"max_decoded_bytes ({self.max_decoded_bytes}) must be <= max_inflight_bytes "
                             f"({self.max_inflight_bytes}), or the largest request could never be admitted")
        if self.max_uploads > self.max_requests:
            raise ValueError(f"max_uploads ({self.max_uploads}) must be <= max_requests ({self.max_requests})")
        if self.auth_token and self.auth_token_sha256:
            raise ValueError("give auth_token or auth_token_sha256, not both")
        if self.auth_token_sha256 and not _SHA256.match(self.auth_token_sha256):
            raise ValueError("auth_token_sha256 must be 64 lowercase hex digits")
        return self

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [n for n in v if not _NAME.match(n)]
        if bad:
            raise ValueError(f"model names must be letters, digits, '_', '.', '-' (used in URLs): {bad}")
        return v

    def hashed(self) -> AppArgs:
        """These args with ``auth_token`` replaced by its sha256 (what a gateway needs to check a token)."""
        if not self.auth_token:
            return self
        return self.model_copy(update={"auth_token": None, "auth_token_sha256": token_sha256(self.auth_token)})

    @property
    def gateway_slots(self) -> int:
        """The Gateway's ``max_ongoing_requests`` by default: every prediction it admits plus room for probes."""
        return self.max_requests + PROBE_HEADROOM


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def parse_args(args: dict[str, Any] | AppArgs) -> AppArgs:
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "earthray serve args")) from None


# ---------------------------------------------------------------------------------------------- config files


def _schemas() -> dict[str, Any]:
    from ray.serve import schema

    return {"": schema.ServeDeploySchema, "http_options": schema.HTTPOptionsSchema,
            "grpc_options": schema.gRPCOptionsSchema, "application": schema.ServeApplicationSchema,
            "deployment": schema.DeploymentSchema}


def _unknown_keys(raw: dict[str, Any], path: Path) -> list[str]:
    """``FILE: WHERE: unknown key K (known: ...)`` for every key Serve's schemas would silently ignore."""
    schemas = _schemas()
    found = []

    def check(value: Any, kind: str, where: str) -> None:
        if not isinstance(value, dict):
            return  # Serve's own validation names the wrong type
        known = schemas[kind].model_fields
        for key in value:
            if key not in known:
                found.append(f"{path}: {where or '(top level)'}: unknown key {key!r} (known: {', '.join(known)})")

    check(raw, "", "")
    for key in ("http_options", "grpc_options"):
        check(raw.get(key), key, key)
    for i, app in enumerate(raw.get("applications") or []):
        check(app, "application", f"applications.{i}")
        for j, dep in enumerate((app.get("deployments") or []) if isinstance(app, dict) else []):
            check(dep, "deployment", f"applications.{i}.deployments.{j}")
    return found


def load_serve_config(path: str | Path, port: int | None = None, host: str | None = None):
    """A Serve config file (as ``serve deploy`` takes it) as a checked ``ServeDeploySchema``; see the module doc."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a Serve config (a mapping with 'applications')")
    if unknown := _unknown_keys(raw, path):
        raise ConfigError("\n".join(unknown))
    http = raw.get("http_options") or {}
    if isinstance(http, dict):  # loopback unless the file or the caller says otherwise (Serve's default: 0.0.0.0)
        raw["http_options"] = {"host": "127.0.0.1"} | http | ({"port": port} if port is not None else {}) \
            | ({"host": host} if host else {})
    http_port = (raw.get("http_options") or {}).get("port", 8000)
    if not isinstance(http_port, int) or not 1 <= http_port <= 65535:
        raise ConfigError(f"{path}: http_options.port: {http_port!r} is not a TCP port (1-65535)")
    for i, app in enumerate(raw.get("applications") or []):
        if isinstance(app, dict) and app.get("import_path") == IMPORT_PATH:
            where = f"{path}: applications.{i}"
            try:
                parsed = AppArgs.model_validate(app.get("args") or {})
            except ValidationError as e:
                raise ConfigError(format_validation_error(e, f"{where}.args")) from None
            _check_gateway_slots(app, parsed, where)
            app["args"] = resolve_paths(parsed, path.parent).hashed().model_dump(exclude_none=True)
    try:
        return ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None


def _check_gateway_slots(app: dict[str, Any], args: AppArgs, where: str) -> None:
    for j, dep in enumerate(app.get("deployments") or []):
        slots = dep.get("max_ongoing_requests") if isinstance(dep, dict) and dep.get("name") == "Gateway" else None
        if isinstance(slots, int) and slots <= args.max_requests:
            raise ConfigError(f"{where}.deployments.{j}: Gateway max_ongoing_requests ({slots}) must exceed "
                              f"args.max_requests ({args.max_requests}), or predictions leave no room for "
                              f"/healthz and /ready (default: max_requests + {PROBE_HEADROOM})")


def earthray_apps(config) -> list[tuple[str, AppArgs]]:
    """(application name, args) of each earthray application in a loaded Serve config."""
    return [(a.name, parse_args(a.args)) for a in config.applications if a.import_path == IMPORT_PATH]
