"""Joining Ray: a local instance by default, a cluster by address; Ray Data set up for earthray."""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlsplit

from earthray.compat import loopback_only_local_ray, recorded_cluster
from earthray.config import ConfigError

log = logging.getLogger(__name__)


FRESH = "start a fresh local Ray instead with --address local (or RAY_ADDRESS=local)"


def answers(address: str, timeout: float = 3.0) -> bool:
    """Whether anything accepts a TCP connection at ``host:port`` or ``scheme://host[:port]`` (a GCS, a Ray
    Client server, a dashboard): a dead address is then an error at once, not minutes of Ray's retries."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is not a number
        return False
    if not host or not port:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_address(address: str | None) -> str:
    """The address ``ray.init`` should get, checked before Ray spends minutes retrying a dead one.

    ``None`` means Ray's own default: ``RAY_ADDRESS``, else the cluster a ``ray start`` on this machine
    recorded, else a new local instance. A recorded cluster that no longer answers (a killed head leaves
    its address file behind) is ignored with a warning, so the embedded default still starts. An address
    given explicitly, or through ``RAY_ADDRESS``, that does not answer (a GCS ``host:port``, a Ray Client
    ``ray://host:port``, or ``auto`` with no live recorded cluster) is a configuration error.
    """
    given = address or os.environ.get("RAY_ADDRESS") or None
    source = "--address/spec address" if address else "RAY_ADDRESS"
    if given == "local":
        return given
    if given == "auto":  # the cluster `ray start` recorded; Ray would also try any GCS process it finds
        recorded = recorded_cluster()
        if not recorded or not answers(recorded):
            found = f"the cluster recorded at {recorded} does not answer" if recorded else "no `ray start` cluster " \
                "is recorded on this machine"
            raise ConfigError(f"{source} auto: {found}; {FRESH}")
        return recorded
    if given:
        if not answers(given):
            raise ConfigError(f"{source}: no Ray cluster answers at {given}; {FRESH}")
        return given
    recorded = recorded_cluster()
    if recorded and answers(recorded):
        return recorded
    if recorded:
        log.warning("ignoring the Ray cluster recorded at %s: nothing answers there; starting a local Ray", recorded)
    return "local"


def ensure_ray(address: str | None = None, preserve_order: bool = False) -> str | None:
    """Start or join Ray once per process; quiet Ray Data's own progress output (earthray shows its own).

    A local Ray listens on 127.0.0.1 only (its GCS, raylet, workers, dashboard and metrics agent), and
    gets its dashboard: Ray Train's placement-group cleaner polls the state API it serves (and warns every
    few seconds without it), and users watch their jobs there. Returns its URL when this call started or
    joined Ray. A cluster that answers but cannot be joined (one shutting down) is a ConfigError.

    ``preserve_order`` makes Ray Data yield rows in a repeatable order, which a resumed training
    epoch relies on to skip the batches it had already used.
    """
    import ray
    from ray.exceptions import RpcError

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    url = None
    if not ray.is_initialized():
        target = resolve_address(address)
        if target == "local":
            loopback_only_local_ray()
        try:
            context = ray.init(address=target, include_dashboard=True, configure_logging=False)
        except (ConnectionError, TimeoutError, RpcError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot join the Ray cluster at {target}: {reason}; {FRESH}") from None
        url = context.dashboard_url and f"http://{context.dashboard_url}"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if preserve_order:
        ctx.execution_options.preserve_order = True
    return url
