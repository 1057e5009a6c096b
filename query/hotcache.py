"""The on-disk session cache: a store's objects as uncompressed files that queries memory-map.

`cellar cache STORE` (or `query.cachebuild.build(store)`) writes into `STORE/cache/`, named by the store's state:

- `objects-<fingerprint>.arrow`: every row of the `objects` view (annotations joined), in the store's spatial
  order, as an Arrow IPC file in record batches of the store's row-group size. Scans (filters, boxes,
  group-bys, top-k) read the mapped columns in place: no Parquet decompression, nothing loaded into RAM, and
  the pages shared by every process through the operating system's page cache.
- `ranges-<fingerprint>.npy`: each block's (16,384 rows) min and max of the centroid columns, so that a box
  reads only the blocks that can hold matches (as row-group statistics do for the Parquet files, finer).
- `places-<fingerprint>.npy`: where each column's buffers lie in the objects file, so that a query's few
  columns are rebuilt over the mapped file without parsing every batch's metadata.
- `stats-<fingerprint>.json`: the batch and block ends, the column names the two `.npy` files index, and
  whether there is a row-major copy.
- with `--rows`, `rows-<fingerprint>.npy`: the numeric columns again, row-major (a numpy structured array).
  A filter's matches are scattered over the whole table, and taking whole rows of them from columns touches
  one page per value (200 columns x 5,000 rows: a million page touches); from the row-major copy a row is
  one contiguous read, as in a row store such as OMERO.tables' HDF5.

The cost is disk: the files hold the values uncompressed (the objects file is about 1.4x the Parquet files on
real measurements and the rows file as much again). The files are named by the store's version (its log's),
so any write (a new table, a re-measurement, an annotation version) makes the cache stale: a stale cache is
never read, and the writers remove it. The Parquet files stay the store's data; the cache can be dropped at
any time (`cellar cache --drop`). The files are written together, the objects file last; opening the cache
checks them all (`check`), and a missing, truncated or inconsistent one is a StoreError naming it.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from ..schemas import integrity, lazy, log
from ..schemas import store as layout
from ..schemas.arrays import number_dtype
from ..schemas.errors import StoreError
from .arrow import take_rows

np = lazy.module("numpy")
pa = lazy.module("pyarrow")

BATCH_ROWS = 128 * 1024  # the store's row-group size: one record batch per row group
BLOCK_ROWS = 16 * 1024  # the centroid ranges are kept per block: a box reads about an eighth of a batch's rows
RANGE_COLUMNS = layout.CENTROID_COLUMNS


def find(store: Path, snap: log.Snapshot) -> Path | None:
    """The store's cache file of the state `snap`, else None. The objects file missing while the state's other
    cache files are there (and no build is writing it) is a StoreError: it is written last."""
    path = layout.cache_path(store, snap.version)
    if path.is_file():
        return path
    others = [layout.cache_path(store, snap.version, kind) for kind in ("stats", "ranges", "places", "rows")]
    if any(p.exists() for p in others) and not any(path.parent.glob(f"{layout.TMP_PREFIX}objects-*")) \
            and log.advance(snap).version == snap.version:  # not a write under way either
        raise _unreadable(path, "missing, while the cache's other files are there")
    return None


def _unreadable(path: Path, exc: Exception | str) -> StoreError:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return StoreError(f"{path}: unreadable session cache ({text}); `cellar cache --rebuild` writes it anew, "
                      "`cellar cache --drop` removes it")


def _load_npy(path: Path, header_only: bool = False) -> np.ndarray | tuple[tuple[int, ...], np.dtype]:
    """A cache's .npy file, or with `header_only` only its (shape, dtype), the file's size checked against
    them; a missing or damaged file is a StoreError naming it."""
    try:
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise _unreadable(path, "not a .npy file")
            if not header_only:
                fh.seek(0)
                return np.load(fh, allow_pickle=False)
            fh.seek(0)
            version = np.lib.format.read_magic(fh)  # the build writes version 1.0
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
            need = fh.tell() + int(np.prod(shape)) * dtype.itemsize
            if path.stat().st_size < need:
                raise _unreadable(path, f"truncated .npy file: {path.stat().st_size:,} bytes of {need:,}")
            return shape, dtype
    except FileNotFoundError:
        raise _unreadable(path, "missing: the cache's files are written together") from None
    except (OSError, ValueError, EOFError) as exc:  # numpy's errors for a file that is not a whole .npy array
        raise _unreadable(path, f"truncated or damaged .npy file: {exc}") from None


def _stats_of(path: Path, batches: int) -> dict[str, Any]:
    """The stats file of the cache file `path` (batch and block ends, the names the .npy files index), checked
    against the objects file's `batches`."""
    stats_path = layout.cache_sibling(path, "stats")
    try:
        stats = json.loads(stats_path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise _unreadable(stats_path, "missing: the cache's files are written together") from None
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
        raise _unreadable(stats_path, f"not valid JSON: {exc}") from None
    fields = {"ends": int, "blocks": int, "ranges": str, "places": str}
    if not isinstance(stats, dict) or not all(
            isinstance(stats.get(k), list) and all(isinstance(v, t) and not isinstance(v, bool) for v in stats[k])
            for k, t in fields.items()) or not isinstance(stats.get("rows", False), bool):
        raise _unreadable(stats_path, "not the cache's statistics (lists ends, blocks, ranges, places and a "
                                      "true/false rows expected)")
    ends, blocks = stats["ends"], stats["blocks"]
    if len(ends) != batches or np.any(np.diff([0, *ends]) < 0) or np.any(np.diff([0, *blocks]) <= 0) \
            or (ends[-1] if ends else 0) != (blocks[-1] if blocks else 0):
        raise _unreadable(stats_path, f"its batch ends do not match the {batches} batches of {path.name}")
    return stats


def check(path: Path, reader: pa.ipc.RecordBatchFileReader) -> None:
    """The other files of the cache `path` (stats, centroid ranges, buffer places, and the row-major copy if
    there is one) are whole and agree with the objects file; a StoreError names the first that is not."""
    stats = _stats_of(path, reader.num_record_batches)
    size = path.stat().st_size
    names = set(reader.schema.names)
    ranges_path, places_path = layout.cache_sibling(path, "ranges"), layout.cache_sibling(path, "places")
    ranges, places = _load_npy(ranges_path), _load_npy(places_path)
    if ranges.dtype != np.float64 or ranges.shape != (len(stats["ranges"]), 2, len(stats["blocks"])) \
            or not set(stats["ranges"]) <= names:
        raise _unreadable(ranges_path, f"shape {ranges.shape}, not that of the ranges its stats file lists")
    if places.dtype != np.int64 or places.shape != (len(stats["places"]), len(stats["ends"]), 3, 2) \
            or not set(stats["places"]) <= names \
            or np.any((places[..., 0] >= 0) & (places[..., 0] + places[..., 1] > size)) or np.any(places[..., 1] < -1):
        raise _unreadable(places_path, f"shape {places.shape} or places beyond the {size:,} bytes of {path.name}")
    rows_path = layout.cache_sibling(path, "rows")
    if stats.get("rows") and not rows_path.exists():
        raise _unreadable(rows_path, "missing: the cache was written with its row-major copy")


def check_rows(path: Path, reader: pa.ipc.RecordBatchFileReader) -> None:
    """The row-major copy of the cache `path`, if there is one, is whole: its header parses and the file holds
    a record for every row. Parsing the header of 200 columns costs 3 ms, so opening the cache leaves it to
    the first read of whole rows (`Mapped._rows_file`) and to `status`."""
    rows_path = layout.cache_sibling(path, "rows")
    if rows_path.exists():
        shape, dtype = _load_npy(rows_path, header_only=True)
        n = _stats_of(path, reader.num_record_batches)["ends"][-1:] or [0]
        if shape != (n[0],) or dtype.names is None or not set(dtype.names) <= set(reader.schema.names):
            raise _unreadable(rows_path, f"shape {shape}, the objects file has {n[0]:,} rows")


class Mapped:
    """The session cache files of one or more stores, memory-mapped; columns are materialised on demand.

    Opening reads only the files' footers. `columns(names)` gives an Arrow table of those columns over the
    mapped pages (zero-copy), `table` all of them, `take(rows)` whole rows (from the row-major copy where
    one exists), `in_ranges` the rows in a box (reading only the blocks whose centroid ranges meet it).
    """

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]
        self._buffers, self._readers = [], []
        for path in self.paths:
            try:
                # The IPC reader reads from one buffer over the whole mapping: from the memory-mapped file
                # object itself each read costs more (building 8,000 arrays, 200 columns x 40 batches, took
                # 15 ms that way and 5 ms this way).
                source = pa.memory_map(str(path), "r")
                self._buffers.append(source.read_buffer(source.size()))
                self._readers.append(pa.ipc.open_file(pa.BufferReader(self._buffers[-1])))
            except (OSError, pa.ArrowInvalid) as exc:
                raise _unreadable(path, exc) from None
            check(path, self._readers[-1])

    @cached_property
    def schema(self) -> pa.Schema:
        return pa.unify_schemas([r.schema for r in self._readers], promote_options="permissive") \
            if len(self._readers) > 1 else self._readers[0].schema

    def columns(self, names: Sequence[str] | None = None) -> pa.Table:
        """These columns (all for None) of every store, as one table over the mapped files; a column that
        only some stores have is null elsewhere (as in the views' union by name)."""
        if names is not None and "table" not in self.__dict__:
            direct = self._direct(names)
            if direct is not None:
                return direct
        table = self.table
        if names is None:
            return table
        have = set(table.column_names)
        for n in [n for n in names if n not in have]:
            table = table.append_column(n, pa.nulls(table.num_rows, self.schema.field(n).type))
        return table.select(list(names))

    def _direct(self, names: Sequence[str]) -> pa.Table | None:
        """The columns rebuilt over the mapped file from the buffer places the build recorded (one store,
        columns without nulls), or None."""
        places = self._places
        if places is None or not all(n in places[0] for n in names):
            return None
        index, where = places
        lengths = np.diff([0, *self._stats[0]["ends"]]).tolist()
        fields = [self.schema.field(n) for n in names]
        arrays = []
        for f in fields:
            chunks = [pa.Array.from_buffers(f.type, k, [None if off < 0 else self._mapping.slice(off, size)
                                                        for off, size in slots[:f.type.num_buffers]])
                      for k, slots in zip(lengths, where[index[f.name]].tolist())]
            arrays.append(pa.chunked_array(chunks, type=f.type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    @cached_property
    def _places(self) -> tuple[dict[str, int], np.ndarray] | None:
        """({column: row of the places array}, places[column, batch, buffer] = (file offset, size) or -1) of
        one store's columns without nulls, or None."""
        if len(self._stats) != 1:
            return None
        where = _load_npy(layout.cache_sibling(self.paths[0], "places"))
        return {n: i for i, n in enumerate(self._stats[0]["places"])}, where

    @cached_property
    def _stats(self) -> list[dict]:
        """Each store's stats file (batch ends, centroid ranges, the columns with recorded places)."""
        return [_stats_of(path, reader.num_record_batches) for path, reader in zip(self.paths, self._readers)]

    @cached_property
    def num_rows(self) -> int:
        return int(self.batch_ranges["starts"][-1])

    @cached_property
    def table(self) -> pa.Table:
        """Every column of every store (zero-copy: reading the files' batch metadata is all it costs; the
        IPC reader's included_fields option costs more than this)."""
        tables = []
        for path, reader in zip(self.paths, self._readers):
            try:
                tables.append(reader.read_all())
            except (OSError, pa.ArrowInvalid) as exc:
                raise _unreadable(path, exc) from None
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")

    def in_ranges(self, ranges: Sequence[tuple[str, float, float]], names: Sequence[str], row_column: str) -> pa.Table | None:
        """The rows whose `ranges` columns lie in [lo, hi] (a box), these columns and their row numbers
        (`row_column`), or None if the batches' statistics do not cover the range columns.

        Only the blocks (BLOCK_ROWS rows) whose centroid ranges meet the box are read (in the store's Hilbert
        order a box meets a few), and the box is applied there with numpy, so the engine that applies the
        query's filters (the box again, and any others) sees only the rows inside it.
        """
        stats = self.batch_ranges
        if stats is None or not all(c in stats for c, _, _ in ranges):
            return None
        batches = stats["batches"]
        blocks = meeting_blocks(stats, ranges)
        if all(self._viewable(n) is not None for n in {*names, *(c for c, _, _ in ranges)}):
            # numbers without nulls: numpy views of the mapped file, nothing else is read or built
            def view(name: str, start: int, n: int) -> np.ndarray:
                k = int(np.searchsorted(batches, start, side="right")) - 1
                return self._view(name, k)[start - batches[k]:start - batches[k] + n]

            return rows_in_blocks(blocks, ranges, [self.schema.field(n) for n in names], view, row_column)
        pieces, numbers, read = [], [], {}
        for start, n in blocks:
            k = int(np.searchsorted(batches, start, side="right")) - 1
            first = start - int(batches[k])
            if k not in read:
                read[k] = self._batch(k)
            block = read[k].slice(first, n)
            inside = np.ones(n, bool)
            for c, lo, hi in ranges:  # NaN and null centroids fail the test, as they fail SQL's BETWEEN
                values = block.column(c).to_numpy(zero_copy_only=False)
                inside &= (values >= lo) & (values <= hi)
            if inside.any():
                pieces.append(_select(block, names, self.schema).filter(pa.array(inside)))
                numbers.append(np.flatnonzero(inside) + start)
        if not pieces:
            pieces = [_select(self._batch(0), names, self.schema).slice(0, 0)]
        table = pa.Table.from_batches(pieces)
        rows = np.concatenate(numbers) if numbers else np.zeros(0, np.int64)
        return table.append_column(row_column, pa.array(rows.astype(np.int64, copy=False)))

    def _view(self, name: str, k: int) -> np.ndarray | None:
        """Column `name` of batch `k` as a numpy view of the mapped file (one store, a number column
        without nulls whose place the build recorded), or None."""
        dtype = self._viewable(name)
        if dtype is None:
            return None
        index, where = self._places
        offset, size = where[index[name], k, 1].tolist()
        return np.frombuffer(self._mapping, dtype, size // dtype.itemsize, offset)

    def _viewable(self, name: str) -> np.dtype | None:
        """The numpy dtype of a column `_view` can give, else None."""
        known = self.__dict__.setdefault("_dtypes", {})
        if name not in known:

            i = self.schema.get_field_index(name)
            dtype = number_dtype(self.schema.field(i).type) if i >= 0 else None
            known[name] = dtype if self._places and name in self._places[0] else None
        return known[name]

    @property
    def _mapping(self) -> pa.Buffer:
        """The whole mapped file (one store) as one buffer, zero-copy."""
        return self._buffers[0]

    def _batch(self, k: int) -> pa.RecordBatch:
        """Batch `k` over all stores (numbered as in `batch_ranges`), read alone."""
        if len(self._readers) == 1 and "table" not in self.__dict__:
            return self._readers[0].get_batch(k)
        batches = self.batch_ranges["batches"]
        start, stop = int(batches[k]), int(batches[k + 1])
        return self.table.slice(start, stop - start).combine_chunks().to_batches()[0]

    @cached_property
    def batch_ranges(self) -> dict[str, Any]:
        """{"batches": row offsets of the batches (and the end), "starts": of the blocks (and the end), column:
        (mins, maxs) per block} over every store."""
        batches, starts, ranges = [0], [0], {}
        for path, stats in zip(self.paths, self._stats):
            values = _load_npy(layout.cache_sibling(path, "ranges"))
            base = batches[-1]
            batches.extend(base + e for e in stats["ends"])
            starts.extend(base + e for e in stats["blocks"])
            for name, (lo, hi) in zip(stats["ranges"], values):
                mins, maxs = ranges.setdefault(name, ([], []))
                mins.extend(lo)
                maxs.extend(hi)
        n = len(starts) - 1
        out: dict[str, Any] = {"batches": np.asarray(batches, np.int64), "starts": np.asarray(starts, np.int64)}
        for name, (mins, maxs) in ranges.items():
            if len(mins) == n:  # a column every store has
                out[name] = (np.asarray(mins, float), np.asarray(maxs, float))
        return out

    @cached_property
    def _rows_file(self) -> np.ndarray | None:
        """The row-major copy (one store only), memory-mapped, or None."""
        if len(self.paths) != 1:
            return None
        path = layout.cache_sibling(self.paths[0], "rows")
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as fh:
                if fh.read(6) != b"\x93NUMPY":
                    raise _unreadable(path, "not a .npy file")
            matrix = _map_rows(path)
        except (OSError, ValueError, TypeError, EOFError) as exc:  # TypeError: numpy's "buffer is too small"
            raise _unreadable(path, f"truncated or damaged .npy file: {exc}") from None
        if matrix.shape != (self.num_rows,):
            raise _unreadable(path, ValueError(f"{matrix.shape[0]:,} rows, the objects file {self.num_rows:,}"))
        return matrix

    def take(self, rows: np.ndarray, names: Sequence[str] | None = None) -> pa.Table:
        """Whole rows (these columns, all for None) in the order of `rows`."""

        names = list(self.schema.names) if names is None else list(names)
        matrix = self._rows_file
        if matrix is None:
            return take_rows(self.columns(names), rows)
        # Numeric columns without nulls from the row-major copy, the others (text, nulls) from the columns.
        fields = {f.name: f for f in self.schema}
        plain = [n for n in names if n in matrix.dtype.names and not self._has_nulls(n)]
        other = [n for n in names if n not in plain]
        picked = _columns_of(_gather(matrix, np.asarray(rows, np.int64)), plain)  # one contiguous read per row
        arrays = {n: pa.array(picked[n], type=fields[n].type) for n in plain}
        if other:
            rest = take_rows(self.columns(other), rows)
            arrays.update({n: rest.column(n) for n in other})
        return pa.table([arrays[n] for n in names], schema=pa.schema([self.schema.field(n) for n in names]))

    def _has_nulls(self, name: str) -> bool:
        if self._places is not None:  # the build recorded the places of the columns without nulls
            return name not in self._places[0]
        return self.table.column(name).null_count > 0  # null counts are batch metadata: no values are read


def _map_rows(path: Path) -> np.ndarray:
    """The row-major copy (a .npy file) memory-mapped for scattered reads.

    The mapping is advised random (`MADV_RANDOM`): a fault reads the page it needs. With the kernel's
    read-around, taking 4,986 scattered rows of a 5M x 200 copy that was not in the page cache read the whole
    7.5 GiB file (8.4-8.8 s, and every other file's pages pushed out of the page cache); advised random it read
    27-28 MiB (0.75-1.07 s in six runs).
    """
    header = np.load(path, mmap_mode="r")  # numpy reads the header (any .npy version)
    shape, dtype, offset = header.shape, header.dtype, header.offset
    del header
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype, buffer=mapping, offset=offset)


def block_bounds(columns: dict[str, np.ndarray], block_rows: int | None = None) -> dict[str, Any]:
    """{"starts": the blocks' first rows (and the end), column: (mins, maxs) per block} of whole columns, as
    `Mapped.batch_ranges` gives for the cache files: a block of NaN only gets (-inf, inf)."""
    block_rows = block_rows or BLOCK_ROWS
    n = len(next(iter(columns.values()))) if columns else 0
    n_blocks = -(-n // block_rows)
    out: dict[str, Any] = {"starts": np.minimum(np.arange(n_blocks + 1, dtype=np.int64) * block_rows, n)}
    for name, values in columns.items():
        padded = np.full(n_blocks * block_rows, np.nan)
        padded[:n] = values
        padded = padded.reshape(n_blocks, block_rows)
        with np.errstate(invalid="ignore"):
            mins, maxs = np.fmin.reduce(padded, axis=1), np.fmax.reduce(padded, axis=1)
        empty = np.isnan(mins)
        out[name] = (np.where(empty, -np.inf, mins), np.where(empty, np.inf, maxs))
    return out


def meeting_blocks(stats: dict[str, Any], ranges: Sequence[tuple[str, float, float]]) -> list[tuple[int, int]]:
    """(first row, rows) of the blocks whose ranges (`block_bounds`) meet every (column, lo, hi)."""
    keep = np.ones(len(stats["starts"]) - 1, bool)
    for c, lo, hi in ranges:
        mins, maxs = stats[c]
        keep &= (maxs >= lo) & (mins <= hi)
    starts = stats["starts"]
    return [(int(starts[b]), int(starts[b + 1] - starts[b])) for b in np.flatnonzero(keep)]


def rows_in_blocks(blocks: Sequence[tuple[int, int]], ranges: Sequence[tuple[str, float, float]],
                   fields: Sequence[pa.Field], view, row_column: str) -> pa.Table:
    """The rows of these blocks inside every (column, lo, hi): the `fields` and the row numbers
    (`row_column`). `view(name, start, n)` gives the numpy values of rows [start, start + n) of a column."""
    picked: dict[str, list[np.ndarray]] = {f.name: [] for f in fields}
    numbers = []
    for start, n in blocks:
        inside = np.ones(n, bool)
        for c, lo, hi in ranges:  # NaN centroids fail the test, as they fail SQL's BETWEEN
            values = view(c, start, n)
            inside &= (values >= lo) & (values <= hi)
        at = np.flatnonzero(inside)
        if at.size:
            for f in fields:
                picked[f.name].append(view(f.name, start, n)[at])
            numbers.append(at + start)
    arrays = [pa.array(np.concatenate(picked[f.name]) if numbers else np.zeros(0, f.type.to_pandas_dtype()),
                       type=f.type) for f in fields]
    arrays.append(pa.array(np.concatenate(numbers) if numbers else np.zeros(0, np.int64), pa.int64()))
    return pa.Table.from_arrays(arrays, schema=pa.schema([*fields, pa.field(row_column, pa.int64())]))


def _gather(records: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`records[rows]` of a structured array: numpy copies structured items field by field, rows of bytes
    whole (5,000 records of 200 fields: 11 ms that way, 2 ms this way)."""
    raw = records.view(np.uint8).reshape(len(records), records.dtype.itemsize)
    return np.take(raw, rows, axis=0).view(records.dtype).reshape(len(rows))


def _columns_of(records: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """These fields of a structured array as contiguous arrays. Records of 8-byte fields (the usual
    measurements) are transposed as one 2D array when most fields are wanted: one pass, not one strided copy
    per field."""
    dtype = records.dtype
    eight = all(dtype[i].itemsize == 8 and dtype.fields[n][1] == 8 * i for i, n in enumerate(dtype.names))
    if eight and 2 * len(names) > len(dtype.names):
        block = np.ascontiguousarray(records.view(np.uint64).reshape(len(records), len(dtype.names)).T)
        at = {n: i for i, n in enumerate(dtype.names)}
        return {n: block[at[n]].view(dtype[n]) for n in names}
    return {n: np.ascontiguousarray(records[n]) for n in names}


def _select(batch: pa.RecordBatch, names: Sequence[str], schema: pa.Schema) -> pa.RecordBatch:
    """These columns of the batch; a column it lacks (another store's) is all null."""
    have = set(batch.schema.names)
    arrays = [batch.column(n) if n in have else pa.nulls(batch.num_rows, schema.field(n).type) for n in names]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema([schema.field(n) for n in names]))


def status(store: Path, check: bool = True) -> dict[str, Any]:
    """Whether the store has a fresh cache, its size (with the row-major copy), and the Parquet files' size.

    `check` first checks the Parquet files (`schemas.integrity.check_entry_files`) and opens a fresh cache
    (which checks its files), so that a damaged file is a StoreError naming it, not a size in the report."""
    store = Path(store)
    snap = log.snapshot(store)
    path = find(store, snap)
    entries = list(snap.entries())
    if check:
        for entry in entries:
            integrity.check_entry_files(snap, entry)
        if path is not None:
            mapped = Mapped([path])
            check_rows(path, mapped._readers[0])
    files = [layout.cache_path(store, snap.version, k) for k in ("objects", "rows", "stats", "places", "ranges")]
    parquet = sum((store / t["dir"] / f).stat().st_size for t in entries for f in t["files"]
                  if (store / t["dir"] / f).is_file())
    folder = store / layout.CACHE_DIR
    stale = [p for p in folder.iterdir() if p not in files] if folder.is_dir() else []
    return {"store": str(store), "fresh": path is not None, "path": str(path) if path else None,
            "row_major": files[1].is_file(), "bytes": sum(f.stat().st_size for f in files if f.is_file()) if path else 0,
            "parquet_bytes": parquet, "stale_files": len(stale)}
