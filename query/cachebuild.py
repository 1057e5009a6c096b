"""Writing a store's on-disk session cache (`cellar cache`): the files `query.hotcache` describes and reads,
made by streaming the store's `objects` view (`query.store.Tables`) through DuckDB."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa

from ..schemas import integrity, log
from ..schemas import store as layout
from ..schemas.errors import StoreError
from . import hotcache
from .store import Tables

if TYPE_CHECKING:
    from rich.console import Console


def build(store: Path, *, rows: bool = False, progress: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    """Write the store's cache files (replacing any others); returns paths, rows, bytes and seconds.

    Streams the `objects` view through DuckDB batch by batch, so memory stays at a few row groups. Every file
    is written under a temporary name and renamed into place, the objects file last: readers see the old
    state or the new one. `rows=True` also writes the row-major copy of the numeric columns. `progress=True`
    shows a rich progress bar on `console` (a `rich.console.Console`; default: standard error).
    """
    start = time.perf_counter()
    store = Path(store)
    objs = Tables([store], cache=False, engine="duckdb")
    snap = objs.snapshots[0]
    if not len(snap):
        raise StoreError(f"{store}: the store has no tables to cache")
    for entry in snap.entries():  # a damaged Parquet file fails here, before any cache file is touched
        integrity.check_entry_files(snap, entry)
    version = snap.version
    target = layout.cache_path(store, version)
    layout.remove_stale_caches(store, version)  # earlier states' files; this state's are replaced at the end
    target.parent.mkdir(exist_ok=True)
    tmps = {kind: target.with_name(f"{layout.TMP_PREFIX}{kind}-{uuid.uuid4().hex[:12]}") for kind in ("objects", "rows", "places", "ranges")}
    n_rows, ends, blocks, ranges = 0, [], [], {}
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(f"caching {store.name}"), BarColumn(), MofNCompleteColumn(), TextColumn("objects"),
                       TimeRemainingColumn(), console=console or Console(stderr=True), transient=True)
        bar.start()
        task = bar.add_task("cache", total=len(objs))
    try:
        reader = objs.con_for("SELECT *").sql("SELECT * FROM objects").to_arrow_reader(hotcache.BATCH_ROWS)
        names = [f.name for f in reader.schema if f.name in hotcache.RANGE_COLUMNS]
        record = _record_dtype(reader.schema) if rows else None
        row_sink = open(tmps["rows"], "wb") if record is not None else None
        try:
            if row_sink is not None:
                np.lib.format.write_array_header_1_0(row_sink, {"descr": np.lib.format.dtype_to_descr(record),
                                                                "fortran_order": False, "shape": (len(objs),)})
            with pa.OSFile(str(tmps["objects"]), "wb") as sink, pa.ipc.new_file(sink, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    for first in range(0, batch.num_rows, hotcache.BLOCK_ROWS):
                        blocks.append(n_rows + min(first + hotcache.BLOCK_ROWS, batch.num_rows))
                        for name in names:
                            values = batch.column(name).slice(first, hotcache.BLOCK_ROWS).to_numpy(zero_copy_only=False)
                            finite = np.isfinite(values).any()
                            ranges.setdefault(name, ([], []))[0].append(float(np.nanmin(values)) if finite else -np.inf)
                            ranges[name][1].append(float(np.nanmax(values)) if finite else np.inf)
                    n_rows += batch.num_rows
                    ends.append(n_rows)
                    if row_sink is not None:
                        block = np.empty(batch.num_rows, record)
                        for name in record.names:
                            block[name] = batch.column(name).to_numpy(zero_copy_only=False)
                        row_sink.write(block.tobytes())
                    if bar is not None:
                        bar.update(task, advance=batch.num_rows)
            if n_rows != len(objs):
                raise StoreError(f"{store}: the log counts {len(objs):,} objects, the files hold {n_rows:,}")
        finally:
            if row_sink is not None:
                row_sink.close()
        for tmp in tmps.values():
            if tmp.exists():
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
        names, places = _buffer_places(tmps["objects"])
        with open(tmps["places"], "wb") as fh:
            np.save(fh, places)
        os.replace(tmps["places"], layout.cache_path(store, version, "places"))
        with open(tmps["ranges"], "wb") as fh:  # numbers in .npy: parsing them from JSON costs milliseconds
            np.save(fh, np.array([ranges[n] for n in ranges], float).reshape(len(ranges), 2, len(blocks)))
        os.replace(tmps["ranges"], layout.cache_path(store, version, "ranges"))
        # The stats file says whether there is a row-major copy: it names one only once it is in place, and an
        # earlier build's copy goes only once the stats file no longer names it.
        if record is not None:
            os.replace(tmps["rows"], layout.cache_path(store, version, "rows"))
        stats = {"ends": ends, "blocks": blocks, "ranges": list(ranges), "places": names, "rows": record is not None}
        layout.write_json_atomic(layout.cache_path(store, version, "stats"), stats, indent=None)
        if record is None:
            layout.cache_path(store, version, "rows").unlink(missing_ok=True)
        os.replace(tmps["objects"], target)
    except duckdb.Error as exc:  # a Parquet file whose data do not decode
        raise objs.error(exc) from None
    except FileNotFoundError as exc:  # a write to the store removed the files of the state being cached
        raise StoreError(f"{store}: the store changed while its cache was written ({exc.filename} is gone); "
                         "run `cellar cache` again") from None
    finally:
        if bar is not None:
            bar.stop()
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    latest = log.advance(snap).version
    if latest != version:  # a write committed meanwhile
        layout.remove_stale_caches(store, latest)
        raise StoreError(f"{store}: the store changed while its cache was written; run `cellar cache` again")
    files = [layout.cache_path(store, version, k) for k in ("objects", "rows", "stats", "places", "ranges")]
    return {"path": str(target), "rows": n_rows, "bytes": sum(f.stat().st_size for f in files if f.is_file()),
            "row_major": record is not None, "seconds": time.perf_counter() - start}


def _buffer_places(path: Path) -> tuple[list[str], np.ndarray]:
    """The columns without nulls and where pyarrow places their buffers in the written IPC file:
    places[column, batch, buffer] = (file offset, size), -1 for an absent buffer. `Mapped.columns` rebuilds
    those columns from the mapped file at these places without parsing every batch's metadata (about 10 ms
    on a 5M x 200 file, against about 1 ms for a few columns)."""
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_file(source).read_all()
    source.seek(0)
    base = source.read_buffer(source.size()).address
    names, rows = [], []
    for name, column in zip(table.column_names, table.columns):
        chunks = column.chunks
        if column.null_count or not chunks or any(c.offset or len(c.buffers()) != c.type.num_buffers or
                                                  c.type.num_buffers > 3 for c in chunks):
            continue
        slots = np.full((len(chunks), 3, 2), -1, np.int64)
        for k, chunk in enumerate(chunks):
            for b, buf in enumerate(chunk.buffers()):
                if buf is not None:
                    slots[k, b] = (buf.address - base, buf.size)
        names.append(name)
        rows.append(slots)
    return names, np.stack(rows) if rows else np.zeros((0, table.column(0).num_chunks, 3, 2), np.int64)


def _record_dtype(schema: pa.Schema) -> np.dtype | None:
    """The row-major copy's record: every integer and float column (text and booleans stay columnar)."""
    fields = [(f.name, np.dtype(f.type.to_pandas_dtype())) for f in schema
              if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    return np.dtype(fields) if fields else None
