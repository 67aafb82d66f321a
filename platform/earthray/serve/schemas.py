"""The app's request and answer schemas: what ``/openapi.json`` tells clients (they can be generated from it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from earthray.config import StrictModel


class ErrorBody(BaseModel):
    error: str


class ModelCard(BaseModel):
    name: str
    task: str
    recipe: str
    preset: str
    source: str = Field(description="the pinned registry version models:/NAME/VERSION, or sha256:DIGEST of a "
                        "bundle folder's weights (never a server path)")
    sensors: list[dict[str, Any]]
    bands: list[str] = Field(description="band names a request gives, in the model's order")
    input_size: int
    size: str
    classes: list[str] | None
    target: str | None
    target_bands: list[str] | None


class ModelList(BaseModel):
    models: list[ModelCard]


class SceneAnswer(BaseModel):
    model: str
    task: str
    scores: dict[str, float] = Field(description="class -> probability (softmax; sigmoid for multilabel)")
    top: str
    labels: list[str] | None = Field(None, description="multilabel: classes scoring >= 0.5")


class SegmentationAnswer(BaseModel):
    model: str
    task: str
    height: int
    width: int
    pixels: dict[str, int] = Field(description="class -> predicted pixel count")
    mean_scores: dict[str, float] = Field(description="class -> mean probability over valid pixels")
    invalid_pixels: int


class RegressionAnswer(BaseModel):
    model: str
    task: str
    height: int
    width: int
    stats: dict[str, dict[str, float]] = Field(description="target band -> mean/min/max in physical units")
    invalid_pixels: int


class PredictJSON(StrictModel):
    """A JSON request: exactly one of ``array``, ``geotiff`` (base64) or ``npy`` (base64)."""

    array: list | None = Field(None, description="bands x rows x cols nested list of numbers")
    geotiff: str | None = Field(None, description="base64 of a GeoTIFF")
    npy: str | None = Field(None, description="base64 of a .npy array (bands, rows, cols)")
    bands: list[str] | None = Field(None, description="names of the input's bands, in its order")
    nodata: float | str | None = Field(None, description="value marking missing pixels ('nan' allowed)")


BINARY = {"type": "string", "format": "binary"}
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {**BINARY, "description": "a GeoTIFF or .npy (bands, rows, cols)"},
        "bands": {"type": "string", "description": "comma-separated band names"},
        "nodata": {"type": "string"}}}},
    "application/json": {"schema": PredictJSON.model_json_schema()},
    "image/tiff": {"schema": BINARY},
    "application/x-npy": {"schema": BINARY},
}}}
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 408, 411, 413, 415, 422, 503)}
PREDICT_ANSWERS = {**ERRORS, 200: {"model": SceneAnswer | SegmentationAnswer | RegressionAnswer,
                                   "content": {"image/tiff": {"schema": BINARY}}}}
