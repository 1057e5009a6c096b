"""Arrow arrays built from numpy buffers and numpy views of Arrow buffers, without the pandas import that
`pyarrow.array` and `to_numpy` make in a fresh process (200-800 ms): the store writer's columns and row files
(`cellar.measure.store_write`, `schemas.rowfile`) and the query package's results and session caches."""

from __future__ import annotations

from . import lazy

np = lazy.module("numpy")
pa = lazy.module("pyarrow")


def from_numpy(values: np.ndarray) -> pa.Array:
    """A numpy array as an Arrow array: numbers zero-copy (`pa.array` would import pandas to ask whether it is a
    pandas object: 200-800 ms in a fresh process), other kinds (text, booleans) through `pa.array`."""
    if values.dtype.kind not in "iuf":
        return pa.array(values)
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def repeated_string(value: str, n: int) -> pa.Array:
    """`n` copies of a string as an Arrow string array, built from its buffers (as `from_numpy`, without pandas)."""
    data = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(data)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data * n)])


def to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column of numbers without nulls as a numpy array (a view of a single chunk, else the chunks joined),
    read from its buffers as `from_numpy` writes them; other columns through pyarrow's `to_numpy`."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    dtype = number_dtype(column.type)
    if dtype is None or column.null_count:
        return column.to_numpy()
    views = [chunk_values(c, dtype) for c in chunks]
    return views[0] if len(views) == 1 else np.concatenate(views) if views else np.empty(0, dtype)


def chunk_values(chunk, dtype: np.dtype) -> np.ndarray:
    """The values of a fixed-width Arrow array without nulls as a numpy view (no copy)."""
    return np.frombuffer(chunk.buffers()[1], dtype, count=len(chunk), offset=chunk.offset * dtype.itemsize)


def number_dtype(kind) -> np.dtype | None:
    """The numpy dtype of an Arrow integer or float type (whose values numpy can view in place), else None."""
    if kind is not None and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        return np.dtype(kind.to_pandas_dtype())
    return None
