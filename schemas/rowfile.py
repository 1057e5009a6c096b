"""The row file: a table's rows, each compressed on its own, beside its Parquet file (`<part>.rows`).

Parquet answers queries that read a few columns of many rows. A filter's matches, though, lie all over a table,
and fetching their whole rows from Parquet decodes nearly every page of every column: 0.1% of 2M rows x 332
columns touches almost all of them. The row file answers that: every row's fixed-width values, zstd-compressed
as one frame of its own, so that fetching k rows decompresses k frames (about 7 us each for 332 float64s) and
nothing else. Per-row frames compress measurements about as well as LZ4 Parquet (1.6x here against 1.37x:
integer-valued doubles and repeated exponents), so the file adds less than the Parquet's own size.

It also holds the table's spatial index: the label ids and centroid columns uncompressed, with the centroids'
range in every block of `BLOCK` rows. Tables are written in the store's spatial (Hilbert) order, so a box meets
a few blocks and reads only their rows.

Layout (little-endian): MAGIC, the frames one after the other, the frames' offsets (uint64, rows + 1), the key
columns (each rows x 8 bytes), the blocks' bounds (float64, blocks x 2 per centroid column), a JSON footer, its
length (uint64) and MAGIC. Only tables whose columns are all fixed-width numbers without nulls get one (every
table `cellar measure` writes); readers fall back to the Parquet file where there is none.
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from . import lazy
from .arrays import to_numpy
from .errors import StoreError
from .store import CENTROID_COLUMNS

np = lazy.module("numpy")
pa = lazy.module("pyarrow")

MAGIC = b"CELLROWS"
VERSION = 1
SUFFIX = ".rows"
BLOCK = 512  # rows per block of the spatial index
KEY_COLUMNS = ("label_id", *CENTROID_COLUMNS)
# zstd's level. Its fast mode (-1) gives these frames of a few hundred bytes the size level 1 gives them (to
# 14 bytes in 12.5 MB) in a quarter to half the time: level 1 sets up tables sized for large inputs in every
# frame. 100k rows, 4 channels: 160 bytes a row 199 -> 45 ms, 928 bytes (default features) 295 -> 120 ms, both
# on 2 threads; decompressing costs the same. Level 3 is 3% smaller at level 1's time.
LEVEL = -1
_NUMBER_DTYPE = re.compile(r"[<>|=][iuf][1248]")


def path_of(parquet_name: str) -> str:
    """The row file's name beside a Parquet file's (`part-<id>.parquet` -> `part-<id>.rows`)."""
    return parquet_name.rsplit(".", 1)[0] + SUFFIX


def storable(schema: pa.Schema) -> bool:
    """Whether a table of this schema gets a row file: every column a fixed-width integer or float."""
    return all(pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in schema)


class Writer:
    """Writes a row file from tables of one schema, part by part (`write`), then `close()`; the caller makes
    the file appear atomically (`schemas.atomic`)."""

    def __init__(self, path: Path, schema: pa.Schema):
        import zstandard

        self._f = open(path, "wb")
        self._f.write(MAGIC)
        self._zstd = zstandard
        self._compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=False, write_checksum=False)
        self.columns, width = [], 0
        for field in schema:
            dtype = np.dtype(field.type.to_pandas_dtype())
            self.columns.append((field.name, dtype.str, width))
            width += dtype.itemsize
        self.width = width
        self._sizes: list[np.ndarray] = []
        self._keys: dict[str, list[np.ndarray]] = {n: [] for n, _, _ in self.columns if n in KEY_COLUMNS}

    def write(self, table: pa.Table) -> None:
        n = table.num_rows
        if n == 0:
            return
        values = [_values(table.column(name)) for name, _, _ in self.columns]
        if any(v is None for v in values):
            raise ValueError("bug: a row file of a column with nulls")
        rows = np.empty((n, self.width), np.uint8)
        for (name, _, start), v in zip(self.columns, values):
            rows[:, start:start + v.dtype.itemsize] = v.view(np.uint8).reshape(n, -1)
            if name in self._keys:
                self._keys[name].append(v)
        segments = np.empty((n, 2), np.uint64)
        segments[:, 0] = np.arange(n, dtype=np.uint64) * self.width
        segments[:, 1] = self.width
        frames = self._compressor.multi_compress_to_buffer(
            self._zstd.BufferWithSegments(rows, segments.tobytes()), threads=min(2, os.cpu_count() or 1))
        parts = [frames[i] for i in range(n)]
        self._sizes.append(np.fromiter(map(len, map(memoryview, parts)), np.uint64, n))
        self._f.write(b"".join(parts))

    def close(self) -> None:
        f = self._f
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.uint64)
        offsets = np.zeros(len(sizes) + 1, np.uint64)
        np.cumsum(sizes, out=offsets[1:])
        footer = {"version": VERSION, "rows": len(sizes), "width": self.width, "columns": self.columns,
                  "offsets": f.tell(), "keys": {}, "block": BLOCK, "bounds": None}
        f.write(offsets.tobytes())
        keys = {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in self._keys.items()}
        for name, v in keys.items():
            footer["keys"][name] = [f.tell(), v.dtype.str]
            f.write(np.ascontiguousarray(v).tobytes())
        centroids = [n for n in CENTROID_COLUMNS if n in keys]
        if centroids and len(sizes):
            footer["bounds"] = {"at": f.tell(), "columns": centroids}
            f.write(_block_bounds([keys[n].astype(np.float64, copy=False) for n in centroids]).tobytes())
        text = json.dumps(footer).encode()
        f.write(text)
        f.write(np.uint64(len(text)).tobytes())
        f.write(MAGIC)
        f.close()

    def abort(self) -> None:
        self._f.close()


def _values(column: pa.ChunkedArray) -> np.ndarray | None:
    if column.null_count:
        return None
    return to_numpy(column)


def _block_bounds(columns: list[np.ndarray]) -> np.ndarray:
    """(blocks, 2 x columns) float64: each column's min and max in every block of BLOCK rows (NaN left out)."""
    n = len(columns[0])
    starts = np.arange(0, n, BLOCK)
    out = np.empty((len(starts), 2 * len(columns)))
    for j, v in enumerate(columns):
        with np.errstate(invalid="ignore"):
            out[:, 2 * j] = np.fmin.reduceat(v, starts)
            out[:, 2 * j + 1] = np.fmax.reduceat(v, starts)
    return out


def _check_dtypes(dtypes: Sequence[str]) -> None:
    """Fixed-width numbers only (as `storable` allows), as numpy writes their dtypes: order, kind, itemsize."""
    bad = next((dtype for dtype in dtypes if not _NUMBER_DTYPE.fullmatch(dtype)), None)
    if bad is not None:
        raise ValueError(f"a column of dtype {bad!r}")


# The column list of the row file opened last, as its footer gives it, and what `_column_list` made of it
_last_columns: tuple[list, tuple] = ([], ((), frozenset()))


def _column_list(listed: list) -> tuple[tuple[tuple[str, str, int], ...], frozenset[str]]:
    """A footer's column list as (name, dtype, start) triples, its dtypes checked, and the set of its names. The
    row files of a table list the same columns: a list equal to the last one's is not converted and checked
    again (20 files of 332 columns: 26 ms to open before, 6 ms now)."""
    global _last_columns
    last, made = _last_columns
    if listed == last:
        return made
    columns = tuple((str(name), str(dtype), int(start)) for name, dtype, start in listed)
    _check_dtypes([dtype for _, dtype, _ in columns])
    made = (columns, frozenset(name for name, _, _ in columns))
    _last_columns = (listed, made)  # one assignment: threads see the old pair or the new one
    return made


class RowFile:
    """A row file opened for reading (memory-mapped). A file that is not one, is cut short or disagrees with its
    table is a StoreError naming it (`label`: the store and the file's path in it)."""

    def __init__(self, path: Path, label: str, n_rows: int):
        self.label = label
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{label}: cannot read ({exc})") from None
        m = self._map
        try:  # the footer is read without numpy: a query that reads no rows from the file does not load it
            if m[:8] != MAGIC or m[-8:] != MAGIC:
                raise ValueError("not a cellar row file")
            length = int.from_bytes(m[len(m) - 16:len(m) - 8], "little")
            footer = json.loads(bytes(m[len(m) - 16 - length:len(m) - 16]))
            self.n_rows, self.width = int(footer["rows"]), int(footer["width"])
            if footer["version"] != VERSION or self.n_rows != n_rows:
                raise ValueError(f"{self.n_rows} rows where the table has {n_rows}")
            self._columns, self.names = _column_list(footer["columns"])  # names: the columns the rows hold
            self._offsets_at = int(footer["offsets"])
            self._keys = {name: (int(at), str(dtype)) for name, (at, dtype) in footer["keys"].items()}
            bounds = footer["bounds"]
            self.bounds_columns = bounds["columns"] if bounds else []
            self._bounds_at = int(bounds["at"]) if bounds else None
            self.block = int(footer["block"])
            last = self._offsets_at + 8 * self.n_rows
            if self.n_rows and int.from_bytes(m[last:last + 8], "little") + 8 > self._offsets_at:
                raise ValueError("its frames run past their index")
            _check_dtypes([dtype for _, dtype in self._keys.values()])
            # every region the arrays map lies inside the file
            blocks = -(-self.n_rows // self.block)
            regions = [(self._offsets_at, 8 * (self.n_rows + 1)),
                       *((at, self.n_rows * int(dtype[2:])) for at, dtype in self._keys.values())]
            if self._bounds_at is not None:
                regions.append((self._bounds_at, 8 * blocks * 2 * len(self.bounds_columns)))
            if any(at < 0 or at + size > len(m) - 16 - length for at, size in regions):
                raise ValueError("an index runs past the end of the file")
        except (ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            raise StoreError(f"{label}: damaged row file ({exc})") from None

    @cached_property
    def columns(self) -> dict[str, tuple[np.dtype, int]]:
        """Column name -> (dtype, start within a row)."""
        return {name: (np.dtype(dtype), start) for name, dtype, start in self._columns}

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.frombuffer(self._map, np.uint64, self.n_rows + 1, self._offsets_at)

    @cached_property
    def keys(self) -> dict[str, np.ndarray]:
        """The key columns (label id, centroids), uncompressed."""
        return {name: np.frombuffer(self._map, np.dtype(dtype), self.n_rows, at) for name, (at, dtype) in self._keys.items()}

    @cached_property
    def bounds(self) -> np.ndarray | None:
        """The centroid columns' (min, max) in every block of `block` rows."""
        if self._bounds_at is None:
            return None
        blocks = -(-self.n_rows // self.block)
        return np.frombuffer(self._map, np.float64, blocks * 2 * len(self.bounds_columns), self._bounds_at).reshape(blocks, -1)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The rows at `index` (in that order) as (len(index), width) bytes."""
        import zstandard

        index = np.asarray(index, np.int64)
        if len(index) == 0:
            return np.zeros((0, self.width), np.uint8)
        segments = np.empty((len(index), 2), np.uint64)
        segments[:, 0] = self.offsets[index] + 8
        segments[:, 1] = self.offsets[index + 1] - self.offsets[index]
        try:
            out = zstandard.ZstdDecompressor().multi_decompress_to_buffer(
                zstandard.BufferWithSegments(self._map, segments.tobytes()),
                decompressed_sizes=np.full(len(index), self.width, np.uint64).tobytes(),
                threads=min(2, os.cpu_count() or 1) if len(index) > 256 else 1)
        except zstandard.ZstdError as exc:
            raise StoreError(f"{self.label}: damaged row file ({exc})") from None
        rows = np.empty((len(index), self.width), np.uint8)
        flat = rows.reshape(-1)
        for i in range(len(index)):
            flat[i * self.width:(i + 1) * self.width] = np.frombuffer(out[i], np.uint8)
        return rows

    def arrays(self, index: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The columns `names` of the rows at `index`: key columns straight from the index, the others from the
        rows' frames (each decompressed once)."""
        out = {n: self.keys[n][index] for n in names if n in self.keys}
        rest = [n for n in names if n not in out]
        if rest:
            rows = self.rows(index)
            for n in rest:
                dtype, start = self.columns[n]
                out[n] = rows[:, start:start + dtype.itemsize].copy().view(dtype).reshape(-1)
        return out

    def in_ranges(self, ranges: Sequence[tuple[str, float, float]]) -> np.ndarray | None:
        """The rows whose key columns lie in every (column, lo, hi) range (bounds included), in row order,
        reading only the blocks the ranges meet; None where a range's column is not a key column."""
        if any(c not in self.keys for c, _, _ in ranges) or self.bounds is None:
            return None
        meet = np.ones(len(self.bounds), bool)
        for c, lo, hi in ranges:
            if c in self.bounds_columns:
                j = self.bounds_columns.index(c)
                meet &= (self.bounds[:, 2 * j + 1] >= lo) & (self.bounds[:, 2 * j] <= hi)
        found = []
        for b in np.flatnonzero(meet):
            start, stop = b * self.block, min((b + 1) * self.block, self.n_rows)
            keep = np.ones(stop - start, bool)
            for c, lo, hi in ranges:
                v = self.keys[c][start:stop]
                keep &= (v >= lo) & (v <= hi)
            found.append(start + np.flatnonzero(keep))
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def close(self) -> None:
        self._map.close()
