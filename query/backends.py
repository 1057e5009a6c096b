"""Where a `query.store.Tables` reads its objects from: one of three backends behind one interface (`Backend`).

- `ParquetFiles`: the stores' Parquet files (cold). DuckDB's views read them, polars scans them.
- `InRam`: the session cache in RAM (`query.open(..., cache=True)` without an on-disk cache, `Objects.cache()`):
  the objects as one Arrow table, one chunk per column, that DuckDB and polars scan in place.
- `MappedCache`: the on-disk session cache (`cellar cache`), memory-mapped (`query.hotcache.Mapped`).

A `Tables` holds one backend and asks it, never which one it is: `frame` (a polars LazyFrame of the objects,
or None where polars does not read them), `table` (the session cache as one Arrow table; None for the files),
`numbered` (that table with its row numbers, for DuckDB), `take` (whole rows of the session cache by number),
`paths` (the mapped files) and `close`. `session_cache` says whether the objects are held as one table, rows
numbered (until closed); the `Tables` registers the DuckDB views over what its backend gives (`table`,
`numbered`).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import hotcache
from .arrow import take_rows
from ..schemas import lazy
from ..schemas.arrays import chunk_values, number_dtype
from ..schemas.errors import QueryError

np = lazy.module("numpy")
pa = lazy.module("pyarrow")

if TYPE_CHECKING:
    import polars

ROW_COLUMN = "__row"  # the session cache's row numbers, in the frames and the table `numbered` gives

Ranges = Sequence[tuple[str, float, float]]


class Backend(ABC):
    """What a `Tables` asks of where its objects are."""

    @property
    def session_cache(self) -> bool:
        """Whether the objects are held as one Arrow table (`table`), rows numbered (`numbered`, `take`): a
        session cache, until it is closed."""
        return False

    @property
    def table(self) -> pa.Table | None:
        """The session cache as one Arrow table, or None (the Parquet files)."""
        return None

    @property
    def paths(self) -> list[Path]:
        """The memory-mapped cache files in use (none but for `MappedCache`)."""
        return []

    @abstractmethod
    def frame(self, columns: Sequence[str] | None, ranges: Ranges) -> polars.LazyFrame | None:
        """A polars LazyFrame of the objects, or None where polars does not read them.

        `columns` (None: all) are the columns the query will touch, `ranges` ((column, lo, hi): a box) the
        centroid ranges it keeps: a session cache materialises only those columns and skips the blocks of
        rows outside the box. The session caches' frames carry the row numbers (ROW_COLUMN).
        """

    def numbered(self) -> pa.Table:
        """`table` with its row numbers (ROW_COLUMN): DuckDB finds rows in it that `take` then takes."""
        raise QueryError("no session cache to number the rows of: open the store with cache=True")

    def take(self, rows: np.ndarray, columns: Sequence[str] | None = None) -> pa.Table:
        """Whole rows of the session cache (these columns, all for None), in the order of `rows`."""
        raise QueryError("take: no session cache to take rows from: open the store with cache=True")

    @abstractmethod
    def close(self) -> None:
        """Let go of what the backend holds (memory, mapped files, polars' scans)."""


class ParquetFiles(Backend):
    """The stores' Parquet files (cold): DuckDB's views read them (the `Tables` writes those views), and polars
    scans them for plain queries, decoding the other columns only for the rows that pass the filter.

    `scan(annotated)` builds polars' scan of the files, with the latest annotation versions joined when
    `annotated` (None without tables); `annotation_columns` names the columns only the annotations have. Both
    are the `Tables`' that holds this backend, which knows the files; the scans are built on first use. A query
    that touches no annotation column scans the measurements alone: the join (by label id, one annotation row
    per object at most) keeps every row as it is. The `Tables` is held weakly: the two make no reference cycle,
    so a `Tables` dropped is freed at once, its DuckDB connections with it.
    """

    def __init__(self, scan: Callable[[bool, bool, bool], polars.LazyFrame | None],
                 annotation_columns: Callable[[], set[str]]):
        self._scan = weakref.WeakMethod(scan)
        self._annotation_columns = weakref.WeakMethod(annotation_columns)
        self._frames: dict[tuple[bool, bool, bool], polars.LazyFrame | None] = {}  # the scans, once built

    def frame(self, columns: Sequence[str] | None, ranges: Ranges, located: bool = False,
              inner: bool = False) -> polars.LazyFrame | None:
        """polars' scan of the files (`ranges` aside: the row groups' statistics skip what a box rules out), with
        the annotations joined where `columns` (None: all) name one of theirs; `located`: with each row's
        number across the files (ROW_COLUMN); `inner`: the annotations joined by an inner join (the query keeps
        only annotated objects)."""
        notes = self._annotation_columns()()
        annotated = bool(notes) and (columns is None or not notes.isdisjoint(columns))
        key = (annotated, located, annotated and inner)
        if key not in self._frames:  # two threads may both build it: the same scan
            self._frames[key] = self._scan()(*key)
        return self._frames[key]

    def close(self) -> None:
        self._frames = {}


class InRam(Backend):
    """The session cache in RAM: the objects as one Arrow table (read by the `Tables` through DuckDB, annotations
    joined), each column one chunk, with its row numbers and the centroid ranges of its blocks of rows."""

    def __init__(self, table: pa.Table):
        import polars as pl

        self._table = _one_chunk(table)
        rows = pa.array(np.arange(self._table.num_rows, dtype=np.int64))
        # A hidden row number lets a query find its rows on a few columns, then take whole rows from Arrow
        # (see Query.to_arrow) instead of an engine materialising every column. The same memory.
        self._numbered = self._table.append_column(ROW_COLUMN, rows)
        self._frame = pl.from_arrow(self._numbered)
        centroids = {n: _plain_numbers(self._table.column(n))
                     for n in hotcache.RANGE_COLUMNS if n in self._table.column_names}
        self._bounds = hotcache.block_bounds({n: v for n, v in centroids.items() if v is not None})

    @property
    def session_cache(self) -> bool:
        return self._table is not None

    @property
    def table(self) -> pa.Table | None:
        return self._table

    def frame(self, columns: Sequence[str] | None, ranges: Ranges) -> polars.LazyFrame | None:
        boxed = self._box(columns, ranges) if ranges and columns is not None else None
        return _lazy_frame(boxed) if boxed is not None else self._frame.lazy()

    def _box(self, columns: Sequence[str], ranges: Ranges) -> pa.Table | None:
        """The rows inside the box (these columns, with ROW_COLUMN), reading only the blocks whose centroid
        ranges meet it, as `hotcache.Mapped.in_ranges` does on the mapped files; None where a column is not a
        plain number column."""
        if not all(c in self._bounds for c, _, _ in ranges):
            return None
        names = list(dict.fromkeys(columns))
        arrays = {}
        for name in {*names, *(c for c, _, _ in ranges)}:
            arrays[name] = _plain_numbers(self._table.column(name))
            if arrays[name] is None:
                return None
        fields = [self._table.schema.field(n) for n in names]
        return hotcache.rows_in_blocks(hotcache.meeting_blocks(self._bounds, ranges), ranges, fields,
                                       lambda name, start, n: arrays[name][start:start + n], ROW_COLUMN)

    def numbered(self) -> pa.Table:
        return self._numbered

    def take(self, rows: np.ndarray, columns: Sequence[str] | None = None) -> pa.Table:
        table = self._table.select(list(columns)) if columns else self._table
        return take_rows(table, rows)

    def close(self) -> None:
        self._table = self._numbered = self._frame = None
        self._bounds = {}


class MappedCache(Backend):
    """The on-disk session cache, memory-mapped (`query.hotcache.Mapped`): queries read the columns they name
    in place, boxes only the blocks their centroid ranges meet, and whole rows come from the row-major copy
    when the cache has one."""

    def __init__(self, mapped: hotcache.Mapped):
        self.mapped: hotcache.Mapped | None = mapped

    @property
    def session_cache(self) -> bool:
        return self.mapped is not None

    @property
    def table(self) -> pa.Table | None:
        return self.mapped.table if self.mapped is not None else None

    @property
    def paths(self) -> list[Path]:
        return self.mapped.paths if self.mapped is not None else []

    def frame(self, columns: Sequence[str] | None, ranges: Ranges) -> polars.LazyFrame | None:
        import polars as pl

        names = list(self.mapped.schema.names) if columns is None else list(dict.fromkeys(columns))
        boxed = self.mapped.in_ranges(ranges, names, ROW_COLUMN) if ranges else None
        if boxed is not None:
            return _lazy_frame(boxed)
        return pl.from_arrow(self.mapped.columns(names), rechunk=False).lazy().with_row_index(ROW_COLUMN)

    def numbered(self) -> pa.Table:
        rows = pa.array(np.arange(self.mapped.num_rows, dtype=np.int64))
        return self.mapped.table.append_column(ROW_COLUMN, rows)  # over the mapped files

    def take(self, rows: np.ndarray, columns: Sequence[str] | None = None) -> pa.Table:
        return self.mapped.take(rows, columns)

    def close(self) -> None:
        self.mapped = None


def _one_chunk(table: pa.Table) -> pa.Table:
    """The table with one chunk per column (DuckDB hands over one per row group: taking rows from chunked columns
    concatenates them on every call). Column by column, so the copy costs one column of memory. The copies come
    from the system allocator: it returns a freed column's pages to the operating system, where pyarrow's
    default pool (mimalloc) keeps gigabytes resident after the cache is gone."""
    pool = pa.system_memory_pool()
    for i in range(table.num_columns):
        if table.column(i).num_chunks > 1:
            whole = pa.concat_arrays(table.column(i).chunks, memory_pool=pool)
            table = table.set_column(i, table.field(i), pa.chunked_array([whole]))
    return table


def _plain_numbers(column: pa.ChunkedArray) -> np.ndarray | None:
    """A one-chunk integer or float column without nulls as a numpy view, else None."""
    dtype = number_dtype(column.type)
    if column.num_chunks != 1 or column.null_count or dtype is None:
        return None
    return chunk_values(column.chunk(0), dtype)


def _lazy_frame(table: pa.Table) -> polars.LazyFrame:
    """A polars LazyFrame over an Arrow table, zero-copy."""
    import polars as pl

    return pl.from_arrow(table, rechunk=False).lazy()
