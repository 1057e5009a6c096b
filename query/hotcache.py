"""The on-disk session cache: a store's objects as uncompressed files that queries memory-map.

`cellar cache STORE` (or `build(store)`) writes into `STORE/cache/`, named by the store's state:

- `objects-<fingerprint>.arrow`: every row of the `objects` view (annotations joined), in the store's spatial
  order, as an Arrow IPC file in record batches of the store's row-group size. Scans (filters, boxes,
  group-bys, top-k) read the mapped columns in place: no Parquet decompression, nothing loaded into RAM, and
  the pages shared by every process through the operating system's page cache.
- `stats-<fingerprint>.json`: each batch's min and max of the centroid columns, so that a box query scans
  only the batches that can hold matches (as row-group statistics do for the Parquet files).
- with `--rows`, `rows-<fingerprint>.npy`: the numeric columns again, row-major (a numpy structured array).
  A filter's matches are scattered over the whole table, and taking whole rows of them from columns touches
  one page per value (200 columns x 5,000 rows: a million page touches); from the row-major copy a row is
  one contiguous read, as in a row store such as OMERO.tables' HDF5.

The cost is disk: the files hold the values uncompressed (the objects file is about 1.4x the Parquet files on
real measurements and the rows file as much again). The fingerprint is a hash of the manifest's table entries,
so any write (a new table, a re-measurement, an annotation version) makes the cache stale: a stale cache is
never read, and the writers remove it. The Parquet files stay the store's data; the cache can be dropped at
any time (`cellar cache --drop`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from schemas import store as layout
from schemas.errors import StoreError

BATCH_ROWS = 128 * 1024  # the store's row-group size: one record batch per row group
_RANGE_COLUMNS = ("centroid_x", "centroid_y", "centroid_z", "centroid_x_um", "centroid_y_um", "centroid_z_um")


def find(store: Path, manifest: dict) -> Path | None:
    """The store's cache file if one matches the manifest, else None."""
    path = layout.cache_path(store, manifest)
    return path if path.is_file() else None


def _unreadable(path: Path, exc: Exception) -> StoreError:
    return StoreError(f"{path}: unreadable session cache ({exc}); rebuild it with `cellar cache --rebuild`")


class Mapped:
    """The session cache files of one or more stores, memory-mapped; columns are materialised on demand.

    Opening reads only the files' footers. `columns(names)` gives an Arrow table of those columns over the
    mapped pages (zero-copy), `table()` all of them, `take(rows)` whole rows (from the row-major copy where
    one exists), `batch_ranges` the per-batch centroid ranges for pruning.
    """

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]
        self._readers = []
        for path in self.paths:
            try:
                self._readers.append(pa.ipc.open_file(pa.memory_map(str(path), "r")))
            except (OSError, pa.ArrowInvalid) as exc:
                raise _unreadable(path, exc) from None

    @cached_property
    def schema(self) -> pa.Schema:
        return pa.unify_schemas([r.schema for r in self._readers], promote_options="permissive") \
            if len(self._readers) > 1 else self._readers[0].schema

    def columns(self, names: Sequence[str] | None = None) -> pa.Table:
        """These columns (all for None) of every store, as one table over the mapped files; a column that
        only some stores have is null elsewhere (as in the views' union by name)."""
        table = self.table
        if names is None:
            return table
        have = set(table.column_names)
        for n in [n for n in names if n not in have]:
            table = table.append_column(n, pa.nulls(table.num_rows, self.schema.field(n).type))
        return table.select(list(names))

    @cached_property
    def num_rows(self) -> int:
        ranges = self.batch_ranges
        return int(ranges["starts"][-1]) if ranges is not None else sum(r.count_rows() for r in self._readers)

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

    def rows(self, start: int, stop: int, names: Sequence[str]) -> pa.Table:
        """Rows [start, stop) of these columns: one store's batch is read alone (a box query's few batches
        need not materialise the whole file's metadata)."""
        ranges = self.batch_ranges
        if len(self._readers) == 1 and ranges is not None and "table" not in self.__dict__:
            k = int(np.searchsorted(ranges["starts"], start, side="right")) - 1
            if ranges["starts"][k] == start and ranges["starts"][k + 1] == stop:
                batch = self._readers[0].get_batch(k)
                return pa.Table.from_batches([batch.select(list(names))])
        return self.columns(names).slice(start, stop - start)

    @cached_property
    def batch_ranges(self) -> dict[str, Any] | None:
        """{"starts": row offsets of the batches (and the end), column: (mins, maxs)} over every store, or None
        if a store's stats file is missing."""
        starts, ranges = [0], {}
        for path in self.paths:
            stats_path = path.with_name(path.name.replace("objects-", "stats-", 1).replace(".arrow", ".json"))
            try:
                stats = json.loads(stats_path.read_text())
            except (OSError, ValueError):
                return None
            base = starts[-1]
            starts.extend(base + e for e in stats["ends"])
            for name, (lo, hi) in stats["ranges"].items():
                mins, maxs = ranges.setdefault(name, ([], []))
                mins.extend(lo)
                maxs.extend(hi)
        n = len(starts) - 1
        out: dict[str, Any] = {"starts": np.asarray(starts, np.int64)}
        for name, (mins, maxs) in ranges.items():
            if len(mins) == n:  # a column every store has
                out[name] = (np.asarray(mins, float), np.asarray(maxs, float))
        return out

    @cached_property
    def _rows_file(self) -> np.ndarray | None:
        """The row-major copy (one store only), memory-mapped, or None."""
        if len(self.paths) != 1:
            return None
        path = self.paths[0]
        path = path.with_name(path.name.replace("objects-", "rows-", 1).replace(".arrow", ".npy"))
        if not path.is_file():
            return None
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise _unreadable(path, exc) from None

    def take(self, rows: np.ndarray, names: Sequence[str] | None = None) -> pa.Table:
        """Whole rows (these columns, all for None) in the order of `rows`."""
        from query.api import take_rows

        names = list(self.schema.names) if names is None else list(names)
        matrix = self._rows_file
        if matrix is None:
            table = self.table if len(names) == len(self.schema) else self.columns(names)
            return take_rows(table.select(names), rows)
        # Numeric columns without nulls from the row-major copy, the others (text, nulls) from the columns.
        nulls = {f.name: f for f in self.schema}
        plain = [n for n in names if n in matrix.dtype.names and not self._has_nulls(n)]
        other = [n for n in names if n not in plain]
        picked = matrix[np.sort(rows)] if len(rows) else matrix[:0]
        back = np.argsort(np.argsort(rows, kind="stable"), kind="stable")  # sorted reads, then the asked order
        arrays = {n: pa.array(np.ascontiguousarray(picked[n][back]), type=nulls[n].type) for n in plain}
        if other:
            rest = take_rows(self.columns(other), rows)
            arrays.update({n: rest.column(n) for n in other})
        return pa.table([arrays[n] for n in names], schema=pa.schema([self.schema.field(n) for n in names]))

    def _has_nulls(self, name: str) -> bool:
        # the null counts are in the batches' metadata: no values are read
        return self.table.column(name).null_count > 0


def build(store: Path, *, rows: bool = False, progress: bool = False) -> dict[str, Any]:
    """Write the store's cache files (replacing any others); returns paths, rows, bytes and seconds.

    Streams the `objects` view through DuckDB batch by batch, so memory stays at a few row groups. Every file
    is written under a temporary name and renamed into place, the objects file last: readers see the old
    state or the new one. `rows=True` also writes the row-major copy of the numeric columns.
    """
    from query.store import Objects

    start = time.perf_counter()
    store = Path(store)
    objs = Objects([store], cache=False, engine="duckdb")
    if not objs.tables:
        raise StoreError(f"{store}: the store has no tables to cache")
    manifest = objs.manifests[0]
    target = layout.cache_path(store, manifest)
    target.parent.mkdir(exist_ok=True)
    layout.remove_stale_caches(store, None)  # this state's files too: they are written anew
    target.parent.mkdir(exist_ok=True)
    tmps = {kind: target.with_name(f"{layout.TMP_PREFIX}{kind}-{uuid.uuid4().hex[:12]}") for kind in ("objects", "rows")}
    n_rows, ends, ranges = 0, [], {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(objs), unit=" objects", desc=f"cache {store.name}", leave=False)
    try:
        reader = objs.con.sql("SELECT * FROM objects").to_arrow_reader(BATCH_ROWS)
        names = [f.name for f in reader.schema if f.name in _RANGE_COLUMNS]
        record = _record_dtype(reader.schema) if rows else None
        row_sink = open(tmps["rows"], "wb") if record is not None else None
        try:
            if row_sink is not None:
                np.lib.format.write_array_header_1_0(row_sink, {"descr": np.lib.format.dtype_to_descr(record),
                                                                "fortran_order": False, "shape": (len(objs),)})
            with pa.OSFile(str(tmps["objects"]), "wb") as sink, pa.ipc.new_file(sink, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    n_rows += batch.num_rows
                    ends.append(n_rows)
                    for name in names:
                        values = batch.column(name).to_numpy(zero_copy_only=False)
                        lo, hi = (float(np.nanmin(values)), float(np.nanmax(values))) if np.isfinite(values).any() \
                            else (float("-inf"), float("inf"))
                        ranges.setdefault(name, ([], []))[0].append(lo)
                        ranges[name][1].append(hi)
                    if row_sink is not None:
                        block = np.empty(batch.num_rows, record)
                        for name in record.names:
                            block[name] = batch.column(name).to_numpy(zero_copy_only=False)
                        row_sink.write(block.tobytes())
                    if bar is not None:
                        bar.update(batch.num_rows)
            if n_rows != len(objs):
                raise StoreError(f"{store}: the manifest counts {len(objs):,} objects, the files hold {n_rows:,}")
        finally:
            if row_sink is not None:
                row_sink.close()
        for tmp in tmps.values():
            if tmp.exists():
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
        layout.write_json_atomic(layout.cache_path(store, manifest, "stats"), {"ends": ends, "ranges": ranges})
        if record is not None:
            os.replace(tmps["rows"], layout.cache_path(store, manifest, "rows"))
        os.replace(tmps["objects"], target)
    finally:
        if bar is not None:
            bar.close()
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    files = [layout.cache_path(store, manifest, k) for k in ("objects", "rows", "stats")]
    return {"path": str(target), "rows": n_rows, "bytes": sum(f.stat().st_size for f in files if f.is_file()),
            "row_major": record is not None, "seconds": time.perf_counter() - start}


def _record_dtype(schema: pa.Schema) -> np.dtype | None:
    """The row-major copy's record: every integer and float column (text and booleans stay columnar)."""
    fields = [(f.name, np.dtype(f.type.to_pandas_dtype())) for f in schema
              if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    return np.dtype(fields) if fields else None


def status(store: Path) -> dict[str, Any]:
    """Whether the store has a fresh cache, its size (with the row-major copy), and the Parquet files' size."""
    store = Path(store)
    manifest = layout.read_manifest(store)
    path = find(store, manifest)
    files = [layout.cache_path(store, manifest, k) for k in ("objects", "rows", "stats")]
    parquet = sum((store / t["dir"] / f).stat().st_size for t in manifest.get("tables", []) for f in t["files"]
                  if (store / t["dir"] / f).is_file())
    folder = store / layout.CACHE_DIR
    stale = [p for p in folder.iterdir() if p not in files] if folder.is_dir() else []
    return {"store": str(store), "fresh": path is not None, "path": str(path) if path else None,
            "row_major": files[1].is_file(), "bytes": sum(f.stat().st_size for f in files if f.is_file()) if path else 0,
            "parquet_bytes": parquet, "stale_files": len(stale)}
