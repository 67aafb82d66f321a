"""The ingest spec: which scenes, as which sensors, chipped how, split how, written where."""

from __future__ import annotations

import glob
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from earthray.config import ConfigError, StrictModel, load_yaml, resolve_path


class SourceSpec(StrictModel):
    """Where one sensor's pixels come from. Give ``path`` or ``stack``."""

    path: str | None = Field(None, description="a GeoTIFF/COG/ENVI file or S2 SAFE; a glob makes one scene per match")
    stack: list[str] | None = Field(None, description="one-band files forming one band stack (Landsat style)")
    bands: list[str] | None = Field(None, description="catalogue band names the file holds, in file order")
    time_series: bool = Field(False, description="the file's bands are dates (x bands): a (T, C, H, W) series")

    @model_validator(mode="after")
    def _one_source(self) -> SourceSpec:
        if (self.path is None) == (self.stack is None):
            raise ValueError("give exactly one of 'path' or 'stack'")
        return self


class LabelSpec(StrictModel):
    path: str
    classes: list[str] | None = Field(None, description="class names, index = label value - first_class")
    first_class: int = 0
    nodata: float | None = None


class InputSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    sensors: dict[str, SourceSpec] = Field(min_length=1, description="sensor -> source; the first sets the grid")
    label: LabelSpec | None = None
    chip_size: int | None = Field(None, ge=8)
    stride: int | None = Field(None, ge=1)
    group_name: str | None = Field(None, alias="group", pattern=r"^[A-Za-z0-9_.+@-]+$",
                                   description="shard folder; default: the sensor set, e.g. s1_grd+s2_l1c")

    @property
    def group(self) -> str:
        """The shard folder: one schema per folder, so pipelines stream homogeneous groups without a join.

        Default: the sensor set, with ``@series`` on time-series sensors and ``+label`` when labelled.
        """
        if self.group_name:
            return self.group_name
        name = "+".join(f"{n}@series" if s.time_series else n for n, s in self.sensors.items())
        return f"{name}+label" if self.label else name

    @property
    def kind(self) -> str:
        if any(s.time_series for s in self.sensors.values()):
            return "timeseries"
        return "colocated" if len(self.sensors) > 1 else "unpaired"


class SplitSpec(StrictModel):
    """Spatial-block split: chips whose centres share a block share a split, so neighbours don't leak."""

    train: float = Field(0.8, ge=0)
    val: float = Field(0.1, ge=0)
    test: float = Field(0.1, ge=0)
    block_size: float | None = Field(None, gt=0, description="block edge in CRS units; default 4 chip widths")
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSpec:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1 (got {total:g})")
        return self


class IngestSpec(StrictModel):
    name: str = "ingest"
    output: str
    sensors_file: str | None = Field(None, description="extra sensor catalogue YAML (adds or overrides sensors)")
    chip_size: int = Field(64, ge=8)
    stride: int | None = Field(None, ge=1)
    min_valid_fraction: float = Field(0.5, ge=0, le=1)
    split: SplitSpec = SplitSpec()
    rows_per_group: int = Field(128, ge=1, description="Parquet row-group size: the unit a reader streams")
    compression: str = "zstd"
    address: str | None = Field(None, description="Ray cluster address; None starts or joins a local Ray")
    inputs: list[InputSpec] = Field(min_length=1)

    @field_validator("inputs")
    @classmethod
    def _unique_names(cls, inputs: list[InputSpec]) -> list[InputSpec]:
        names = [i.name for i in inputs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"input names must be unique; repeated: {dup}")
        return inputs

    @model_validator(mode="after")
    def _groups_consistent(self) -> IngestSpec:
        first: dict[str, InputSpec] = {}
        for inp in self.inputs:
            for sensor, src in inp.sensors.items():
                if len(inp.sensors) > 1 and src.path and glob.has_magic(src.path):
                    raise ValueError(f"inputs.{inp.name}.sensors.{sensor}.path: globs are for single-sensor "
                                     f"inputs; a co-located group names one scene per sensor")
            other = first.setdefault(inp.group, inp)
            for what, mine, theirs in [
                ("chip size", self.chip(inp)[0], self.chip(other)[0]),
                ("label", inp.label is not None, other.label is not None),
                ("sensors", list(inp.sensors), list(other.sensors)),
                ("bands", [s.bands for s in inp.sensors.values()], [s.bands for s in other.sensors.values()]),
                ("time_series", [s.time_series for s in inp.sensors.values()],
                 [s.time_series for s in other.sensors.values()]),
            ]:
                if mine != theirs:
                    raise ValueError(f"inputs {other.name!r} and {inp.name!r} both write group {inp.group!r} but "
                                     f"differ in {what} ({theirs} vs {mine}); one group is one schema: give one "
                                     f"of them its own 'group'")
        return self

    def chip(self, inp: InputSpec) -> tuple[int, int]:
        size = inp.chip_size or self.chip_size
        return size, inp.stride or self.stride or size


def load_spec(path: str | Path) -> IngestSpec:
    """Load a spec; relative paths in it are relative to the spec file, as a reader expects."""
    spec = load_yaml(path, IngestSpec)
    return resolve_paths(spec, Path(path).parent)


def resolve_paths(spec: IngestSpec, base: Path) -> IngestSpec:
    spec = spec.model_copy(deep=True)
    spec.output = resolve_path(spec.output, base)
    if spec.sensors_file:
        spec.sensors_file = resolve_path(spec.sensors_file, base)
    for inp in spec.inputs:
        for src in inp.sensors.values():
            if src.path:
                src.path = resolve_path(src.path, base)
            if src.stack:
                src.stack = [resolve_path(p, base) for p in src.stack]
        if inp.label:
            inp.label.path = resolve_path(inp.label.path, base)
    return spec


def expand(pattern: str, where: str) -> list[str]:
    """A path or glob -> the matching paths (sorted); a glob matching nothing is a spec error."""
    if "://" in pattern or not glob.has_magic(pattern):
        return [pattern]
    found = sorted(glob.glob(pattern))
    if not found:
        raise ConfigError(f"{where}: no files match {pattern!r}")
    return found
