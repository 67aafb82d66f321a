"""The ingest spec: which scenes, as which sensors, chipped how, labelled how, split how, written where."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from earthray.config import ConfigError, InputPath, OutputPath, StrictModel, load_yaml
from earthray.sensors import ValueTransform

Split = Literal["train", "val", "test"]


class MaskSpec(StrictModel):
    """A per-date quality layer of a datacube: pixels whose class is not listed are invalid in every band."""

    variable: str = Field(description="the cube variable, e.g. SCL (Sentinel-2 scene classification)")
    valid: list[int] = Field(min_length=1, description="classes that count as clear, e.g. [4, 5, 6, 7, 11] for SCL")


class SourceSpec(StrictModel):
    """Where one sensor's pixels come from. Give ``path`` or ``stack``.

    In a co-located input, paths may hold named placeholders (``{patch}``, or ``{patch:\\d+_\\d+}`` with a
    regular expression): the first sensor's matches define the scenes, and every other path is the same
    pattern with the scene's values filled in, which is how a folder of pairs is ingested in one input.
    """

    path: InputPath | None = Field(None, description="a GeoTIFF/COG/ENVI file, S2 SAFE or netCDF/Zarr cube; "
                             "a glob makes one scene per match")
    stack: list[InputPath] | None = Field(None, description="files forming one band stack: one-band rasters (Landsat "
                                    "style) or cubes holding different bands (S2 10 m + 20 m files)")
    bands: list[str] | dict[str, str] | None = Field(
        None, description="catalogue bands the source holds, in file order; for a cube, catalogue band -> variable "
                          "(a list means variables named like the bands)")
    time_series: bool = Field(False, description="keep every date: a (T, C, H, W) series per chip")
    date: str | None = Field(None, description="a cube read as one date: 'clearest' or the step nearest YYYY-MM-DD")
    mask: MaskSpec | None = Field(None, description="a cube's quality variable masking each date")
    nodata: float | None = Field(None, description="the stored nodata value when the file declares none")
    transform: ValueTransform | None = Field(
        None, description="how the file's values become physical, when they are not the sensor's own raw units "
                          "(e.g. openEO S1 composites: {to_db: true, db_factor: 20, db_offset: -83})")

    @model_validator(mode="after")
    def _one_source(self) -> SourceSpec:
        if (self.path is None) == (self.stack is None):
            raise ValueError("give exactly one of 'path' or 'stack'")
        if self.date is not None and self.time_series:
            raise ValueError("date picks one step of a cube; it cannot be combined with time_series: true")
        return self

    @property
    def band_list(self) -> list[str] | None:
        return list(self.bands) if self.bands is not None else None

    @property
    def variables(self) -> list[str] | None:
        if self.bands is None:
            return None
        return list(self.bands.values()) if isinstance(self.bands, dict) else list(self.bands)


class LabelSpec(StrictModel):
    """One label layer: per pixel (a raster or cube variable, reprojected nearest) or per scene (class names
    listed in a JSON file beside the scene, as BigEarthNet's), becoming a label column of the shards."""

    name: str = Field("label", pattern=r"^[A-Za-z0-9_]+$", description="layer name; the first layer is the default")
    path: InputPath | None = Field(None, description="per-pixel label raster or cube (may hold the input's placeholders)")
    variable: str | None = Field(None, description="the cube variable holding the labels")
    scene: InputPath | None = Field(None, description="per-scene labels: a JSON file (may hold the input's placeholders)")
    key: str = Field("labels", description="the JSON field listing the scene's class names")
    classes: list[str] | None = Field(None, description="class names; index = label value - first_class")
    codes: dict[int, str] | None = Field(None, description="label value -> class name (e.g. a legend's codes); "
                                         "values not listed are unlabelled; several codes may share a name")
    first_class: int = 0
    nodata: float | None = None

    @model_validator(mode="after")
    def _one_source(self) -> LabelSpec:
        if (self.path is None) == (self.scene is None):
            raise ValueError("give exactly one of 'path' (per-pixel labels) or 'scene' (per-scene labels)")
        if self.codes is not None and self.classes is not None:
            raise ValueError("give 'codes' (value -> name) or 'classes' (names by value), not both")
        if self.scene is not None and not self.classes:
            raise ValueError("per-scene labels need 'classes': the names a scene's labels are taken from")
        return self

    @property
    def kind(self) -> str:
        return "scene" if self.scene else "pixel"

    @property
    def class_names(self) -> list[str] | None:
        if self.codes is not None:
            return list(dict.fromkeys(self.codes.values()))
        return self.classes

    @property
    def column(self) -> str:
        """The shard column: ``label`` for the default-named layer, ``label.<name>`` for others."""
        return "label" if self.name == "label" else f"label.{self.name}"


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


class InputSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    sensors: dict[str, SourceSpec] = Field(min_length=1, description="sensor -> source; the first sets the grid")
    label: LabelSpec | list[LabelSpec] | None = Field(None, description="one label layer or several")
    chip_size: int | None = Field(None, ge=8)
    stride: int | None = Field(None, ge=1)
    pair_within_days: float | None = Field(
        None, ge=0, description="pair time series: each date of the first sensor with the others' nearest date "
                                "within this many days (a sample per date; a date without a partner keeps its chip "
                                "with the partner absent)")
    split: Split | SplitSpec | None = Field(None, description="a split name puts every chip there (a held-out "
                                            "place); a split spec replaces the spec's spatial blocks for this input")
    group_name: str | None = Field(None, alias="group", pattern=r"^[A-Za-z0-9_.+@-]+$",
                                   description="shard folder; default: the sensor set, e.g. s1_grd+s2_l1c")

    @model_validator(mode="after")
    def _consistent(self) -> InputSpec:
        if self.pair_within_days is not None:
            if len(self.sensors) < 2 or not all(s.time_series for s in self.sensors.values()):
                raise ValueError("pair_within_days pairs time series: give two or more sensors, each time_series: true")
        names = [layer.name for layer in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"label layer names must be unique; got {names}")
        return self

    @property
    def labels(self) -> list[LabelSpec]:
        if self.label is None:
            return []
        return self.label if isinstance(self.label, list) else [self.label]

    @property
    def paired(self) -> bool:
        return self.pair_within_days is not None

    @property
    def group(self) -> str:
        """The shard folder: one schema per folder, so pipelines stream homogeneous groups without a join.

        Default: the sensor set, with ``@series`` on time-series sensors (pairs are single dates) and
        ``+label`` when labelled.
        """
        if self.group_name:
            return self.group_name
        name = "+".join(f"{n}@series" if s.time_series and not self.paired else n for n, s in self.sensors.items())
        return f"{name}+label" if self.labels else name

    @property
    def kind(self) -> str:
        if self.paired:
            return "paired"
        if any(s.time_series for s in self.sensors.values()):
            return "timeseries"
        return "colocated" if len(self.sensors) > 1 else "unpaired"


class IngestSpec(StrictModel):
    name: str = "ingest"
    output: OutputPath
    sensors_file: InputPath | None = Field(None, description="extra sensor catalogue YAML (adds or overrides sensors)")
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
            other = first.setdefault(inp.group, inp)
            for what, mine, theirs in [
                ("chip size", self.chip(inp)[0], self.chip(other)[0]),
                ("labels", [(x.name, x.kind, x.class_names) for x in inp.labels],
                 [(x.name, x.kind, x.class_names) for x in other.labels]),
                ("sensors", list(inp.sensors), list(other.sensors)),
                ("bands", [s.band_list for s in inp.sensors.values()], [s.band_list for s in other.sensors.values()]),
                ("time_series", [s.time_series for s in inp.sensors.values()],
                 [s.time_series for s in other.sensors.values()]),
                ("pairing", inp.paired, other.paired),
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
    return load_yaml(path, IngestSpec)


def expand(pattern: str, where: str, one: bool = False) -> list[str]:
    """A path or glob -> the matching paths (sorted); a glob matching nothing is a spec error, and so is
    one matching several where ``one`` file is expected."""
    if "://" in pattern or not glob.has_magic(pattern):
        return [pattern]
    found = sorted(glob.glob(pattern))
    if not found:
        raise ConfigError(f"{where}: no files match {pattern!r}")
    if one and len(found) > 1:
        raise ConfigError(f"{where}: {pattern!r} matches {len(found)} files; a co-located group names one scene per "
                          f"sensor (pair several with a named placeholder such as {{patch}})")
    return found


_PLACEHOLDER = re.compile(r"\{(\w+)(?::((?:[^{}]|\{\d*,?\d*\})+))?\}")


def placeholders(pattern: str) -> list[str]:
    return [m.group(1) for m in _PLACEHOLDER.finditer(pattern)]


def match_placeholders(pattern: str, where: str) -> list[dict[str, str]]:
    """The values a pattern's placeholders take over the files it matches, sorted and distinct.

    ``{name}`` matches one path segment's text; ``{name:REGEX}`` what REGEX matches. The glob's own
    ``*`` and ``?`` keep their meaning.
    """
    regex, pos = "", 0
    for m in _PLACEHOLDER.finditer(pattern):
        regex += _glob_regex(pattern[pos:m.start()]) + f"(?P<{m.group(1)}>{m.group(2) or '[^/]+'})"
        pos = m.end()
    regex = re.compile(regex + _glob_regex(pattern[pos:]))
    found = []
    for path in expand(_PLACEHOLDER.sub("*", pattern), where):
        m = regex.fullmatch(path)
        if m and m.groupdict() not in found:
            found.append(m.groupdict())
    if not found:
        raise ConfigError(f"{where}: no files match {pattern!r}")
    return sorted(found, key=lambda d: tuple(d.values()))


def fill_placeholders(pattern: str, values: dict[str, str]) -> str:
    """``pattern`` with its placeholders replaced by ``values``, then resolved to the one file it names
    (left as a pattern if no file matches, so the scene is quarantined naming what is missing)."""
    path = _PLACEHOLDER.sub(lambda m: values[m.group(1)], pattern)
    found = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    return found[0] if len(found) == 1 else path


def _glob_regex(text: str) -> str:
    return "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in text)
