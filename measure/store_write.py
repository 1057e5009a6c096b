"""Write one (image, label image) table into a cellar store, atomically.

A new store is assembled in a temporary sibling directory and renamed into place. Adding to (or, with
`overwrite`, replacing in) an existing store writes the Parquet file under a temporary name, renames it to a
name unique to this run, then swaps the manifest; files the manifest no longer lists are removed last. A
reader therefore always sees either the old or the new table, and a crash leaves at most unlisted files
that the next write removes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import schemas
from schemas import integrity
from schemas import store as layout
from schemas.errors import StoreError

ROW_GROUP_SIZE = 128 * 1024
COMPRESSION = "lz4"


def check_output(out: Path, image: str, label_image: str, overwrite: bool) -> None:
    """Refuse, before any work, an output that is not a store (or empty), a store with a damaged file, or one
    that already holds this table."""
    if not out.exists():
        if not out.parent.is_dir():
            raise StoreError(f"{out}: parent directory {out.parent} does not exist")
        return
    if out.is_file() or out.is_symlink() and not out.is_dir():
        raise StoreError(f"{out}: exists and is a file, not a cellar store; refusing to overwrite it")
    if not layout.is_store(out):
        if any(out.iterdir()):
            raise StoreError(f"{out}: exists and is a directory that is not a cellar store; refusing to write into it "
                             f"(no {layout.MANIFEST})")
        return
    # a damaged store is refused before any work (a table being replaced may be the damaged one)
    manifest = integrity.check_writable(out, skip=(image, label_image) if overwrite else None)
    if _find(manifest, image, label_image) is not None and not overwrite:
        raise StoreError(
            f"{out}: already holds image={image} label_image={label_image}; pass --overwrite to replace it"
        )


def existing_entry(out: Path, image: str, label_image: str) -> dict | None:
    """The manifest entry of the (image, label image) table if `out` is a store that holds it."""
    if not layout.is_store(out):
        return None
    manifest = layout.read_manifest(out)
    i = _find(manifest, image, label_image)
    return None if i is None else manifest["tables"][i]


def _find(manifest: dict, image: str, label_image: str) -> int | None:
    for i, t in enumerate(manifest.get("tables", [])):
        if t.get("image") == image and t.get("label_image") == label_image:
            return i
    return None


def arrow_table(columns: dict[str, Any], column_specs: list[dict], provenance: dict) -> pa.Table:
    """An Arrow table whose fields carry each column's unit and description as field metadata (the caller
    puts the rows in the store's spatial order, `schemas.store.spatial_order`)."""
    fields = []
    for spec in column_specs:
        meta = {"unit": spec["unit"], "description": spec["description"]}
        dtype = columns[spec["name"]].dtype
        fields.append(pa.field(spec["name"], pa.string() if dtype == object else pa.from_numpy_dtype(dtype),
                               metadata=meta))
    schema = pa.schema(fields, metadata={"cellar": json.dumps(provenance)})
    return pa.table([columns[f.name] for f in fields], schema=schema)


def write_table(out: Path, entry: dict, table: pa.Table | Iterable[pa.Table], overwrite: bool = False) -> Path:
    """Commit `table` as the store table described by `entry` (which gains `dir`, `files`, `created`).

    `table` may be an iterable of tables with one schema (at least one, possibly empty), written one after
    the other into the same file, so that a large table need never be in memory whole."""
    check_output(out, entry["image"], entry["label_image"], overwrite)
    run_id = uuid.uuid4().hex[:12]
    # `entry` itself is completed (not a copy), so a generator of `table` may still add to it while it runs
    entry.update(dir=layout.table_dir(entry["image"], entry["label_image"]), files=[f"part-{run_id}.parquet"],
                 created=layout.now())
    if layout.is_store(out):
        _commit_into(out, entry, table)
        return out
    # Staging directories of earlier attempts at this store that were killed before their rename: no reader
    # ever saw them (concurrent writers to one store are not supported).
    for stale in out.parent.glob(f"{layout.TMP_PREFIX}{out.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f"{layout.TMP_PREFIX}{out.name}-{run_id}"
    try:
        staging.mkdir()
        manifest = {
            "format": layout.FORMAT, "format_version": layout.FORMAT_VERSION,
            "cellar_version": schemas.cellar_version(), "created": entry["created"], "tables": [],
        }
        (staging / layout.MANIFEST).write_text(json.dumps(manifest))
        _commit_into(staging, entry, table)
        os.rename(staging, out)  # rename(2) also replaces an empty directory at `out`
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _commit_into(root: Path, entry: dict, table: pa.Table | Iterable[pa.Table]) -> None:
    part_dir = root / entry["dir"]
    part_dir.mkdir(parents=True, exist_ok=True)
    final = part_dir / entry["files"][0]
    tmp = final.with_name(final.name + ".tmp")
    committed = False
    try:
        # LZ4, no dictionary encoding, 128k-row groups, chosen by measurement (benchmarks/bench_query.py and
        # the README): measurement columns are mostly distinct floats, where dictionaries cost time and space
        # (100k x 116: 0.45 -> 0.27 s, 63 -> 52 MB); LZ4 files are ~25% larger than zstd's on real
        # measurements but decompress about twice as fast, which halves queries that read many columns.
        writer = None
        try:
            for part in [table] if isinstance(table, pa.Table) else table:
                if writer is None:
                    writer = pq.ParquetWriter(tmp, part.schema, compression=COMPRESSION, write_statistics=True,
                                              use_dictionary=False)
                writer.write_table(part, row_group_size=ROW_GROUP_SIZE)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError("bug: write_table was given no table")
        os.replace(tmp, final)
        layout.write_json_atomic(root / layout.SCHEMA, schemas.objects_schema())
        manifest = layout.read_manifest(root)
        tables = manifest.setdefault("tables", [])
        i = _find(manifest, entry["image"], entry["label_image"])
        if i is None:
            tables.append(entry)
        else:  # a re-measurement keeps the table's annotations (joined by label id)
            if tables[i].get("annotations"):
                entry["annotations"] = tables[i]["annotations"]
            tables[i] = entry
        manifest["updated"] = entry["created"]
        manifest["cellar_version"] = schemas.cellar_version()
        layout.write_json_atomic(root / layout.MANIFEST, manifest)
        committed = True
    finally:
        if not committed:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
    # Files of replaced or crashed writes: no manifest lists them any more.
    for stale in part_dir.iterdir():
        if stale.name not in entry["files"]:
            stale.unlink(missing_ok=True)
    layout.remove_stale_caches(root, manifest)  # the session cache of the previous state
