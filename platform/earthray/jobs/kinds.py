"""Which earthray command runs a spec, and which of its paths must still mean something on a cluster.

A submitted job runs in an uploaded copy of the working directory, resolved relative to the copy of
the spec. So an output written to a relative path lands in a temporary folder the cluster deletes,
and a relative input that points outside the working directory (or into an excluded folder such as
``work/``) does not exist there. The rule: inputs are absolute, URIs, or inside the uploaded tree;
outputs are absolute (on storage the cluster shares, e.g. ``/mnt/shared``) or URIs (``s3://...``).
"""

from __future__ import annotations

import fnmatch
import glob
import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from earthray.config import ConfigError, read_yaml

# Never uploaded: environments, VCS data, run outputs, caches, build products.
EXCLUDES = [".venv", ".git", "work", "runs", "mlruns", "__pycache__", "*.egg-info", ".pytest_cache",
            ".ruff_cache", "*.db", "build", "dist"]


def _loader(module: str, name: str) -> Callable[[Path], None]:
    """Validate with the command's own loader, imported only when a spec of that kind is submitted."""

    def load(path: Path) -> None:
        getattr(importlib.import_module(module), name)(path)

    return load


@dataclass(frozen=True)
class Kind:
    """``outputs`` maps a dotted field to its default (None: no relative default); ``*`` walks lists and maps.

    ``spec_last``: the command takes its extra arguments before the spec (``earthray evaluate BUNDLE SPEC``).
    """

    name: str
    outputs: dict[str, str | None] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    load: Callable[[Path], None] | None = None
    spec_last: bool = False


_TRAIN_OUT = {"workdir": "work", "tracking.tracking_uri": None}
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("ingest", outputs={"output": None},
         inputs=("sensors_file", "inputs.*.sensors.*.path", "inputs.*.sensors.*.stack.*", "inputs.*.label.path",
                 "inputs.*.label.scene", "inputs.*.label.*.path", "inputs.*.label.*.scene"),
         load=_loader("earthray.data.spec", "load_spec")),
    Kind("pretrain", outputs=_TRAIN_OUT, inputs=("data.root",),
         load=_loader("earthray.train.spec", "load_pretrain_spec")),
    Kind("finetune", outputs=_TRAIN_OUT, inputs=("bundle", "data.root"),
         load=_loader("earthray.train.spec", "load_finetune_spec")),
    Kind("evaluate", outputs=_TRAIN_OUT, inputs=("data.root",),
         load=_loader("earthray.evaluate", "load_evaluate_spec"), spec_last=True),
    Kind("infer", outputs={"output": None, "tracking_uri": None}, inputs=("model", "scenes.*", "scenes.*.*"),
         load=_loader("earthray.serve.infer", "load_infer_spec")),
    # load_sweep reads the data's manifests, which may exist only on the cluster: paths checked here only
    Kind("sweep", outputs=_TRAIN_OUT, inputs=("base",)),
    Kind("serve", outputs={"applications.*.args.tracking_uri": None}, inputs=("applications.*.args.models.*",),
         load=_loader("earthray.serve.app", "load_serve_config")),
)}

PATTERNS = ("jobs/ingest-*.yaml -> ingest, pretrain-*.yaml -> pretrain, finetune-*.yaml -> finetune, "
            "evaluate-*.yaml -> evaluate, infer-*.yaml -> infer, tune/*.yaml or sweep-*.yaml -> sweep, "
            "serve/*.yaml -> serve")


def spec_kind(path: str | Path, kind: str | None = None) -> str:
    """The earthray command that runs ``path``: ``kind`` if given, else read from the file's name and folder."""
    path = Path(path)
    if kind is not None:
        if kind not in KINDS:
            raise ConfigError(f"{path}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        return kind
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: a job spec is a .yaml file; accepted names: {PATTERNS}")
    stem, folder = path.stem, path.resolve().parent.name
    if folder == "tune" or stem.startswith("sweep-"):
        return "sweep"
    if folder == "serve":
        return "serve"
    for name in ("ingest", "pretrain", "finetune", "evaluate", "infer"):
        if stem.startswith(f"{name}-"):
            return name
    raise ConfigError(f"{path}: cannot tell which command runs this spec from its name; "
                      f"accepted: {PATTERNS} (or pass the kind explicitly)")


def _values(data: Any, keys: list[str], where: str = "") -> Iterator[tuple[str, Any]]:
    if not keys:
        yield where, data
        return
    key, rest = keys[0], keys[1:]
    if key == "*":
        items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
        for k, v in items:
            yield from _values(v, rest, f"{where}.{k}" if where else str(k))
    elif isinstance(data, dict) and key in data and data[key] is not None:
        yield from _values(data[key], rest, f"{where}.{key}" if where else key)


def _local(value: str) -> str | None:
    """The local path a spec value names (``sqlite:///rel.db`` names ``rel.db``); None for other URIs."""
    if value.startswith("sqlite:///"):
        return value[len("sqlite:///"):]
    return None if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", value) else value


def _relative(value: object) -> str | None:
    local = _local(value) if isinstance(value, str) else None
    return local if local is not None and not Path(local).is_absolute() else None


def excluded(path: Path, working_dir: Path) -> str | None:
    """The exclude pattern that keeps ``path`` (inside ``working_dir``) out of the upload, if any."""
    for part in path.relative_to(working_dir).parts:
        for pattern in EXCLUDES:
            if fnmatch.fnmatch(part, pattern):
                return pattern
    return None


def check_spec(path: str | Path, working_dir: Path, kind: str | None = None) -> str:
    """Refuse, before anything is uploaded, a spec that cannot run as a job; return its kind."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such spec file")
    name = spec_kind(path, kind)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a spec is a YAML mapping (got {type(data).__name__})")
    spec = KINDS[name]
    if spec.load is not None:
        spec.load(path)
    base = path.resolve().parent
    copy = "a submitted job runs in a temporary copy of the working dir"
    shared = "use an absolute path on storage the cluster shares (e.g. /mnt/shared/...) or a URI (s3://...)"
    for dotted, default in spec.outputs.items():
        found = list(_values(data, dotted.split(".")))
        if not found and default is not None:
            found = [(f"{dotted} (default)", default)]
        for where, value in found:
            if _relative(value) is not None:
                raise ConfigError(f"{path}: {where}: {value!r} is relative; {copy}, which the cluster deletes "
                                  f"afterwards: {shared}")
    for dotted in spec.inputs:
        for where, value in _values(data, dotted.split(".")):
            if (local := _relative(value)) is None:
                continue
            literal = next((i for i, c in enumerate(local) if glob.has_magic(c)), len(local))
            target = (base / (local[:literal] or ".")).resolve()
            reason = None
            if not target.is_relative_to(working_dir):
                reason = f"it resolves to {target}, outside the working dir {working_dir}"
            elif pattern := excluded(target, working_dir):
                reason = f"it resolves to {target}, which the upload excludes ({pattern})"
            if reason:
                raise ConfigError(f"{path}: {where}: {value!r} is relative and {reason}; {copy}: {shared}")
    return name
