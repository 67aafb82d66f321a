"""A group's Parquet shards streamed by Ray Data as stored, decoded where the batches are consumed.

Ray Data carries the rows as stored (Arrow, stored dtypes: uint16 reflectance is half the bytes
of float32) through the object store, and the consumer decodes and normalises each batch
(``GroupStream.collate``, which ``iter_torch_batches`` runs in its prefetch thread). Decoding in
a Ray Data task instead doubles the bytes through the object store and adds a numpy -> Arrow
tensor -> numpy round trip per block (``GroupStream.decoded`` still does, for pipelines that go
on in Ray Data). The reads are planned from the shards' footers (``ShardSource``), one task per
run of row groups yielding a block per row group, so a pass starts without Ray Data listing and
sampling files and its first batch waits for one row group. ``benchmarks/loader_vs_torchgeo.py``
measures the whole path against TorchGeo.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.collate_fn import ArrowBatchCollateFn

from earthray.data.manifest import load_manifest
from earthray.data.pipeline import GroupReader, decode
from earthray.errors import DataError

TASK_BYTES = 64 << 20
"""Uncompressed bytes of row groups per read task: fewer, larger tasks cost less to schedule on few
cores; a block per row group keeps the first batch early either way."""


class Decode(ArrowBatchCollateFn):
    """Shard rows (a pyarrow batch) -> the recipe layout as torch tensors (zero-copy from numpy).

    An ``ArrowBatchCollateFn``, so ``iter_torch_batches`` hands it Arrow batches and runs it in its
    prefetch thread: decoding overlaps the training step (numpy releases the GIL)."""

    def __init__(self, reader: GroupReader):
        self.reader = reader

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in decode(table, self.reader).items()}


def _read(path: str, groups: list[int], columns: list[str], split: str | None) -> Iterator[pa.Table]:
    shard = pq.ParquetFile(path)
    for g in groups:
        table = shard.read_row_group(g, columns=columns)
        yield table.filter(pc.equal(table["split"], split)) if split else table


class ShardSource(Datasource):
    """Parquet shards read as runs of row groups, planned once from their footers on the driver."""

    def __init__(self, files: list[str], columns: list[str], split: str | None = None, task_bytes: int = TASK_BYTES):
        super().__init__()
        self.columns, self.split = columns, split
        self.runs: list[tuple[str, list[int], int, int]] = []  # (file, row groups, rows, uncompressed bytes)
        for path in files:
            try:
                meta = pq.ParquetFile(path).metadata
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"{path}: not a readable Parquet shard ({e})") from None
            run, rows, size = [], 0, 0
            for g in range(meta.num_row_groups):
                run.append(g)
                rows, size = rows + meta.row_group(g).num_rows, size + meta.row_group(g).total_byte_size
                if size >= task_bytes or g == meta.num_row_groups - 1:
                    self.runs.append((path, run, rows, size))
                    run, rows, size = [], 0, 0

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for *_, size in self.runs)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # the plan is the shards' own (row groups are the unit of a read), whatever ``parallelism`` asks
        return [ReadTask(partial(_read, path, groups, self.columns, self.split),
                         BlockMetadata(num_rows=None if self.split else rows, size_bytes=size,
                                       input_files=[path], exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for path, groups, rows, size in self.runs]


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
