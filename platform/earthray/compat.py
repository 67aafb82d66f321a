"""The Ray internals earthray relies on, in one place.

Each function here needs something Ray does not promise to keep (a private module, attribute or
environment switch) because no public API does the job. ``missing_internals`` lists those that a Ray
upgrade removed; ``tests/test_compat.py`` fails on it with one clear message, instead of a command
failing somewhere deep inside Ray.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from typing import Any

# (module, attribute) of every internal used below.
_INTERNALS = (
    ("ray._private.utils", "read_ray_address"),
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),
    ("ray.serve._private.api", "serve_start"),
    ("ray.serve.multiplex", "_ModelMultiplexWrapper"),
)
_MULTIPLEX_ATTR = "__serve_multiplex_wrapper"
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayInternalMissing(RuntimeError):
    """A Ray internal earthray uses is gone (a Ray upgrade): earthray.compat needs updating."""


def _internal(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        import ray

        raise RayInternalMissing(f"Ray {ray.__version__} has no {module}.{name}, which earthray.compat uses; "
                                 "update earthray/compat.py for this Ray") from None


def missing_internals() -> list[str]:
    """``module.attribute`` of each internal this Ray lacks (empty when earthray.compat fits this Ray)."""
    missing = []
    for module, name in _INTERNALS:
        try:
            _internal(module, name)
        except RayInternalMissing:
            missing.append(f"{module}.{name}")
    from ray import serve

    if _MULTIPLEX_ATTR not in inspect.getsource(serve.multiplexed):
        missing.append(f"the {_MULTIPLEX_ATTR} attribute of @serve.multiplexed functions")
    return missing


def recorded_cluster() -> str | None:
    """The GCS address a ``ray start`` on this machine recorded (Ray has no public call that reads it)."""
    return _internal("ray._private.utils", "read_ray_address")()


def loopback_only_local_ray() -> None:
    """Make the local Ray this process starts next listen on 127.0.0.1 only.

    Why: Ray 2.60 maps ``ray.init(_node_ip_address="127.0.0.1")`` back to the machine's outward address, and
    its GCS, raylet, workers and metrics agent then listen on every interface. Its single-machine mode (the
    default on macOS and Windows, switched by an environment variable) keeps the node on loopback. Child
    processes read the variable; this process read it when it imported Ray, so its copy is set too.
    """
    _internal("ray._private.ray_constants", "ENABLE_RAY_CLUSTER")  # still there, or a clear error
    os.environ[_LOCAL_ONLY_ENV] = "0"
    importlib.import_module("ray._private.ray_constants").ENABLE_RAY_CLUSTER = False


def deploy_serve_config(config) -> None:
    """Start Serve with a config file's HTTP/gRPC options and deploy its applications, as ``serve run FILE``
    does. Ray's public API deploys one application object (``serve.run``); a whole config file, with its
    per-deployment overrides, only through the private client that ``serve run`` uses itself."""
    from ray.serve.config import gRPCOptions

    serve_start = _internal("ray.serve._private.api", "serve_start")
    client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location,
                         grpc_options=gRPCOptions(**config.grpc_options.model_dump()))
    client.deploy_apps(config, _blocking=False)


def multiplexed_models(load: Callable) -> list[str]:
    """Model ids a ``@serve.multiplexed`` function holds now, least recently used first (Serve keeps its
    multiplexer in a private attribute of the function, created on the first call)."""
    wrapper = getattr(load, _MULTIPLEX_ATTR, None)
    return list(wrapper.models) if wrapper is not None else []
