"""YAML-backed pydantic configs with errors that name the file, the field and the bad value.

Every spec earthray reads (sensor catalogues, ingest, jobs, sweeps) goes through
:func:`load_yaml`, so a user sees one kind of message for one kind of mistake.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

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


def load_yaml(path: str | Path, model: type[M]) -> M:
    return validate(model, read_yaml(path), str(path))


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
