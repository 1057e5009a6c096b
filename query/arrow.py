"""Arrow helpers of the query package: numpy views of Arrow buffers, and gathering scattered rows of a large
(memory-mapped, chunked) table."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..schemas import lazy
from ..schemas.arrays import chunk_values, number_dtype

np = lazy.module("numpy")
pa = lazy.module("pyarrow")

if TYPE_CHECKING:
    import pyarrow


def plain_strings(table: pyarrow.Table) -> pyarrow.Table:
    """polars hands strings over as large strings (`to_arrow(compat_level=CompatLevel.oldest())`); DuckDB and the
    store use plain ones. Their offsets are narrowed with numpy: a cast would load pyarrow.compute (80-120 ms)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_large_string(field.type):
            chunks = [_plain_string_array(chunk) for chunk in table.column(i).chunks]
            if any(c is None for c in chunks):  # more text than 32-bit offsets reach: stays a large string
                continue
            table = table.set_column(i, pa.field(field.name, pa.string(), field.nullable, field.metadata),
                                     pa.chunked_array(chunks, pa.string()))
    return table


def _plain_string_array(array: pyarrow.Array) -> pyarrow.Array | None:
    validity, offsets, data = array.buffers()
    wide = np.frombuffer(offsets, np.int64, array.offset + len(array) + 1)
    if wide[-1] >= 2**31:
        return None
    return pa.Array.from_buffers(pa.string(), len(array), [validity, pa.py_buffer(wide.astype(np.int32)), data],
                                 null_count=array.null_count, offset=array.offset)


def take_rows(table: pyarrow.Table, rows: np.ndarray) -> pyarrow.Table:
    """`table.take(rows)` for a few rows of a large, possibly chunked (memory-mapped) table.

    On chunked columns pyarrow's take concatenates the chunks first (a copy of the column per call), and
    taking chunk by chunk costs tens of microseconds per array (a 5M x 200 table has 7,800), so fixed-width
    columns without nulls are gathered with numpy straight from each chunk's buffer, touching only the pages
    that hold the rows; other columns take per chunk with pyarrow.

    Scattered rows of a large table cost one memory access per value (5,000 rows x 200 columns: a million),
    and a core waits for each; the columns are shared among threads (pyarrow's take and numpy's gather run
    without the GIL), which at 5M x 200 in RAM took 15.5 ms where one thread took 25.4 ms.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if table.num_columns == 0 or len(rows) == 0:
        return table.take(pa.array(rows))
    if all(c.num_chunks == 1 for c in table.columns):  # one chunk per column (the cache in RAM): pyarrow's take
        index = pa.array(rows)
        columns = _by_column(lambda column: column.take(index), table.columns, len(rows))
        return pa.Table.from_arrays(columns, schema=table.schema)
    plans: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for column in table.columns:
        lengths = tuple(len(c) for c in column.chunks)
        if lengths not in plans:  # which rows each chunk holds (columns of one table share their chunking)
            starts = np.cumsum((0,) + lengths)
            which = np.searchsorted(starts, rows, side="right") - 1
            order = np.argsort(which, kind="stable")
            cuts = np.searchsorted(which[order], np.arange(len(lengths) + 1))
            plans[lengths] = [(k, order[cuts[k]:cuts[k + 1]], rows[order[cuts[k]:cuts[k + 1]]] - starts[k])
                              for k in range(len(lengths)) if cuts[k + 1] > cuts[k]]
    columns = _by_column(lambda column: _take_column(column, plans[tuple(len(c) for c in column.chunks)], len(rows)),
                         table.columns, len(rows))
    return pa.Table.from_arrays(columns, schema=table.schema)


# Smaller takes stay on the calling thread: the threads contend for the GIL between columns (200 columns of 2M
# float64, medians of 41: 200,000 values took 6.5 ms on one thread and 8.1 on two; 400,000, 11.0 and 9.9 ms).
PARALLEL_VALUES = 300_000
_POOL = None


def _by_column(take, columns: list, n_rows: int) -> list:
    """[take(column) for column in columns], the columns shared among the cores' threads when there are
    enough values to gather."""
    global _POOL
    workers = min(os.cpu_count() or 1, len(columns))
    if workers < 2 or n_rows * len(columns) < PARALLEL_VALUES:
        return [take(c) for c in columns]
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor  # here: with logging and queue, 8-14 ms to import

        _POOL = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="cellar-take")
    shares = [columns[i::workers] for i in range(workers)]
    done = list(_POOL.map(lambda share: [take(c) for c in share], shares))
    out = [None] * len(columns)
    for i, taken in enumerate(done):
        out[i::workers] = taken
    return out


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has none of the parent's threads: it starts its own pool


os.register_at_fork(after_in_child=_forget_pool)


def _take_column(column, plan: list[tuple[int, np.ndarray, np.ndarray]], n: int):
    kind = column.type
    dtype = number_dtype(kind) if column.null_count == 0 else None
    if dtype is not None:
        out = np.empty(n, dtype)
        for k, where, offsets in plan:
            chunk = column.chunk(k)
            values = chunk_values(chunk, dtype)
            out[where] = values[offsets]
        return pa.array(out, type=kind)
    pieces = [column.chunk(k).take(pa.array(offsets)) for k, _, offsets in plan]
    where = np.concatenate([w for _, w, _ in plan])
    taken = pa.concat_arrays(pieces) if len(pieces) > 1 else pieces[0]
    return taken.take(pa.array(np.argsort(where, kind="stable")))  # back to the rows' order


