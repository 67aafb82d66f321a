"""Submitting job specs to a Ray cluster through the Ray Job Submission API (the dashboard's HTTP port).

A job is ``earthray <kind> <spec>`` run by the cluster in an uploaded copy of the working directory
(the repo by default), so it is reproducible from the one YAML file the user submitted.

Token auth: Ray 2.59+ clusters started with ``ray start --head`` require a bearer token, and Ray's
own client only sends one when ``RAY_AUTH_MODE=token`` was set before Ray was imported. Here the
token is looked up explicitly (``token`` argument, then ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``) and sent as an ``Authorization`` header; a cluster without auth ignores it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from earthray.config import ConfigError
from earthray.errors import EarthrayError
from earthray.jobs.kinds import EXCLUDES, KINDS, check_spec, excluded
from earthray.runtime import answers

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT = 120.0


class JobError(EarthrayError, RuntimeError):
    """The cluster cannot be reached, refuses the token, or does not know the job; one line, ready to show."""


def default_address() -> str:
    """As ``ray job``: ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else the local dashboard."""
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def auth_token(token: str | None = None) -> str | None:
    """The token to send: explicit, else where Ray itself looks; none if ``RAY_AUTH_MODE=disabled``."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def client(address: str | None = None, token: str | None = None):
    """A ``JobSubmissionClient`` that has already reached the cluster (the constructor checks the version)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or default_address()
    if address != "auto" and not answers(address):
        raise JobError(f"cannot reach the Ray job server at {address}: nothing answers there (Jobs need the "
                       "cluster's dashboard, http://<head>:8265 by default; `ray start --head` starts one here)")
    secret = auth_token(token)
    headers = {"Authorization": f"Bearer {secret}"} if secret else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        first = str(e).splitlines()[0]
        raise JobError(f"{address}: {first} (give the cluster's token with --token, RAY_AUTH_TOKEN or "
                       f"~/.ray/auth_token)") from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobError(f"cannot reach the Ray job server at {address}: {_one_line(e)} (Jobs need the cluster's "
                       f"dashboard, http://<head>:8265 by default)") from None


def repo_root(spec: Path) -> Path:
    """The folder holding ``pyproject.toml`` above the spec, else the spec's parent's parent."""
    spec = spec.resolve()
    for folder in spec.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return spec.parent.parent


def _call(address: str | None, token: str | None, job_id: str, method: str, *args):
    c = client(address, token)
    try:
        return getattr(c, method)(job_id, *args)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise JobError(f"no job {job_id!r} on {address or default_address()}") from None
        raise JobError(f"{method} {job_id}: {_one_line(e)}") from None


def submit(spec: str | Path, address: str | None = None, *, kind: str | None = None,
           working_dir: str | Path | None = None, pip: Sequence[str] | None = None,
           env: Mapping[str, str] | None = None, args: Sequence[str] = (), token: str | None = None,
           submission_id: str | None = None) -> str:
    """Check the spec, upload the working dir and start ``earthray <kind> <spec> [args]`` there; return the job id.

    Raises ConfigError for a spec that cannot run as a job (nothing is submitted) and JobError for
    the cluster's refusals.
    """
    spec = Path(spec).resolve()
    wd = Path(working_dir).resolve() if working_dir else repo_root(spec)
    if not wd.is_dir():
        raise ConfigError(f"{wd}: working dir is not a folder")
    if not spec.is_relative_to(wd):
        raise ConfigError(f"{spec}: the spec must be inside the working dir {wd}, which the job runs in")
    if pattern := excluded(spec, wd):
        raise ConfigError(f"{spec}: the upload of {wd} excludes it ({pattern}); move it, e.g. to jobs/")
    name = check_spec(spec, wd, kind)
    rel = spec.relative_to(wd).as_posix()
    if KINDS[name].spec_last and not args:
        raise ConfigError(f"{spec}: `earthray {name}` takes arguments before the spec; pass them after --, "
                          f"e.g. earthray submit {rel} -- /mnt/shared/bundles/NAME")
    command = ["earthray", name, *args, rel] if KINDS[name].spec_last else ["earthray", name, rel, *args]
    runtime_env: dict = {"working_dir": str(wd), "excludes": list(EXCLUDES),
                         "env_vars": {"PYTHONUNBUFFERED": "1", **(env or {})}}
    if pip:
        runtime_env["pip"] = list(pip)
    c = client(address, token)
    deadline = time.monotonic() + AGENT_WAIT
    while True:
        try:
            return c.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env,
                                submission_id=submission_id, metadata={"earthray.kind": name, "earthray.spec": rel})
        except (RuntimeError, ValueError) as e:
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2)  # a head that has just started: its dashboard agent registers a moment later
                continue
            raise JobError(f"submitting {rel} to {address or default_address()}: {_one_line(e)}") from None


def status(job_id: str, address: str | None = None, *, token: str | None = None) -> str:
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return str(_call(address, token, job_id, "get_job_status").value)


def message(job_id: str, address: str | None = None, *, token: str | None = None) -> str:
    """Ray's one-line account of the job's state (why it failed, what stopped it)."""
    return _call(address, token, job_id, "get_job_info").message or ""


def logs(job_id: str, address: str | None = None, *, follow: bool = False, out: TextIO | None = None,
         token: str | None = None) -> str:
    """The job's driver output so far; with ``follow``, stream it to ``out`` (stdout) until the job ends."""
    if not follow:
        return _call(address, token, job_id, "get_job_logs")
    status(job_id, address, token=token)  # an unknown id fails here, with a clear message
    out = out or sys.stdout
    c = client(address, token)
    chunks: list[str] = []

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            chunks.append(chunk)
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:
        raise JobError(f"following {job_id}: {_one_line(e)}") from None
    return "".join(chunks)


def stop(job_id: str, address: str | None = None, *, token: str | None = None) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    return bool(_call(address, token, job_id, "stop_job"))


def wait(job_id: str, address: str | None = None, timeout: float = 600.0, *, token: str | None = None,
         poll: float = 1.0) -> str:
    """Block until the job ends; return its terminal status."""
    deadline = time.monotonic() + timeout
    while (state := status(job_id, address, token=token)) not in TERMINAL:
        if time.monotonic() > deadline:
            raise JobError(f"job {job_id} still {state} after {timeout:g} s")
        time.sleep(poll)
    return state
