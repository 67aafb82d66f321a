"""Self-describing model bundles: a directory with ``bundle.json`` and safetensors weights.

A bundle is what leaves training: the encoder (the whole recipe model, teachers
included, so it can resume pretraining or be fine-tuned), optionally a task head, and
everything needed to feed it correctly without the training code's context: the recipe
and preset it was built from, the fully resolved recipe config, the sensors with their
band subsets, the normalisation the model was trained with, the input size, the head's
spec and class names, and where it came from (run name, MLflow run id, git sha, ...).

Layout::

    <bundle>/
      bundle.json          plain JSON (see ``save_bundle``)
      model.safetensors    the model's state_dict
      head.safetensors     the head's state_dict (optional)

Loading never unpickles: weights are safetensors, metadata is JSON, and every weight
file's sha256 (recorded in ``bundle.json``) is checked before a byte of it is used.
Tensors that share memory (tied weights) are stored once and recorded as aliases, so a
loaded state_dict has every key the model's own state_dict has.

Saving is atomic: the bundle is written into a temporary sibling directory, flushed to
disk and renamed into place, so a crash leaves either the previous bundle or the new
one, never a half-written one. (Replacing an existing bundle takes two renames; a crash
between them leaves the previous bundle under ``.<name>.old-*`` beside the path.)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

import earthray
from earthray.errors import EarthrayError
from earthray.recipes import create_recipe, resolve_config
from earthray.sensors import Sensor, get_sensor

FORMAT_VERSION = 1
META_FILE = "bundle.json"
MODEL_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"

_REQUIRED = ("format_version", "recipe", "preset", "config", "sensors", "normalisation", "input_size", "weights")


class BundleError(EarthrayError, ValueError):
    """A bundle that cannot be loaded: missing or tampered files, bad metadata, unknown format.

    ``reason`` is the problem without the bundle's location, for answers to clients who must not learn
    the server's paths; ``str()`` names both, for the operator.
    """

    def __init__(self, path: str | Path | None, reason: str):
        super().__init__(f"{path}: {reason}" if path is not None else reason)
        self.path, self.reason = path, reason

    def __reduce__(self):  # it crosses Ray's process boundaries: rebuild it from both parts
        return type(self), (self.path, self.reason)


@dataclass
class Bundle:
    path: Path
    meta: dict[str, Any]
    """The parsed ``bundle.json``."""
    model: nn.Module
    """The recipe rebuilt from ``meta`` with the bundle's weights (in eval mode)."""
    head: dict[str, torch.Tensor] | None
    """The head's state_dict, or None; head modules are built from ``meta["head_spec"]`` by fine-tuning."""
    sensors: list[Sensor]
    normalisation: dict[str, dict[str, list[float]]]

    @property
    def recipe(self) -> str:
        return self.meta["recipe"]

    @property
    def input_size(self) -> int:
        return self.meta["input_size"]

    @property
    def classes(self) -> list[str] | None:
        return self.meta.get("classes")

    @property
    def head_spec(self) -> dict | None:
        return self.meta.get("head_spec")

    def input_stats(self) -> dict[str, dict[str, list]]:
        """Per sensor: band names with the mean/std the model was trained with (what pipelines feed it)."""
        return {s.name: {"bands": s.band_names, **self.normalisation[s.name]} for s in self.sensors}


# ---------------------------------------------------------------------------------------------- saving


def save_bundle(
    path: str | Path,
    model: nn.Module,
    *,
    recipe: str,
    preset: str,
    config: Mapping[str, Any] | BaseModel,
    sensors: Sequence[Sensor | str],
    normalisation: Mapping[str, Mapping[str, Sequence[float]]],
    input_size: int,
    head: nn.Module | None = None,
    head_spec: dict | None = None,
    classes: list[str] | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write ``model`` (and ``head``) with everything needed to rebuild and feed them to ``path``.

    ``config`` is the recipe config (a dict of overrides or the resolved pydantic config);
    it is resolved against ``recipe``/``preset`` and stored in full, as plain JSON.
    ``normalisation`` maps every sensor to the ``mean``/``std`` per band the model was
    trained with (in the sensor's band order). ``provenance`` is free JSON (run name,
    MLflow run id, git sha, ...); ``created`` (UTC) is added when absent. Overwrites an
    existing bundle at ``path``, but never a directory that is not a bundle.
    """
    path = Path(path)
    model = _unwrap(model)
    sensors = [s if isinstance(s, Sensor) else get_sensor(s) for s in sensors]
    meta = _build_meta(model, recipe, preset, config, sensors, normalisation, input_size, head, head_spec,
                       classes, provenance)

    if path.exists() and not _replaceable(path):
        raise FileExistsError(f"{path}: exists and is not a bundle (no {META_FILE}); refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)
        weights = {MODEL_FILE: _write_weights(tmp / MODEL_FILE, model.state_dict())}
        if head is not None:
            weights[HEAD_FILE] = _write_weights(tmp / HEAD_FILE, _unwrap(head).state_dict())
        meta["weights"] = weights
        _write_text(tmp / META_FILE, json.dumps(meta, indent=2, allow_nan=False) + "\n")
        _fsync_dir(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _unwrap(module: nn.Module) -> nn.Module:
    """The module itself, not a DDP/DataParallel or ``torch.compile`` wrapper (whose keys carry prefixes)."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def _build_meta(model, recipe, preset, config, sensors, normalisation, input_size, head, head_spec, classes,
                provenance) -> dict[str, Any]:
    if isinstance(config, BaseModel):
        config = config.model_dump()
    resolved = resolve_config(recipe, preset, **dict(config))
    own = getattr(model, "config", None)
    if isinstance(own, BaseModel) and own != resolved:
        diff = {k: (v, getattr(own, k, None)) for k, v in resolved.model_dump().items()
                if v != getattr(own, k, None)}
        raise ValueError(f"config does not match the model's own config (given, model's): {diff}")

    own_sensors = getattr(model, "sensors", None)
    if isinstance(own_sensors, Mapping) and all(isinstance(s, Sensor) for s in own_sensors.values()):
        given = {s.name: s.band_names for s in sensors}
        built = {n: s.band_names for n, s in own_sensors.items()}
        if given != built:
            raise ValueError(f"sensors {given} are not the ones the model was built for: {built}")
    names = [s.name for s in sensors]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate sensors: {names}")

    norm: dict[str, dict[str, list[float]]] = {}
    missing = [n for n in names if n not in normalisation]
    extra = [n for n in normalisation if n not in names]
    if missing or extra:
        raise ValueError(f"normalisation must cover exactly the sensors {names}; missing {missing}, extra {extra}")
    for s in sensors:
        entry = normalisation[s.name]
        if set(entry) != {"mean", "std"}:
            raise ValueError(f"normalisation[{s.name!r}] needs exactly 'mean' and 'std', got {sorted(entry)}")
        mean = [float(v) for v in entry["mean"]]
        std = [float(v) for v in entry["std"]]
        if len(mean) != len(s.bands) or len(std) != len(s.bands):
            raise ValueError(f"normalisation[{s.name!r}]: {len(mean)} means / {len(std)} stds for "
                             f"{len(s.bands)} bands {s.band_names}")
        if not all(v > 0 for v in std):
            raise ValueError(f"normalisation[{s.name!r}]: std must be positive, got {std}")
        norm[s.name] = {"mean": mean, "std": std}

    if isinstance(input_size, bool) or int(input_size) != input_size or input_size <= 0:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
    if head is not None and head_spec is None:
        raise ValueError("a head needs a head_spec (how to rebuild it); got head without head_spec")
    if classes is not None and not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes must be strings, got {classes!r}")
    provenance = dict(provenance or {})
    provenance.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    meta = {
        "format_version": FORMAT_VERSION,
        "earthray_version": earthray.__version__,
        "recipe": recipe,
        "preset": preset,
        "config": resolved.model_dump(mode="json"),
        "sensors": [s.model_dump(mode="json") for s in sensors],
        "normalisation": norm,
        "input_size": int(input_size),
        "head_spec": head_spec,
        "classes": list(classes) if classes is not None else None,
        "provenance": provenance,
    }
    try:  # fail before writing anything if a free-form part is not plain JSON
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bundle metadata is not plain JSON (head_spec, classes, provenance?): {e}") from None
    return meta


def _write_weights(path: Path, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Write a state_dict as safetensors, each shared tensor once; return its ``weights`` entry."""
    from safetensors.torch import save_file

    tensors, aliases = _dedupe(state_dict)
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync(path)
    return {"sha256": _sha256(path), "bytes": path.stat().st_size, "tensors": len(state_dict), "aliases": aliases}


def _dedupe(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Identical views of one storage (tied weights) -> one tensor plus aliases; anything else that
    shares or only partly covers its storage is copied, as safetensors stores whole, disjoint tensors."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.numel() > 0:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                   t.dtype)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        whole = t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size()
        t = t.to("cpu")
        tensors[name] = t if whole and t.numel() > 0 and _sole_user(t, tensors) else t.clone(
            memory_format=torch.contiguous_format)
    return tensors, aliases


def _sole_user(t: torch.Tensor, kept: Mapping[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return all(o.numel() == 0 or o.untyped_storage().data_ptr() != ptr for o in kept.values())


def _replaceable(path: Path) -> bool:
    return path.is_dir() and ((path / META_FILE).exists() or not any(path.iterdir()))


def _move_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
    else:
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- loading


def local_bundle(path: str | Path, tracking_uri: str | None = None) -> Path:
    """A bundle folder for a folder or a registry URI (fetched into the local cache)."""
    from earthray import registry

    if registry.is_registry_uri(path):
        try:
            return registry.fetch(str(path), tracking_uri)
        except (LookupError, ValueError) as e:
            raise BundleError(None, str(e)) from None
    return Path(path)


def read_meta(path: str | Path) -> dict[str, Any]:
    """``bundle.json`` of the bundle at ``path``, checked (format version, required fields); no weights read."""
    path = Path(path)
    file = path / META_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(path, f"not a bundle (no {META_FILE})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(path, f"{META_FILE} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise BundleError(path, f"{META_FILE} must hold a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if type(version) is not int:
        raise BundleError(path, f"bad format_version {version!r} in {META_FILE}")
    if version != FORMAT_VERSION:
        raise BundleError(path, f"unknown bundle format_version {version}; this earthray reads {FORMAT_VERSION}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise BundleError(path, f"{META_FILE} lacks {missing}")
    weights = meta["weights"]
    if not isinstance(weights, dict) or MODEL_FILE not in weights:
        raise BundleError(path, f"{META_FILE} 'weights' must list {MODEL_FILE}")
    for name, entry in weights.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..") \
                or not name.endswith(".safetensors"):
            raise BundleError(path, f"bad weight file name {name!r} (plain *.safetensors names only)")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleError(path, f"weights[{name!r}] lacks a sha256")
    if not isinstance(meta["config"], dict) or not isinstance(meta["sensors"], list) \
            or not isinstance(meta["normalisation"], dict):
        raise BundleError(path, f"{META_FILE} has malformed config/sensors/normalisation")
    return meta


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check ``bundle.json`` and every weight file's sha256; return the metadata."""
    path = Path(path)
    meta = read_meta(path)
    for name, entry in meta["weights"].items():
        file = path / name
        if not file.is_file():
            raise BundleError(path, f"weight file {name} is missing")
        digest = _sha256(file)
        if digest != entry["sha256"]:
            raise BundleError(path, f"{name} sha256 mismatch: expected {entry['sha256']}, found {digest} "
                              "(file modified or corrupt)")
    return meta


def check_bundle(path: str | Path) -> dict[str, Any]:
    """Everything ``load_bundle`` checks, without loading a weight: sha256s, metadata, the recipe rebuilt on
    the meta device, and every tensor's name and shape against it (from the safetensors headers). A driver
    calls it before it starts workers that would otherwise each fail to load the bundle. Returns the metadata."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    meta = verify_bundle(path)
    _, _, model = _rebuild(path, meta, "meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(path / MODEL_FILE), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(path, f"cannot read {MODEL_FILE}: {e}") from None
    _add_aliases(path, MODEL_FILE, meta["weights"][MODEL_FILE], found)
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or unexpected or wrong:
        problems = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
                    if keys]
        raise BundleError(path, f"{MODEL_FILE} does not fit recipe {meta['recipe']!r} ({'; '.join(problems)})")
    return meta


def _add_aliases(path: Path, name: str, entry: dict[str, Any], found: dict[str, Any]) -> None:
    """Give ``found`` (tensors, or their shapes) the tied names the weight file stores once."""
    for alias, target in (entry.get("aliases") or {}).items():
        if target not in found:
            raise BundleError(path, f"{name}: alias {alias!r} names missing tensor {target!r}")
        found[alias] = found[target]


def _rebuild(path: Path, meta: dict[str, Any], device: str | torch.device) -> tuple[list[Sensor], dict, nn.Module]:
    """The bundle's sensors, normalisation and recipe (fresh weights) from its checked metadata."""
    try:
        sensors = [Sensor.model_validate(s) for s in meta["sensors"]]
    except ValidationError as e:
        raise BundleError(path, f"bad sensor in {META_FILE}: {e}") from None
    normalisation = meta["normalisation"]
    for s in sensors:
        entry = normalisation.get(s.name)
        if not isinstance(entry, dict) or any(len(entry.get(k) or ()) != len(s.bands) for k in ("mean", "std")):
            raise BundleError(path, f"normalisation for {s.name!r} must give mean and std for its "
                              f"{len(s.bands)} bands")

    # Every weight comes from the bundle: never fetch pretrained weights or read initial-weight files
    # (which need not exist where the bundle is loaded) while rebuilding.
    config = {k: (False if "pretrained" in k and v is True else v) for k, v in meta["config"].items()}
    try:
        model = create_recipe(meta["recipe"], sensors, meta["preset"], device=device, initial_weights=False,
                              **config)
    except (KeyError, ValidationError, TypeError, ValueError) as e:
        raise BundleError(path, f"cannot rebuild recipe {meta['recipe']!r} ({meta['preset']}): {e}") from None
    return sensors, normalisation, model


def load_bundle(path: str | Path, device: str | torch.device = "cpu", tracking_uri: str | None = None) -> Bundle:
    """Rebuild the bundle's model on ``device`` and load its weights strictly (after checking sha256s).

    ``path`` is a bundle folder or a registry URI, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
    (looked up in ``tracking_uri``, default: ``MLFLOW_TRACKING_URI``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = local_bundle(path, tracking_uri)
    meta = verify_bundle(path)
    sensors, normalisation, model = _rebuild(path, meta, device)

    def read(name: str) -> dict[str, torch.Tensor]:
        entry = meta["weights"][name]
        try:
            tensors = load_file(str(path / name), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(path, f"cannot read {name}: {e}") from None
        _add_aliases(path, name, entry, tensors)
        return tensors

    try:
        model.load_state_dict(read(MODEL_FILE), strict=True)
    except RuntimeError as e:
        raise BundleError(path, f"{MODEL_FILE} does not fit recipe {meta['recipe']!r}: {e}") from None
    head = read(HEAD_FILE) if HEAD_FILE in meta["weights"] else None
    return Bundle(path, meta, model.eval(), head, sensors, normalisation)
