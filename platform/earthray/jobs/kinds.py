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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from earthray.config import ConfigError, load_yaml, path_values, read_yaml, validate

# Never uploaded: environments, VCS data, run outputs, caches, build products.
EXCLUDES = [".venv", ".git", "work", "runs", "mlruns", "__pycache__", "*.egg-info", ".pytest_cache",
            ".ruff_cache", "*.db", "build", "dist"]


def _attr(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Kind:
    """One earthray command: its typed spec, the loader that checks and resolves it, the function that
    runs it, and the file names that say a spec is one of its kind. Imported only when used.

    ``spec_last``: the command takes its extra arguments before the spec (``earthray evaluate BUNDLE SPEC``).
    ``check_on_submit``: the loader can run before upload (the sweep's reads the data's manifests, which
    may exist only on the cluster). ``paths``: the typed paths of a spec file (default: the spec class's
    :data:`~earthray.config.InputPath` / :data:`~earthray.config.OutputPath` fields, unresolved).
    """

    name: str
    spec: str
    load: str
    run: str
    names: tuple[str, ...]
    spec_last: bool = False
    check_on_submit: bool = True
    paths: Callable[[Path], Iterator[tuple[str, str, Any]]] | None = None

    @property
    def spec_class(self) -> type:
        return _attr(self.spec)

    @property
    def loader(self) -> Callable[[str | Path], Any]:
        return _attr(self.load)

    @property
    def runner(self) -> Callable[..., Any]:
        return _attr(self.run)

    def path_values(self, path: Path) -> Iterator[tuple[str, str, Any]]:
        if self.paths is not None:
            yield from self.paths(path)
            return
        for where, role, value, _ in path_values(load_yaml(path, self.spec_class, resolve=False)):
            yield where, role, value


def _serve_paths(path: Path) -> Iterator[tuple[str, str, Any]]:
    """A Serve config is Ray's schema around earthray's ``AppArgs``: the paths are in each earthray app's args."""
    from earthray.serve.config import IMPORT_PATH, AppArgs

    for i, app in enumerate((read_yaml(path) or {}).get("applications") or []):
        if isinstance(app, dict) and app.get("import_path") == IMPORT_PATH:
            args = validate(AppArgs, app.get("args") or {}, f"{path}: applications.{i}.args")
            for where, role, value, _ in path_values(args, f"applications.{i}.args"):
                yield where, role, value


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("ingest", "earthray.data.spec:IngestSpec", "earthray.data.spec:load_spec", "earthray.data.ingest:ingest",
         ("ingest-*.yaml",)),
    Kind("pretrain", "earthray.train.spec:PretrainSpec", "earthray.train.spec:load_pretrain_spec",
         "earthray.train.run:pretrain", ("pretrain-*.yaml",)),
    Kind("finetune", "earthray.train.spec:FinetuneSpec", "earthray.train.spec:load_finetune_spec",
         "earthray.train.finetune:finetune", ("finetune-*.yaml",)),
    Kind("evaluate", "earthray.evaluate:EvaluateSpec", "earthray.evaluate:load_evaluate_spec",
         "earthray.evaluate:evaluate", ("evaluate-*.yaml",), spec_last=True),
    Kind("infer", "earthray.serve.spec:InferSpec", "earthray.serve.spec:load_infer_spec",
         "earthray.serve.infer:infer", ("infer-*.yaml",)),
    Kind("sweep", "earthray.tune.spec:SweepSpec", "earthray.tune:load_sweep", "earthray.tune.sweep:run_sweep",
         ("tune/*.yaml", "sweep-*.yaml"), check_on_submit=False),
    Kind("serve", "earthray.serve.config:AppArgs", "earthray.serve.config:load_serve_config",
         "earthray.serve.run:run_config", ("serve/*.yaml",), paths=_serve_paths),
)}

PATTERNS = ", ".join(f"{' or '.join(k.names)} -> {k.name}" for k in KINDS.values())


def spec_kind(path: str | Path, kind: str | None = None) -> str:
    """The earthray command that runs ``path``: ``kind`` if given, else read from the file's name and folder."""
    path = Path(path)
    if kind is not None:
        if kind not in KINDS:
            raise ConfigError(f"{path}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        return kind
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: a job spec is a .yaml file; accepted names: {PATTERNS}")
    # A folder pattern (tune/*.yaml) wins over a file-name pattern (pretrain-*.yaml), which holds anywhere.
    in_folder, named = f"{path.resolve().parent.name}/{path.stem}.yaml", f"{path.stem}.yaml"
    for folder in (True, False):
        for k in KINDS.values():
            if any(fnmatch.fnmatch(in_folder if folder else named, n) for n in k.names if ("/" in n) == folder):
                return k.name
    raise ConfigError(f"{path}: cannot tell which command runs this spec from its name; "
                      f"accepted: {PATTERNS} (or pass the kind explicitly)")


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
    job = KINDS[name]
    if job.check_on_submit:
        job.loader(path)
    base = path.resolve().parent
    copy = "a submitted job runs in a temporary copy of the working dir"
    shared = "use an absolute path on storage the cluster shares (e.g. /mnt/shared/...) or a URI (s3://...)"
    for where, role, value in job.path_values(path):
        if (local := _relative(value)) is None:
            continue
        if role == "output":
            default = "" if _given(data, where) else " (default)"
            raise ConfigError(f"{path}: {where}{default}: {value!r} is relative; {copy}, which the cluster deletes "
                              f"afterwards: {shared}")
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


def _given(data: Any, where: str) -> bool:
    """Whether the file itself names ``where`` (a dotted field), rather than the spec's default."""
    for key in where.split("."):
        if isinstance(data, list) and key.isdigit() and int(key) < len(data):
            data = data[int(key)]
        elif isinstance(data, dict) and key in data:
            data = data[key]
        else:
            return False
    return True
