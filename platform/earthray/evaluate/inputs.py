"""What a bundle's encoder is fed: the manifest-normalised bands of a group, mapped band by band
(by name) onto the bands and statistics the bundle was trained with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from earthray.bundle import Bundle
from earthray.config import ConfigError
from earthray.data.pipeline import GroupReader


@dataclass
class BandMap:
    """Manifest-normalised bands -> the bundle's: pick the bundle's bands, then ``x * scale + shift``."""

    index: list[int]
    scale: np.ndarray
    shift: np.ndarray


def input_mapping(bundle: Bundle, manifest: dict, group: str, inputs: list[str] | None = None) -> dict[str, BandMap]:
    """How to turn each sensor of ``group`` (or its ``inputs``) as ``read_group`` delivers it into what
    the bundle was trained on; sensors left out are not fed to the encoder.

    The bundle's bands are picked from the group's by name; a sensor or band the bundle needs but
    the group lacks, or a different value transform, is a ConfigError naming them.
    """
    reader = GroupReader.from_manifest(manifest, group)
    unknown = [s for s in inputs or [] if s not in reader.sensors]
    if unknown:
        raise ConfigError(f"data.inputs: group {group!r} has no sensors {unknown}; it has {list(reader.sensors)}")
    sensors = {s.name: s for s in bundle.sensors}
    source = str(bundle.path)
    out = {}
    for name, norm in reader.sensors.items():
        if inputs is not None and name not in inputs:
            continue
        if name not in sensors:
            raise ConfigError(f"data.group {group!r}: sensor {name!r} is not one the bundle {source} was trained on "
                              f"(its sensors: {', '.join(sensors)})")
        have = manifest["groups"][group]["bands"][name]
        want = sensors[name].band_names
        missing = [b for b in want if b not in have]
        if missing:
            raise ConfigError(f"data.group {group!r}: sensor {name!r} lacks bands {missing} the bundle {source} "
                              f"needs (group bands {have}, bundle bands {want})")
        if norm.transform != sensors[name].transform:
            raise ConfigError(f"data.group {group!r}: sensor {name!r} was ingested with value transform "
                              f"{norm.transform.model_dump()}, the bundle {source} expects "
                              f"{sensors[name].transform.model_dump()}")
        index = [have.index(b) for b in want]
        mean = np.asarray(bundle.normalisation[name]["mean"], np.float32)
        std = np.asarray(bundle.normalisation[name]["std"], np.float32)
        out[name] = BandMap(index, norm.std[index] / std, (norm.mean[index] - mean) / std)
    return out


def model_inputs(batch: dict[str, np.ndarray], mapping: dict[str, BandMap]) -> dict[str, torch.Tensor]:
    """A decoded batch (manifest-normalised) -> the recipe batch the bundle expects (its bands, its statistics)."""
    out = {}
    for name, r in mapping.items():
        x = batch[name][..., r.index, :, :] * r.scale.reshape(-1, 1, 1) + r.shift.reshape(-1, 1, 1)
        valid = np.asarray(batch[f"{name}.valid"], bool)
        out[name] = torch.from_numpy(np.where(np.expand_dims(valid, -3), x, 0).astype(np.float32))
        out[f"{name}.valid"] = torch.from_numpy(valid.copy())
        out[f"{name}.present"] = torch.from_numpy(np.array(batch[f"{name}.present"], bool))
        for key in (f"{name}.doy", f"{name}.tmask"):
            if key in batch:
                out[key] = torch.from_numpy(np.array(batch[key]))
    out["lonlat"] = torch.from_numpy(np.array(batch["lonlat"], np.float32))
    return out

