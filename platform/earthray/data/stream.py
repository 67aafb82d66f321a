"""A group's Parquet shards streamed by Ray Data as stored, decoded where the batches are consumed.

Ray Data carries the rows as stored (Arrow, stored dtypes: uint16 reflectance is half the bytes
of float32) through the object store, and the consumer decodes and normalises each batch
(``GroupStream.collate``, which ``iter_torch_batches`` runs in its prefetch thread). Decoding in
a Ray Data task instead doubles the bytes through the object store and adds a numpy -> Arrow
tensor -> numpy round trip per block (``GroupStream.decoded`` still does, for pipelines that go
on in Ray Data). The reads are planned from the shards' footers (``earthray.data.shards``), one task per
run of row groups yielding a block per row group, so a pass starts without Ray Data listing and
sampling files and its first batch waits for one row group. ``benchmarks/loader_vs_torchgeo.py``
measures the whole path against TorchGeo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray.data
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from earthray.data.manifest import load_manifest
from earthray.data.pipeline import GroupReader, decode
from earthray.data.shards import ShardSource
from earthray.errors import DataError


class Decode(ArrowBatchCollateFn):
    """Shard rows (a pyarrow batch) -> the recipe layout as torch tensors (zero-copy from numpy).

    An ``ArrowBatchCollateFn``, so ``iter_torch_batches`` hands it Arrow batches and runs it in its
    prefetch thread: decoding overlaps the training step (numpy releases the GIL)."""

    def __init__(self, reader: GroupReader):
        self.reader = reader

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in decode(table, self.reader).items()}


@dataclass
class GroupStream:
    """One group's rows as stored, streamed by Ray Data, and the collate that decodes them:
    ``stream.dataset.iter_torch_batches(batch_size=..., collate_fn=stream.collate)``. Ray Train
    takes ``dataset``; its workers are given ``collate`` beside it."""

    dataset: ray.data.Dataset
    reader: GroupReader
    num_cpus: float

    @property
    def collate(self) -> Decode:
        return Decode(self.reader)

    def decoded(self) -> ray.data.Dataset:
        """The rows decoded in Ray Data tasks, for pipelines that go on in Ray Data (feature extraction)."""
        return self.dataset.map_batches(decode, fn_kwargs={"reader": self.reader}, batch_format="pyarrow",
                                        num_cpus=self.num_cpus)


def open_group(root: str | Path, group: str, split: str | None = None, *, max_dates: int = 16, seed: int = 0,
               num_cpus: float = 0.25, manifest: dict | None = None, normalisation: dict[str, dict] | None = None,
               labels: bool = True, label: str | None = None, sensors: list[str] | None = None) -> GroupStream:
    """One group's shard rows (optionally one split), to be decoded by their consumer. ``normalisation``
    and ``label`` (the layer delivered as ``batch["label"]``) as in ``GroupReader.from_manifest``;
    ``labels=False`` leaves labels out (self-supervised pretraining); ``sensors`` keeps only those of
    the group's sensors (None: all); ``num_cpus`` per read (and ``decoded``) task."""
    manifest = manifest or load_manifest(root)
    reader = GroupReader.from_manifest(manifest, group, max_dates, seed, normalisation, label)
    if sensors is not None:
        reader = reader.only(sensors)
    if not labels and reader.label:
        reader.columns.remove(reader.label)
        reader.label = None
    files = [str(Path(root) / f) for f in manifest["groups"][group]["files"]]
    if not files:
        raise DataError(f"{root}: group {group!r} has no shards (every scene quarantined?)")
    source = ShardSource(files, reader.columns, split)
    if not source.runs:
        raise DataError(f"{root}: group {group!r} has shards but no rows in them")
    ds = ray.data.read_datasource(source, override_num_blocks=len(source.runs), num_cpus=num_cpus)
    return GroupStream(ds, reader, num_cpus)


def read_group(root: str | Path, group: str, split: str | None = None, **kwargs) -> ray.data.Dataset:
    """A streaming Ray Dataset of one group's decoded rows: ``open_group(...).decoded()``."""
    return open_group(root, group, split, **kwargs).decoded()
