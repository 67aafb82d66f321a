"""YAML-backed pydantic configs with errors that name the file, the field and the bad value.

Every spec earthray reads (sensor catalogues, ingest, jobs, sweeps) goes through
:func:`load_yaml`, so a user sees one kind of message for one kind of mistake.
"""

from __future__ import annotations

import glob
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from earthray.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown fields are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _field(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{source}: {_field(e['loc'])}: {e['msg']}{shown}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning syntax errors into a line-numbered ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}: invalid YAML: {where}{problem}") from None


def validate(model: type[M], data: Any, source: str) -> M:
    """Validate plain data against a model; errors name ``source`` and each bad field."""
    if data is None:
        raise ConfigError(f"{source}: is empty")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_yaml(path: str | Path, model: type[M], *, resolve: bool = True) -> M:
    """Load and validate a spec; its typed paths are made absolute against the file's folder."""
    spec = validate(model, read_yaml(path), str(path))
    return resolve_paths(spec, Path(path).parent) if resolve else spec


def resolve_path(value: str, base: str | Path) -> str:
    """A path a spec names, made absolute against the spec file's folder ``base``.

    Specs are written relative to where they live, so a job runs the same from any working
    directory. URIs (``s3://``, ``models:/``) and absolute paths pass through; a relative
    ``sqlite:///`` tracking URI is made absolute like a path; a glob keeps its pattern.
    """
    if value.startswith("sqlite:///"):
        db = value[len("sqlite:///"):]
        return value if db.startswith("/") or db.startswith(":memory:") else f"sqlite:///{resolve_path(db, base)}"
    if "://" in value or value.startswith("models:/") or Path(value).is_absolute():
        return value
    base = Path(base).resolve()
    return str(base / value) if glob.has_magic(value) else str((base / value).resolve())


@dataclass(frozen=True)
class PathRole:
    """Marks a spec field as a path the job reads (``input``) or writes (``output``)."""

    role: Literal["input", "output"]


InputPath = Annotated[str, PathRole("input")]
"""A file, folder, glob or URI the job reads; relative to the spec file."""
OutputPath = Annotated[str, PathRole("output")]
"""A folder, file or tracking URI (``sqlite:///rel.db``) the job writes; relative to the spec file."""


def _arms(tp: Any, meta: tuple = ()) -> list[tuple[Any, tuple]]:
    """The alternatives of a type (Optional/Union unwrapped), each with its Annotated metadata."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extra = get_args(tp)
        return _arms(base, meta + tuple(extra))
    if origin in (Union, types.UnionType):
        return [arm for a in get_args(tp) for arm in _arms(a, meta)]
    return [(tp, meta)]


def _walk(value: Any, arms: list[tuple[Any, tuple]], where: str) -> Iterator[tuple[str, str, Any, list]]:
    """(dotted place, role, value, parent container and key) of every typed path under ``value``."""
    if value is None:
        return
    if isinstance(value, BaseModel):
        yield from path_values(value, where)
    elif isinstance(value, str):
        role = next((m.role for tp, meta in arms if tp is str for m in meta if isinstance(m, PathRole)), None)
        if role is not None:
            yield where, role, value, []
    elif isinstance(value, list | tuple | dict):
        inner = [arm for tp, _ in arms if get_origin(tp) in (list, tuple, dict)
                 for arm in _arms(get_args(tp)[-1 if get_origin(tp) is dict else 0])]
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            for place, role, found, _ in _walk(item, inner, f"{where}.{key}"):
                yield place, role, found, [value, key] if found is item else _


def path_values(spec: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, Any, list]]:
    """Every typed path a spec holds: (dotted field, ``input``/``output``, value, [container, key])."""
    for name, info in type(spec).model_fields.items():
        value = getattr(spec, name)
        where = f"{prefix}.{name}" if prefix else name
        if isinstance(value, str):
            for place, role, found, _ in _walk(value, _arms(info.annotation, tuple(info.metadata)), where):
                yield place, role, found, [spec, name]
        else:
            yield from _walk(value, _arms(info.annotation, tuple(info.metadata)), where)


def resolve_paths(spec: M, base: str | Path) -> M:
    """A copy of ``spec`` whose typed paths (:data:`InputPath`, :data:`OutputPath`) are absolute: the one
    place a spec's relative paths are resolved against the spec file's folder."""
    spec = spec.model_copy(deep=True)
    for _, _, value, (holder, key) in list(path_values(spec)):
        if isinstance(holder, BaseModel):
            setattr(holder, key, resolve_path(value, base))
        else:
            holder[key] = resolve_path(value, base)
    return spec


class TrackingSpec(StrictModel):
    """Where a job logs its MLflow runs: shared by every command that tracks."""

    tracking_uri: OutputPath | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else "
                                            "sqlite:///<workdir>/mlflow.db")
    experiment: str = "earthray"

    def uri(self, workdir: str | Path) -> str:
        return (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{Path(workdir, 'mlflow.db').resolve()}")


class RuntimeSpec(StrictModel):
    """Where a job runs and writes: shared by the commands that start Ray work and keep outputs."""

    workdir: OutputPath = Field("work", description="runs, checkpoints, bundles and the default MLflow store")
    address: str | None = Field(None, description="Ray cluster address; None starts or joins a local Ray")
