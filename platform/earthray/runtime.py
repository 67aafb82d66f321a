"""Joining Ray: a local instance by default, a cluster by address; Ray Data set up for earthray."""

from __future__ import annotations

import logging
import os
import socket

from earthray.config import ConfigError

log = logging.getLogger(__name__)


def _answers(address: str, timeout: float = 3.0) -> bool:
    """Whether anything accepts a TCP connection at ``host:port`` (a GCS, when Ray wrote the address)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def resolve_address(address: str | None) -> str:
    """The address ``ray.init`` should get, checked before Ray spends minutes retrying a dead one.

    ``None`` means Ray's own default: ``RAY_ADDRESS``, else the cluster a ``ray start`` on this machine
    recorded, else a new local instance. A recorded cluster that no longer answers (a killed head leaves
    its address file behind) is ignored with a warning, so the embedded default still starts. An address
    given explicitly, or through ``RAY_ADDRESS``, that does not answer is a configuration error.
    """
    given = address or os.environ.get("RAY_ADDRESS") or None
    if given in ("local", "auto") or (given and "://" in given):
        return given  # Ray's own keywords, or a ray:// client address: Ray reports on those itself
    if given:
        if not _answers(given):
            source = "--address/spec address" if address else "RAY_ADDRESS"
            raise ConfigError(f"{source}: no Ray cluster answers at {given}")
        return given
    from ray._private.utils import read_ray_address  # where `ray start` records its cluster

    recorded = read_ray_address()
    if recorded and _answers(recorded):
        return recorded
    if recorded:
        log.warning("ignoring the Ray cluster recorded at %s: nothing answers there; starting a local Ray", recorded)
    return "local"


def ensure_ray(address: str | None = None, preserve_order: bool = False) -> str | None:
    """Start or join Ray once per process; quiet Ray Data's own progress output (earthray shows its own).

    A local Ray gets its dashboard: Ray Train's placement-group cleaner polls the state API it serves
    (and warns every few seconds without it), and users watch their jobs there. Returns its URL when
    this call started or joined Ray.

    ``preserve_order`` makes Ray Data yield rows in a repeatable order, which a resumed training
    epoch relies on to skip the batches it had already used.
    """
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    url = None
    if not ray.is_initialized():
        context = ray.init(address=resolve_address(address), include_dashboard=True, configure_logging=False)
        url = context.dashboard_url and f"http://{context.dashboard_url}"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if preserve_order:
        ctx.execution_options.preserve_order = True
    return url
