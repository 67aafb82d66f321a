"""The MLflow Model Registry for bundles: register a fine-tuned bundle, point aliases at it, fetch it by URI.

A registered version's source is the bundle folder logged as artifacts of its training run
(``runs:/<run>/bundle``), so the registry stores the same bytes the run produced. Its tags
carry what a client needs before downloading anything: sensors, bands, classes, task, metrics.
Anything that loads a bundle accepts ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``;
downloads are cached per name and version (versions are immutable), so a Serve replica or a
re-run fetches once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from earthray.errors import ConfigError

SCHEME = "models:/"
ARTIFACT_PATH = "bundle"


@dataclass
class RegisteredBundle:
    name: str
    version: str
    uri: str
    """``models:/NAME/VERSION``: immutable, unlike an alias."""


def is_registry_uri(path: str | os.PathLike) -> bool:
    return str(path).startswith(SCHEME)


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)  # never a process-wide default


def register_bundle(bundle: str | Path, name: str, *, tracking_uri: str, run_id: str,
                    aliases: list[str] | tuple[str, ...] = (), metrics: dict[str, float] | None = None,
                    description: str = "") -> RegisteredBundle:
    """Log ``bundle`` into ``run_id`` (unless already there) and register it as a new version of ``name``."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    meta = json.loads((Path(bundle) / "bundle.json").read_text())
    logged = {f.path for f in client.list_artifacts(run_id, ARTIFACT_PATH)}
    if f"{ARTIFACT_PATH}/bundle.json" not in logged:
        client.log_artifacts(run_id, str(bundle), ARTIFACT_PATH)
    try:
        client.create_registered_model(name, description="earthray bundles")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    tags = {
        "earthray.recipe": meta["recipe"], "earthray.preset": meta["preset"],
        "earthray.sensors": json.dumps({s["name"]: [b["name"] for b in s["bands"]] for s in meta["sensors"]}),
        "earthray.input_size": str(meta["input_size"]),
        "earthray.task": (meta.get("head_spec") or {}).get("task", "encoder"),
        "earthray.classes": json.dumps(meta.get("classes")),
        **{f"metric.{k}": f"{v:.6g}" for k, v in (metrics or {}).items()},
    }
    version = client.create_model_version(name, source=f"runs:/{run_id}/{ARTIFACT_PATH}", run_id=run_id, tags=tags,
                                          description=description)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    return RegisteredBundle(name, str(version.version), f"{SCHEME}{name}/{version.version}")


def set_alias(name: str, alias: str, version: str | int, tracking_uri: str) -> None:
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))


def resolve(uri: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version)."""
    from mlflow.exceptions import MlflowException

    rest = uri[len(SCHEME):]
    name, sep, alias = rest.partition("@")
    client = _client(tracking_uri)
    try:
        if sep:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = rest.rpartition("/")
        if not name or not version:
            raise ConfigError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return name, str(client.get_model_version(name, version).version)
    except MlflowException as e:
        raise LookupError(f"{uri}: not in the model registry at {client.tracking_uri}: {e.message}") from None


def fetch(uri: str, tracking_uri: str | None = None, cache: str | Path | None = None) -> Path:
    """The local folder of the registered bundle ``uri``, downloaded once into the cache."""
    import mlflow.artifacts

    name, version = resolve(uri, tracking_uri)
    cache = Path(cache or os.environ.get("EARTHRAY_MODEL_CACHE") or Path.home() / ".cache" / "earthray" / "models")
    target = cache / _safe(str(_client(tracking_uri).tracking_uri)) / name / version
    if (target / "bundle.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
    try:
        # Not the models:/ URI: MLflow looks that up in its process-global registry URI, not in tracking_uri.
        source = _client(tracking_uri).get_model_version_download_uri(name, version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking_uri)
        os.rename(local, target)
    except OSError:
        if not (target / "bundle.json").exists():  # another process did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _safe(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:12]
