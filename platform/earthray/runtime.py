"""Joining Ray: a local instance by default, a cluster by address; Ray Data set up for earthray."""

from __future__ import annotations

import logging


def ensure_ray(address: str | None = None, preserve_order: bool = False) -> None:
    """Start or join Ray once per process; quiet Ray Data's own progress output (earthray shows its own).

    ``preserve_order`` makes Ray Data yield rows in a repeatable order, which a resumed training
    epoch relies on to skip the batches it had already used.
    """
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if preserve_order:
        ctx.execution_options.preserve_order = True
