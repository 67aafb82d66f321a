"""Parquet shards as a Ray Data source: runs of row groups planned from the footers, read as stored.

Its own module, importing only pyarrow and Ray Data, because Ray unpickles a read task by importing the
module its function lives in: every read worker process would otherwise import torch (measured: about
5 s of CPU per process, and a 2-core machine runs 8 of them at ``num_cpus=0.25``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from earthray.errors import DataError

TASK_BYTES = 64 << 20
"""Uncompressed bytes of row groups per read task: fewer, larger tasks cost less to schedule on few
cores; a block per row group keeps the first batch early either way."""


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
