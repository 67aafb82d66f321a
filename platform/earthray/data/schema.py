"""The shard row format: Arrow types for chips and time series, and their numpy round trip.

One row is one sample group (one place seen by one or more sensors). Per sensor ``S``:
``S`` (the chip in its stored dtype), ``S.valid`` (uint8 mask), ``S.present`` (False where
the group lacks that sensor; the chip is then zeros: pyarrow cannot round-trip null
fixed-size lists through Parquet) and ``S.date`` (or ``S.dates`` for a series).

Single-date chips are canonical ``arrow.fixed_shape_tensor`` columns (C, H, W). A time
series has a different length per scene, so it uses the storage layout of Arrow's
variable-shape tensor, ``struct<data: list<T>, shape: fixed_size_list<int32>[ndim]>``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

BASE_FIELDS = [
    pa.field("sample_id", pa.string()),
    pa.field("input", pa.string()),
    pa.field("scene", pa.string()),
    pa.field("crs", pa.string()),
    pa.field("x", pa.float64()),
    pa.field("y", pa.float64()),
    pa.field("lon", pa.float64()),
    pa.field("lat", pa.float64()),
    pa.field("row", pa.int32()),
    pa.field("col", pa.int32()),
    pa.field("split", pa.string()),
]


def fixed_tensor_type(dtype: np.dtype | str, shape: tuple[int, ...]) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(dtype)), list(shape))


def variable_tensor_type(dtype: np.dtype | str, ndim: int) -> pa.DataType:
    return pa.struct([pa.field("data", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)))),
                      pa.field("shape", pa.list_(pa.int32(), ndim))])


def fixed_tensor_array(arrays: np.ndarray, dtype: np.dtype | str) -> pa.Array:
    """``(N, *shape)`` -> a fixed-shape tensor array."""
    arrays = np.ascontiguousarray(arrays, dtype=dtype)
    typ = fixed_tensor_type(dtype, arrays.shape[1:])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(arrays.reshape(-1)), int(np.prod(arrays.shape[1:])))
    return pa.ExtensionArray.from_storage(typ, storage)


def variable_tensor_array(arrays: list[np.ndarray], dtype: np.dtype | str) -> pa.Array:
    ndim = arrays[0].ndim
    typ = variable_tensor_type(dtype, ndim)
    data = [np.asarray(a, dtype).reshape(-1) for a in arrays]
    return pa.array([{"data": d, "shape": list(a.shape)} for d, a in zip(data, arrays)], type=typ)


def to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray | list[np.ndarray]:
    """A tensor column back to numpy: ``(N, *shape)`` for fixed shapes, a list for variable ones."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.FixedShapeTensorType):
        shape = tuple(column.type.shape)
        return column.storage.flatten().to_numpy(zero_copy_only=False).reshape((len(column), *shape))
    if pa.types.is_struct(column.type) and column.type.get_field_index("shape") >= 0:
        shapes = column.field("shape").to_pylist()
        data = column.field("data")
        return [np.asarray(data[i].values.to_numpy(zero_copy_only=False)).reshape(s) for i, s in enumerate(shapes)]
    raise TypeError(f"not a tensor column: {column.type}")
