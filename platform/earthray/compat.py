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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from earthray.errors import ConfigError, EarthrayError

# (module, attribute) of every internal used below.
_INTERNALS = (
    ("ray._private.utils", "read_ray_address"),
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),
    ("ray.serve._private.api", "serve_start"),
    ("ray.serve.multiplex", "_ModelMultiplexWrapper"),
    ("ray.train.v2._internal.execution.callback", "WorkerGroupCallback"),
    ("ray.train.v2._internal.execution.worker_group", "WorkerGroupState"),
    ("ray._private.state", "actors"),
    ("ray.core.generated.gcs_service_pb2_grpc", "NodeInfoGcsServiceStub"),
    ("ray.core.generated.gcs_service_pb2", "GetClusterIdRequest"),
)
_MULTIPLEX_ATTR = "__serve_multiplex_wrapper"
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayInternalMissing(EarthrayError, RuntimeError):
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
    state = "ray.train.v2._internal.execution.worker_group", "WorkerGroupState"
    if ".".join(state) not in missing and "placement_group_handle" not in _internal(*state).__annotations__:
        missing.append("the placement_group_handle of Ray Train's WorkerGroupState")
    return missing


def recorded_cluster() -> str | None:
    """The GCS address a ``ray start`` on this machine recorded (Ray has no public call that reads it)."""
    return _internal("ray._private.utils", "read_ray_address")()


def gcs_answers(target: str, timeout: float) -> bool:
    """Whether a Ray GCS answers at ``host:port``: asked for its cluster id, as Ray's own clients first do.
    Any other gRPC server says UNIMPLEMENTED; one refusing a call without Ray's auth token is a GCS too."""
    import grpc

    stub = _internal("ray.core.generated.gcs_service_pb2_grpc", "NodeInfoGcsServiceStub")
    request = _internal("ray.core.generated.gcs_service_pb2", "GetClusterIdRequest")
    with grpc.insecure_channel(target) as channel:
        try:
            stub(channel).GetClusterId(request(), timeout=timeout)
        except grpc.RpcError as e:
            return e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    return True


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


def map_batches_without_restarts(ds, fn, **kwargs):
    """``ds.map_batches(fn, **kwargs)`` whose actors are never restarted. Ray 2.60 takes ``max_restarts``
    only through ``**ray_remote_args``, deprecated (removal announced for 2.64) with no named parameter yet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, max_restarts=0, **kwargs)


def deploy_serve_config(config) -> None:
    """Start Serve with a config file's HTTP/gRPC options and deploy its applications, as ``serve run FILE``
    does. Ray's public API deploys one application object (``serve.run``); a whole config file, with its
    per-deployment overrides, only through the private client that ``serve run`` uses itself."""
    from ray.serve.config import gRPCOptions

    serve_start = _internal("ray.serve._private.api", "serve_start")
    wanted = config.http_options
    client = serve_start(http_options=wanted.model_dump(), proxy_location=config.proxy_location,
                         grpc_options=gRPCOptions(**config.grpc_options.model_dump()))
    running = client.http_config  # a Serve already running keeps its own and only logs a warning
    if (running.host, running.port) != (wanted.host, wanted.port):
        raise ConfigError(f"Serve already runs on this Ray cluster, on {running.host}:{running.port}; it cannot "
                          f"also listen on {wanted.host}:{wanted.port}. Use --port {running.port}"
                          f"{'' if running.host == wanted.host else f' --host {running.host}'}, or stop it "
                          "first (`serve shutdown`)")
    client.deploy_apps(config, _blocking=False)


def multiplexed_models(load: Callable) -> list[str]:
    """Model ids a ``@serve.multiplexed`` function holds now, least recently used first (Serve keeps its
    multiplexer in a private attribute of the function, created on the first call)."""
    wrapper = getattr(load, _MULTIPLEX_ATTR, None)
    return list(wrapper.models) if wrapper is not None else []


# ---------------------------------------------------------------------- Train workers' placement groups
#
# A Tune trial that runs a TorchTrainer and is stopped (by a scheduler, or an interruption) is killed
# with its Train controller, and the Train workers' placement group outlives them: it belongs to the
# job's driver. Ray Train's own cleaner (a detached actor per controller) asks the State API whether
# the controller is alive, which fails where no dashboard serves it, and also in a Ray whose workers
# cannot tell their own cluster from another Ray on the same machine ("Found multiple active Ray
# instances"): its monitor thread dies and the group holds its CPUs until the driver exits. Ray has no
# public hook on a worker group's start, nor a public lookup of an actor's state without the dashboard.


def _worker_group_recorder_class() -> type:
    base = _internal("ray.train.v2._internal.execution.callback", "WorkerGroupCallback")

    class WorkerPlacementGroupRecorder(base):
        """In the Train controller: writes the worker group's placement group and the controller's id."""

        def __init__(self, path: str):
            self.path = path

        def after_worker_group_start(self, worker_group) -> None:
            import json

            import ray

            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            Path(self.path).write_text(json.dumps({"placement_group": pg.id.hex(),
                                                   "controller": ray.get_runtime_context().get_actor_id()}))

    # pickled by reference: the Train controller unpickles it through this module's __getattr__
    WorkerPlacementGroupRecorder.__module__ = __name__
    WorkerPlacementGroupRecorder.__qualname__ = "WorkerPlacementGroupRecorder"
    return WorkerPlacementGroupRecorder


def __getattr__(name: str) -> Any:
    """``WorkerPlacementGroupRecorder``, built on first use (it subclasses a Ray Train internal, which
    importing this module must not import)."""
    if name == "WorkerPlacementGroupRecorder":
        cls = globals()[name] = _worker_group_recorder_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def record_worker_placement_group(path: str | Path):
    """A Ray Train run callback (``RunConfig(callbacks=...)``) that writes the placement group of the
    run's workers and its controller's actor id to ``path`` once the workers have started (again at
    each restart of the worker group); ``release_recorded_placement_group`` reads it."""
    return __getattr__("WorkerPlacementGroupRecorder")(str(path))


def release_recorded_placement_group(path: str | Path, wait_s: float = 0.0) -> bool:
    """Remove the placement group recorded at ``path`` once the controller that recorded it is dead,
    and the record with it.

    Returns whether nothing is left to release (no record, or released); False while the controller
    still runs (after ``wait_s`` seconds of waiting for it). The controller's state comes from the GCS
    (``ray._private.state.actors``), which needs no dashboard."""
    import json
    import time

    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    record = Path(path)
    if not record.is_file():
        return True
    info = json.loads(record.read_text())
    actors = _internal("ray._private.state", "actors")
    deadline = time.monotonic() + wait_s
    while (actors(info["controller"]) or {}).get("State", "DEAD") != "DEAD":
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(info["placement_group"])))
    if placement_group_table(pg).get("state") not in (None, "REMOVED"):
        remove_placement_group(pg)
    record.unlink(missing_ok=True)
    return True
