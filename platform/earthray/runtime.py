"""Joining Ray: a local instance by default, a cluster by address; Ray Data set up for earthray.

Quiet by default: Ray's own output (its workers' and actors' stdout and stderr, Ray Train's, Ray Data's
and Serve's INFO lines, the raylet's notices) stays in Ray's log files (``<session>/logs``, see
``ray_logs``), so a command shows earthray's own progress; training progress reaches the driver through
``earthray.train.progress``. ``EARTHRAY_VERBOSE=1`` (``--verbose`` on the commands) streams Ray's lines
to the driver again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from urllib.parse import urlsplit

from earthray.compat import gcs_answers, loopback_only_local_ray, recorded_cluster
from earthray.config import ConfigError

log = logging.getLogger(__name__)


FRESH = "start a fresh local Ray instead with --address local (or RAY_ADDRESS=local)"
VERBOSE_ENV = "EARTHRAY_VERBOSE"
DASHBOARD_PORT = 8265  # Ray's default; the next free one above it when taken, as Ray itself picks
_session_dir: str | None = None


def verbose() -> bool:
    """Whether Ray's own log lines reach this process's output (``EARTHRAY_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """``--verbose``: Ray's lines here too, for this process and the Ray it starts (its workers inherit it)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def ray_logs() -> str | None:
    """Ray's log folder of the session ``ensure_ray`` started or joined (None before, or when unknown)."""
    return f"{_session_dir}/logs" if _session_dir else None


class _BelowWarning(logging.Filter):
    """Drops a logger's DEBUG and INFO records (a filter on the logger: it survives the logger's own
    reconfiguration, which resets its level, as ``import ray.serve`` does)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_driver_logs() -> None:
    """Keep the driver's own Ray and MLflow INFO lines (and the notices earthray's settings cause) off its
    output. Only this process: Ray's log files and the workers' loggers are left as they are."""
    # earthray turns Ray Data's progress bars off (it shows its own): Ray Data warns about that once per process
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # a new local Ray enables token authentication (~/.ray/auth_token, which `earthray submit` reads) and says so
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    serve_log = logging.getLogger("ray.serve")  # "Started Serve in namespace ...", one line per app and replica
    if not any(isinstance(f, _BelowWarning) for f in serve_log.filters):
        serve_log.addFilter(_BelowWarning())
    # MLflow sets its level from MLFLOW_LOGGING_LEVEL when imported ("Creating initial MLflow database tables")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    level = logging.getLevelName(os.environ["MLFLOW_LOGGING_LEVEL"].strip().upper())
    if isinstance(level, int):
        logging.getLogger("mlflow").setLevel(level)


def _free_dashboard_port(host: str = "127.0.0.1") -> int:
    """The port Ray's dashboard would take: 8265, else the next free one (Ray tries 50 ports too)."""
    for port in range(DASHBOARD_PORT, DASHBOARD_PORT + 50):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``values`` in the environment while a local Ray starts (its processes keep them), as they were after."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
"""An HTTP/2 client's connection preface and an empty SETTINGS frame: a gRPC server answers with its own."""


def answers(address: str, timeout: float = 3.0) -> bool:
    """Whether Ray answers at ``host:port`` (a GCS, asked for its cluster id) or ``ray://host:port`` (a Ray
    Client server: a gRPC server), or anything accepts a connection at ``http(s)://host[:port]`` (a
    dashboard): a dead address, or one where something other than Ray listens (on which ``ray.init`` would
    wait forever), is then an error at once, not minutes of Ray's retries. With ``RAY_USE_TLS`` a GCS is
    only checked to accept connections."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is not a number
        return False
    if not host or not port:
        return False
    tls = os.environ.get("RAY_USE_TLS", "").strip().lower() in ("1", "true")
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            if parts.scheme == "ray":
                conn.sendall(H2_PREFACE)
                frame = conn.recv(9)  # the server's first frame header: length (3), type, flags, stream (4)
                return len(frame) == 9 and frame[3] == 0x4  # SETTINGS
    except OSError:
        return False
    return gcs_answers(f"{host}:{port}", timeout) if parts.scheme == "tcp" and not tls else True


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
    few seconds without it), and users watch their jobs there. Its processes get that dashboard as
    ``RAY_API_SERVER_ADDRESS``: without it the cleaner (a detached actor with no address of its own) looks
    for "the" Ray on the machine and, where another one runs (tests, a second user), fails with "Found
    multiple active Ray instances" and stops guarding the training's placement group. Returns the
    dashboard's URL when this call started or joined Ray. A cluster that answers but cannot be joined (one
    shutting down) is a ConfigError.

    Unless ``verbose()``, the workers' output stays in Ray's log files (``log_to_driver=False``) and the
    driver's Ray, Serve and MLflow INFO lines are dropped (``quiet_driver_logs``).

    ``preserve_order`` makes Ray Data yield rows in a repeatable order, which a resumed training
    epoch relies on to skip the batches it had already used.
    """
    global _session_dir
    import ray
    import ray.data  # it configures its loggers when imported: before the levels set here
    from ray.exceptions import RpcError

    loud = verbose()
    if not loud:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        quiet_driver_logs()
    url = None
    if not ray.is_initialized():
        target = resolve_address(address)
        options: dict = {}
        # A task that failed and will be retried (Serve's controller at shutdown) is not news; its final error is.
        env: dict[str, str] = {} if loud else {"RAY_enable_output_error_log_if_still_retry": "0"}
        if target == "local":
            loopback_only_local_ray()
            options["dashboard_port"] = port = _free_dashboard_port()
            env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        try:
            with _environ(env):
                context = ray.init(address=target, include_dashboard=True, configure_logging=False,
                                   log_to_driver=loud, **options)
        except (ConnectionError, TimeoutError, RpcError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot join the Ray cluster at {target}: {reason}; {FRESH}") from None
        url = context.dashboard_url and f"http://{context.dashboard_url}"
        _session_dir = (context.address_info or {}).get("session_dir")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if preserve_order:
        ctx.execution_options.preserve_order = True
    return url
