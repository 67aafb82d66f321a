"""The batch-inference spec (``earthray infer SPEC.yaml``): light to import, so a bad spec fails fast."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from earthray.config import InputPath, OutputPath, StrictModel, load_yaml


class InferSpec(StrictModel):
    """A batch-inference job. Paths are relative to the spec file."""

    model: InputPath = Field(description="fine-tuned bundle folder or models:/NAME@ALIAS / models:/NAME/VERSION")
    tracking_uri: OutputPath | None = Field(None, description="MLflow tracking URI for models:/ (default: "
                                     "MLFLOW_TRACKING_URI)")
    scenes: list[InputPath | list[InputPath]] = Field(min_length=1, description="files or globs; a list is one scene made "
                                          "of one-band files (a band stack)")
    bands: list[str] | None = Field(None, description="names of the scenes' bands, in file order, when the files "
                                    "do not name them (default: the band descriptions)")
    output: OutputPath = Field(description="folder for <stem>.tif (+ .probabilities.tif, .chips.parquet)")
    overlap: float = Field(0.25, ge=0, lt=1, description="window overlap (fraction of the input size)")
    batch_size: int = Field(16, ge=1, description="windows per forward pass")
    windows_per_read: int | None = Field(None, ge=1, description="windows per read task (default: about 16 MiB "
                                         "of prepared input, 8 to 256 windows)")
    actors: int = Field(1, ge=1, description="model actors")
    actor_cpus: float = Field(1.0, gt=0)
    read_cpus: float = Field(0.5, gt=0)
    gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")
    cog: bool = Field(True, description="write Cloud-Optimised GeoTIFFs")
    probabilities: bool = Field(False, description="segmentation: also write per-class probabilities (float32)")
    embeddings: bool = Field(False, description="also write each window's pooled encoder embedding to "
                             "<stem>.chips.parquet (GeoParquet: footprint polygon, CRS, acquisition date)")
    overwrite: bool = Field(False, description="replace outputs another model or other settings wrote")
    address: str | None = Field(None, description="Ray cluster address (default: local Ray)")

    @field_validator("scenes")
    @classmethod
    def _no_empty_stacks(cls, v):
        if any(isinstance(s, list) and not s for s in v):
            raise ValueError("an empty band stack")
        return v


def load_infer_spec(path: str | Path) -> InferSpec:
    return load_yaml(path, InferSpec)
