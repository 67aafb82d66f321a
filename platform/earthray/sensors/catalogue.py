"""The sensor catalogue: built-in sensors plus any user YAML that adds or overrides them.

A user file has the built-in layout (``sensors: {name: {...}}``). An entry may say
``extends: BASE`` to start from another sensor and change only some fields, and may
give ``band_ranges`` (prefix, count, first/last wavelength, gsd) instead of listing
hundreds of hyperspectral bands one by one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from earthray.config import ConfigError, read_yaml, validate
from earthray.errors import NotFound
from earthray.sensors.sensor import Sensor

BUILTIN = Path(__file__).with_name("builtin.yaml")
ENV_VAR = "EARTHRAY_SENSORS"


def _expand_band_ranges(entry: dict[str, Any], where: str) -> dict[str, Any]:
    ranges = entry.pop("band_ranges", None)
    if not ranges:
        return entry
    bands = list(entry.get("bands") or [])
    for i, r in enumerate(ranges):
        try:
            count = int(r["count"])
            wl = np.linspace(float(r["first"]), float(r["last"]), count)
            bands += [
                {"name": f"{r['prefix']}{j + 1:03d}", "wavelength": round(float(w), 2), "gsd": r["gsd"],
                 **{k: r[k] for k in ("mean", "std") if k in r}}
                for j, w in enumerate(wl)
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: band_ranges.{i}: needs prefix, count, first, last, gsd ({e})") from None
    entry["bands"] = bands
    return entry


class Catalogue:
    """Sensors by name (and alias). Later sources override earlier ones."""

    def __init__(self, sensors: Iterable[Sensor] = ()):
        self._sensors: dict[str, Sensor] = {}
        for s in sensors:
            self.add(s)

    def add(self, sensor: Sensor) -> None:
        self._sensors[sensor.name] = sensor

    def load(self, path: str | Path) -> Catalogue:
        data = read_yaml(path)
        if not isinstance(data, dict) or not isinstance(data.get("sensors"), dict):
            raise ConfigError(f"{path}: sensors: expected a mapping of sensor name -> definition")
        for name, entry in data["sensors"].items():
            where = f"{path}: sensors.{name}"
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: expected a mapping (got {entry!r})")
            entry = dict(entry)
            base = entry.pop("extends", None)
            if base is not None:
                if base not in self:
                    raise ConfigError(f"{where}: extends: unknown sensor {base!r}")
                entry = {**self[base].model_dump(exclude={"aliases"}), **entry}
            entry = _expand_band_ranges(entry, where)
            entry["name"] = name
            self.add(validate(Sensor, entry, f"{path}: sensors.{name}"))
        return self

    def __contains__(self, name: str) -> bool:
        try:
            self[name]
        except KeyError:
            return False
        return True

    def __getitem__(self, name: str) -> Sensor:
        if name in self._sensors:
            return self._sensors[name]
        for s in self._sensors.values():
            if name in s.aliases:
                return s
        raise NotFound(f"unknown sensor {name!r}; known: {', '.join(sorted(self._sensors))}")

    def __iter__(self):
        return iter(self._sensors.values())

    def __len__(self) -> int:
        return len(self._sensors)


def load_catalogue(*extra: str | Path) -> Catalogue:
    """Built-in sensors, then files from ``$EARTHRAY_SENSORS`` (os.pathsep-separated), then ``extra``."""
    cat = Catalogue().load(BUILTIN)
    env = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    for path in [*env, *extra]:
        cat.load(path)
    return cat


_default: Catalogue | None = None


def default_catalogue() -> Catalogue:
    global _default
    if _default is None:
        _default = load_catalogue()
    return _default


def get_sensor(name: str, catalogue: Catalogue | None = None) -> Sensor:
    return (catalogue or default_catalogue())[name]
