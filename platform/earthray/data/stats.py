"""Per-band statistics accumulated while streaming, mergeable across scenes and workers."""

from __future__ import annotations

import numpy as np


class BandStats:
    """Count, mean, M2 (Chan et al.'s parallel variance), min and max per band, in float64."""

    def __init__(self, bands: int):
        self.count = np.zeros(bands, np.int64)
        self.mean = np.zeros(bands, np.float64)
        self.m2 = np.zeros(bands, np.float64)
        self.min = np.full(bands, np.inf)
        self.max = np.full(bands, -np.inf)

    def update(self, values: np.ndarray, valid: np.ndarray) -> None:
        """``values``/``valid`` are ``(C, ...)``; only valid pixels count."""
        for c in range(values.shape[0]):
            v = values[c][valid[c]]
            if v.size:
                mean = float(v.sum(dtype=np.float64)) / v.size
                d = v - np.asarray(mean, v.dtype) if v.dtype.kind == "f" else v.astype(np.float64) - mean
                self._merge(c, v.size, mean, float(np.square(d).sum(dtype=np.float64)), float(v.min()), float(v.max()))

    def _merge(self, c: int, n: int, mean: float, m2: float, lo: float, hi: float) -> None:
        total = self.count[c] + n
        delta = mean - self.mean[c]
        self.mean[c] += delta * n / total
        self.m2[c] += m2 + delta**2 * self.count[c] * n / total
        self.count[c] = total
        self.min[c] = min(self.min[c], lo)
        self.max[c] = max(self.max[c], hi)

    def merge(self, other: BandStats) -> BandStats:
        for c in range(len(self.count)):
            if other.count[c]:
                self._merge(c, int(other.count[c]), other.mean[c], other.m2[c], other.min[c], other.max[c])
        return self

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / np.maximum(self.count, 1))

    def to_dict(self) -> dict[str, list]:
        finite = self.count > 0
        return {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "min": [float(v) if f else None for v, f in zip(self.min, finite)],
            "max": [float(v) if f else None for v, f in zip(self.max, finite)],
            "m2": self.m2.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> BandStats:
        s = cls(len(d["count"]))
        s.count = np.asarray(d["count"], np.int64)
        s.mean = np.asarray(d["mean"], np.float64)
        s.m2 = np.asarray(d["m2"], np.float64)
        s.min = np.array([np.inf if v is None else v for v in d["min"]], np.float64)
        s.max = np.array([-np.inf if v is None else v for v in d["max"]], np.float64)
        return s
