"""``earthray serve CONFIG``: deploy a Serve config file the way ``serve run`` does, checked first.

Before anything starts: the config file (``earthray.serve.config``), every bundle of every earthray app
(``earthray.serve.models``: a missing or tampered one is one line naming it), and the HTTP port. Serve's
proxy binds with SO_REUSEPORT, so a second server on a busy port would silently share it with the first
(the kernel splitting connections between unrelated clusters); earthray binds the port itself first,
without that option, and refuses a port something already listens on.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from earthray.config import ConfigError
from earthray.errors import NotReady
from earthray.serve.config import TOKEN_ENV, AppArgs, earthray_apps, load_serve_config
from earthray.serve.models import served_models


def check_port_free(host: str, port: int) -> None:
    """A ConfigError naming the port when anything listens on ``host:port`` (or on all interfaces there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections in TIME_WAIT do not count
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"port {port} on {host} is already in use ({e.strerror}): another server, perhaps "
                              "another `earthray serve`, listens there; stop it or choose another --port") from None


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def exposure_warning(host: str, port: int, apps: list[tuple[str, AppArgs]]) -> str | None:
    """A warning when an earthray app would answer beyond this machine without a bearer token."""
    if is_loopback(host) or os.environ.get(TOKEN_ENV) or all(args.auth_token_sha256 for _, args in apps):
        return None
    return (f"warning: serving on {host}:{port} without a bearer token: anyone who reaches this port can use "
            f"the models; set {TOKEN_ENV} (or serve on 127.0.0.1)")


def _head_is_here() -> bool:
    """Whether the joined Ray's head (where Serve starts its first proxy) is this machine."""
    import psutil
    import ray

    try:
        head = ray.get_runtime_context().gcs_address.rpartition(":")[0].strip("[]")
    except Exception:  # Ray Client: no GCS address on this side
        return False
    mine = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return is_loopback(head) or head in mine


def run_config(path: str | Path, port: int | None = None, host: str | None = None, address: str | None = None,
               on_status: Callable[[str], None] = print, block: bool = True, timeout_s: float = 600) -> None:
    """Deploy a Serve config file on local Ray (or ``address``), wait until every application runs, then
    block until interrupted (Ctrl-C shuts Serve down)."""
    import ray
    from ray import serve

    from earthray.compat import deploy_serve_config
    from earthray.runtime import ensure_ray, resolve_address

    config = load_serve_config(path, port, host)
    apps = earthray_apps(config)
    for _, args in apps:
        served_models(args)
    http = config.http_options
    fresh = not ray.is_initialized() and resolve_address(address) == "local"
    if fresh:
        check_port_free(http.host, http.port)
    ensure_ray("local" if fresh else address)
    if not fresh and not serve.status().proxies and _head_is_here():
        check_port_free(http.host, http.port)
    if warning := exposure_warning(http.host, http.port, apps):
        on_status(warning)
    deploy_serve_config(config)
    names = [a.name for a in config.applications]
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            states = {n: a for n, a in serve.status().applications.items() if n in names}
            failed = {n: (a.message.strip().splitlines() or ["failed"])[-1] for n, a in states.items()
                      if str(a.status).endswith("DEPLOY_FAILED")}
            if failed:
                raise ConfigError("; ".join(f"application {n}: {m}" for n, m in failed.items()))
            if len(states) == len(names) and all(str(a.status).endswith("RUNNING") for a in states.values()):
                break
            if time.monotonic() > deadline:
                raise NotReady(f"applications not running after {timeout_s:.0f}s: "
                                   f"{ {n: str(a.status) for n, a in states.items()} }")
            time.sleep(1)
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
