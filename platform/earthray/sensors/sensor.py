"""What a sensor is: its bands, how raw values become physical ones, and how to normalise them."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from earthray.config import StrictModel
from earthray.errors import ConfigError

Kind = Literal["optical", "sar", "elevation"]

STD_FLOOR = 1e-6
"""The smallest std a band is normalised with: a band constant over a small sample has std 0."""


class Band(StrictModel):
    name: str
    wavelength: float | None = Field(None, gt=0, description="central wavelength, nm (optical)")
    polarisation: str | None = Field(None, description="e.g. VV, VH, HH (SAR)")
    gsd: float = Field(gt=0, description="ground sampling distance, m")
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


class ValueTransform(StrictModel):
    """Raw stored value -> physical value: ``x * scale + offset``, then optionally to decibels,
    ``db_factor * log10(y) + db_offset`` (10 for power; 20 and an offset for amplitude DNs, such as
    openEO's Sentinel-1 composites, dB = 20 log10(DN) - 83)."""

    scale: float = 1.0
    offset: float = 0.0
    to_db: bool = False
    db_factor: float = 10.0
    db_offset: float = 0.0

    @field_validator("scale", "db_factor")
    @classmethod
    def _invertible(cls, v: float) -> float:
        if v == 0:
            raise ValueError("must not be 0 (the transform must be invertible)")
        return v

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = x.astype(np.float32, copy=False)
        if self.scale != 1.0 or self.offset != 0.0:
            y = y * np.float32(self.scale) + np.float32(self.offset)
        if self.to_db:
            y = np.float32(self.db_factor) * np.log10(np.maximum(y, np.float32(1e-10))) + np.float32(self.db_offset)
        return y

    def invert(self, y: np.ndarray) -> np.ndarray:
        """Physical value -> raw stored value (float64): what ingest stores for values that arrive physical."""
        x = np.asarray(y, np.float64)
        if self.to_db:
            x = 10.0 ** ((x - self.db_offset) / self.db_factor)
        return (x - self.offset) / self.scale


class Sensor(StrictModel):
    name: str
    description: str = ""
    kind: Kind
    dtype: str = Field(description="numpy dtype chips are stored in")
    nodata: float | None = None
    transform: ValueTransform = ValueTransform()
    aliases: list[str] = []
    bands: list[Band] = Field(min_length=1)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        try:
            np.dtype(v)
        except TypeError:
            raise ValueError(f"not a numpy dtype: {v!r}") from None
        return v

    @model_validator(mode="after")
    def _bands_fit_kind(self) -> Sensor:
        names = [b.name for b in self.bands]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate band names {dup}")
        if self.kind == "sar":
            missing = [b.name for b in self.bands if not b.polarisation]
            if missing:
                raise ValueError(f"SAR bands need a polarisation: {missing}")
        if self.kind == "optical":
            missing = [b.name for b in self.bands if b.wavelength is None]
            if missing:
                raise ValueError(f"optical bands need a wavelength: {missing}")
        return self

    @property
    def band_names(self) -> list[str]:
        return [b.name for b in self.bands]

    @property
    def gsd(self) -> float:
        """The finest band's GSD: the grid a multi-resolution product is brought to."""
        return min(b.gsd for b in self.bands)

    def select(self, bands: list[str] | None) -> Sensor:
        """This sensor restricted to ``bands`` (in that order); None keeps all."""
        if bands is None:
            return self
        by_name = {b.name: b for b in self.bands}
        unknown = [b for b in bands if b not in by_name]
        if unknown:
            raise ConfigError(f"sensor {self.name!r} has no bands {unknown}; it has {self.band_names}")
        return self.model_copy(update={"bands": [by_name[b] for b in bands]})

    @property
    def mean(self) -> np.ndarray:
        return np.array([b.mean for b in self.bands], np.float32)

    @property
    def std(self) -> np.ndarray:
        return np.array([b.std for b in self.bands], np.float32)

    def normalise(self, x: np.ndarray, mean=None, std=None) -> np.ndarray:
        """Stored values (..., C, H, W) -> physical -> zero-mean unit-variance per band.

        ``mean``/``std`` override the catalogue defaults (e.g. with an ingest manifest's).
        """
        shape = (-1, 1, 1)
        mean = np.asarray(self.mean if mean is None else mean, np.float32).reshape(shape)
        std = np.asarray(self.std if std is None else std, np.float32).reshape(shape)
        return (self.transform.apply(x) - mean) / std
