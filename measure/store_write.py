"""Write one (image, label image) table into a cellar store: its Parquet file, then a commit.

The Parquet file goes under a name unique to this run (`part-<run>.parquet`, written under a temporary name and
renamed), then one commit to the store's log (`schemas.log`) adds the table, or replaces it with `overwrite`.
Any number of writers may do this at once, on one machine or over NFS: each commit is one new file, and a
writer that finds its table committed meanwhile by another re-decides (the same settings: kept; others: an
error). A reader sees the old table or the new one; a crash leaves at most a file no commit lists, which the
next write of that table (or `cellar vacuum`) removes once it is older than RETAIN_S.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import schemas
from ..schemas import integrity, log, rowfile
from ..schemas import store as layout
from ..schemas.arrays import from_numpy
from ..schemas.atomic import atomic_write, fsync_file, temp_path
from ..schemas.errors import StoreError

ROW_GROUP_SIZE = 128 * 1024
COMPRESSION = "lz4"
# Files no commit lists (replaced tables, crashed writes) are removed once older than this: a reader of the
# state before a replacement may still be reading them, and a writer of the same table may be writing one.
RETAIN_S = 3600.0


def check_output(out: Path, image: str, label_image: str, overwrite: bool) -> log.Snapshot | None:
    """Refuse, before any work, an output that is not a store (or empty), or a store that already holds this
    table (without `overwrite`). Only what the write touches is checked: a damaged file of another table
    stays as it is and is no reason to refuse a new table. Returns the store's state (None: no store yet)."""
    if not out.exists():
        if not out.parent.is_dir():
            raise StoreError(f"{out}: parent directory {out.parent} does not exist")
        return None
    if out.is_file() or out.is_symlink() and not out.is_dir():
        raise StoreError(f"{out}: exists and is a file, not a cellar store; refusing to overwrite it")
    if not log.is_store(out):
        if any(out.iterdir()):
            raise StoreError(f"{out}: exists and is a directory that is not a cellar store; refusing to write into it "
                             f"(no {log.MARKER})")
        return None
    snap = log.snapshot(out)
    if (image, label_image) in snap and not overwrite:
        raise StoreError(
            f"{out}: already holds image={image} label_image={label_image}; pass --overwrite to replace it"
        )
    return snap


def check_files(out: Path, entry: dict) -> None:
    """A StoreError naming the first of the table's files that is missing or damaged (`schemas.integrity`)."""
    integrity.check_entry_files(log.snapshot(out), entry)


def existing_entry(out: Path, image: str, label_image: str) -> dict | None:
    """The entry of the (image, label image) table if `out` is a store that holds it (with its `columns`)."""
    if not log.is_store(out):
        return None
    snap = log.snapshot(out)
    entry = snap.entry(image, label_image)
    return None if entry is None else {**entry, "columns": snap.columns(entry)}


def arrow_table(columns: dict[str, Any], column_specs: list[dict], provenance: dict) -> pa.Table:
    """An Arrow table whose fields carry each column's unit as field metadata, and the provenance as the
    schema's `cellar` metadata (the caller puts the rows in the store's spatial order,
    `schemas.store.spatial_order`).

    The descriptions and the column list stay in the store's log (`columns` view, `cellar info --columns`):
    every engine parses a file's footer before reading it, and with them a 332-column table's footer was
    307 KB instead of 60 KB."""
    fields = []
    for spec in column_specs:
        dtype = columns[spec["name"]].dtype
        fields.append(pa.field(spec["name"], pa.string() if dtype == object else pa.from_numpy_dtype(dtype),
                               metadata={"unit": spec["unit"]}))
    about = {k: v for k, v in provenance.items() if k != "columns"}
    schema = pa.schema(fields, metadata={"cellar": json.dumps(about)})
    return pa.table([from_numpy(columns[f.name]) for f in fields], schema=schema)


def write_table(out: Path, entry: dict, table: pa.Table | Iterable[pa.Table], overwrite: bool = False, *,
                written: Callable[[dict], None] | None = None) -> Path:
    """Commit `table` as the store table described by `entry` (its `columns`: the column specs), creating the
    store if needed. `entry` gains `dir`, `files`, `created` and `columns_id` (its columns go to the log's
    column lists).

    `table` may be an iterable of tables with one schema (at least one, possibly empty), written one after
    the other into the same file, so that a large table need never be in memory whole. If another writer
    committed this table meanwhile with the same `settings`, its table is kept and this one dropped; with other
    settings that is an error unless `overwrite`. `written(entry)`, if given, runs once the table's file is
    written, before the entry is committed (`measure` records its elapsed time there)."""
    state = check_output(out, entry["image"], entry["label_image"], overwrite)
    run_id = uuid.uuid4().hex[:12]
    # `entry` itself is completed (not a copy), so a generator of `table` may still add to it while it runs
    entry.update(dir=layout.table_dir(entry["image"], entry["label_image"]), files=[f"part-{run_id}.parquet"],
                 created=layout.now())
    # A new store is assembled beside `out` with this table's file, and renamed into place: a first write that
    # fails leaves nothing behind.
    staging = None if log.is_store(out) else log.new_store(out, entry["created"],
                                                             {"cellar_version": schemas.cellar_version()})
    rel = f"{entry['dir']}/{entry['files'][0]}"
    committed = False
    try:
        _write_parquet((staging or out) / rel, table)
        if written is not None:
            written(entry)
        if staging is not None:
            layout.write_json_atomic(staging / layout.SCHEMA, schemas.objects_schema())
            log.place_store(staging, out)
            staging = None
        entry["columns_id"] = log.write_columns(out, entry.pop("columns"))
        snap = log.commit(out, "measure", lambda now: _add(now, entry, overwrite), start=state)
        committed = snap is not None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not committed:
            (out / rel).unlink(missing_ok=True)
            (out / entry["dir"] / rowfile.path_of(entry["files"][0])).unlink(missing_ok=True)
    if committed:
        remove_unlisted(out, snap, (entry["image"], entry["label_image"]))
        layout.remove_stale_caches(out, snap.version)  # the session caches of earlier states
    return out


def _add(state: log.Snapshot, entry: dict, overwrite: bool) -> list[dict] | None:
    """The commit's actions against `state`: add the table, or replace it (keeping its annotations, which join
    by label id); None if another writer committed it with the same settings meanwhile."""
    key = (entry["image"], entry["label_image"])
    current = state.entry(*key)
    if current is not None and not overwrite:
        if entry.get("settings") is not None and current.get("settings") == entry.get("settings"):
            return None
        raise StoreError(f"{state.store}: another writer committed image={key[0]} label_image={key[1]} meanwhile; "
                         "pass --overwrite to replace it")
    if current is not None and current.get("annotations"):
        entry["annotations"] = current["annotations"]
    else:
        entry.pop("annotations", None)
    entry["cellar_version"] = entry.get("cellar_version") or schemas.cellar_version()
    return [{"add": entry}]


def _write_parquet(final: Path, table: pa.Table | Iterable[pa.Table]) -> None:
    """Write the table's row groups to `final`, and its row file beside it where the columns allow one
    (`schemas.rowfile`), both atomically (`schemas.atomic`: the data are on disk before a commit can name
    them). The row file is in place before the Parquet file: a table file never lacks the row file it has."""
    rows_final = final.with_name(rowfile.path_of(final.name))
    rows_tmp = temp_path(rows_final)
    try:
        with atomic_write(final, parents=True) as tmp:
            # LZ4, no dictionary encoding, 128k-row groups, chosen by measurement (benchmarks/bench_query.py
            # and the README): measurement columns are mostly distinct floats, where dictionaries cost time and
            # space (100k x 116: 0.45 -> 0.27 s, 63 -> 52 MB); LZ4 files are ~25% larger than zstd's on real
            # measurements but decompress about twice as fast, which halves queries that read many columns.
            # The row file is compressed in a thread while pyarrow encodes the same rows (both release the GIL);
            # leaving the pool waits for it, before either file is closed.
            writer = rows = None
            try:
                with ThreadPoolExecutor(1) as beside:
                    for part in [table] if isinstance(table, pa.Table) else table:
                        if writer is None:
                            writer = pq.ParquetWriter(tmp, part.schema, compression=COMPRESSION,
                                                      write_statistics=True, use_dictionary=False)
                            rows = rowfile.Writer(rows_tmp, part.schema) if rowfile.storable(part.schema) else None
                        if rows is not None and any(c.null_count for c in part.columns):
                            rows.abort()  # a column with nulls: no row file (readers read the Parquet file)
                            rows = None
                        pending = beside.submit(rows.write, part) if rows is not None else None
                        writer.write_table(part, row_group_size=ROW_GROUP_SIZE)
                        if pending is not None:
                            pending.result()
            finally:
                if writer is not None:
                    writer.close()
                if rows is not None:
                    rows.close()
            if writer is None:
                raise ValueError("bug: write_table was given no table")
            if rows is not None:
                fsync_file(rows_tmp)
                os.replace(rows_tmp, rows_final)
    finally:
        rows_tmp.unlink(missing_ok=True)


def remove_unlisted(store: Path, snap: log.Snapshot, key: tuple[str, str], retain_s: float = RETAIN_S) -> int:
    """Remove the files in the folder of table `key` that `snap` does not list and that are older than
    `retain_s` seconds (a replaced table's, a crashed write's); returns how many. One table's folder: the cost
    does not grow with the store."""
    rel_dir = layout.table_dir(*key)
    entry = snap.entry(*key)
    listed = {n for name in entry["files"] for n in (name, rowfile.path_of(name))} if entry is not None else set()
    now, removed = time.time(), 0
    folder = Path(store) / rel_dir
    for path in folder.iterdir() if folder.is_dir() else []:
        if path.name in listed or not path.is_file():
            continue
        try:
            if now - path.stat().st_mtime >= retain_s:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # removed by another writer meanwhile
            pass
    return removed


def vacuum(store: Path, retain_s: float = RETAIN_S) -> dict[str, int]:
    """Remove what no commit of the latest state lists and that is older than `retain_s` seconds: data files of
    replaced tables and crashed writes (tables' and annotation versions'), temporary files, the staging folders
    of first writes killed before they made the store, stale session caches. Returns how many files and bytes
    were removed."""
    store = Path(store)
    snap = log.snapshot(store)
    listed = set()
    for entry in snap.entries():
        listed.update(f"{entry['dir']}/{n}" for name in entry["files"] for n in (name, rowfile.path_of(name)))
        for version in entry.get("annotations") or []:
            listed.update(f"{version['dir']}/{name}" for name in version["files"])
    now, files, size = time.time(), 0, 0
    for top in (layout.OBJECTS_DIR, "annotations"):
        for path in sorted((store / top).rglob("*")) if (store / top).is_dir() else []:
            if not path.is_file() or path.relative_to(store).as_posix() in listed:
                continue
            try:
                info = path.stat()
                if now - info.st_mtime >= retain_s:
                    path.unlink()
                    files, size = files + 1, size + info.st_size
            except FileNotFoundError:
                pass
    for folder in (store / log.LOG_DIR, store / log.LOG_DIR / log.COLUMNS_DIR):  # commits of killed writers
        for path in folder.glob(f"{layout.TMP_PREFIX}*"):
            try:
                info = path.stat()
                if path.is_file() and now - info.st_mtime >= retain_s:
                    path.unlink()
                    files, size = files + 1, size + info.st_size
            except FileNotFoundError:
                pass
    for staging in store.parent.glob(f"{layout.TMP_PREFIX}{store.name}-*"):  # first writes that were killed
        if staging.is_dir() and now - staging.stat().st_mtime >= retain_s:
            files += sum(1 for p in staging.rglob("*") if p.is_file())
            shutil.rmtree(staging, ignore_errors=True)
    files += layout.remove_stale_caches(store, snap.version)
    return {"files": files, "bytes": size, "version": snap.version}
