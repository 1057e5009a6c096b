"""Checks that a store's Parquet files are what its manifest says, each failure one line naming the file.

Two depths:
- `parquet_file`: the file exists and starts and ends with Parquet's magic bytes (two reads of 4 bytes): a
  missing, empty, truncated or garbage file fails here. Every `query.open` runs it on every file.
- `check_tables`: every file's footer also parses and holds the columns the manifest lists for it. Parsing a
  footer costs up to tens of milliseconds on a wide table (200 columns x 40 row groups: 30 ms), so only the
  writers run it, before they write; the query engines compare the columns from the footers they parse
  anyway (see `query.store`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from schemas import store as layout
from schemas.errors import StoreError

MAGIC = b"PAR1"
PARTITION_KEYS = ("image", "label_image")  # Hive keys: in the folder names, not in the files


def files(manifest: dict[str, Any], skip: tuple[str, str] | None = None) -> Iterator[tuple[str, set[str]]]:
    """(store-relative path, expected column names) of every Parquet file the manifest lists: the tables'
    files and their annotation versions'. `skip` (image, label image) leaves out that table's own files
    (a table about to be replaced), not its annotations."""
    for table in manifest.get("tables", []):
        if (table["image"], table["label_image"]) != skip:
            names = {c["name"] for c in table["columns"]} - set(PARTITION_KEYS)
            yield from ((f"{table['dir']}/{name}", names) for name in table["files"])
        for version in table.get("annotations") or []:
            names = {"label_id", *(c["name"] for c in version["columns"])}
            yield from ((f"{version['dir']}/{name}", names) for name in version["files"])


def parquet_file(store: Path, rel: str) -> Path:
    """The file's path, after the cheap check: it exists and has Parquet's magic bytes at both ends."""
    path = Path(store) / rel
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            size = fh.seek(0, 2)
            fh.seek(max(size - 8, 0))
            tail = fh.read(8)
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError(f"{store}: manifest lists {rel}, which is missing{_remedy(rel)}") from None
    except IsADirectoryError:
        raise StoreError(f"{store}: {rel}: a directory where the manifest lists a Parquet file") from None
    except OSError as exc:
        raise StoreError(f"{store}: {rel}: cannot read ({exc.strerror or exc})") from None
    footer = int.from_bytes(tail[:4], "little") if len(tail) == 8 else -1
    if head != MAGIC or tail[4:] != MAGIC or not 0 < footer <= size - 12:
        what = "an empty file" if size == 0 else f"{size:,} bytes, {'no' if tail[4:] != MAGIC else 'a damaged'} footer"
        raise StoreError(f"{store}: {rel}: truncated or not a Parquet file ({what}){_remedy(rel)}")
    return path


def column_problem(store: Path, rel: str, found: Iterable[str], expected: set[str]) -> StoreError | None:
    """The error for a file whose columns are not the ones the manifest lists for it, or None."""
    found = set(found)
    if found == expected:
        return None
    missing, extra = sorted(expected - found), sorted(found - expected)
    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    parts = [f"{len(missing)} missing: {some(missing)}" if missing else "",
             f"{len(extra)} not listed: {some(extra)}" if extra else ""]
    return StoreError(f"{store}: {rel}: not this table's file: its columns are not those the manifest lists "
                      f"({'; '.join(p for p in parts if p)}){_remedy(rel)}")


def check_tables(store: Path, manifest: dict[str, Any], skip: tuple[str, str] | None = None) -> None:
    """Every Parquet file of the store (see `files`) is there, parses, and holds its columns; a StoreError
    names the first that does not. Writers run it first, so that they never add to a damaged store."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for rel, expected in files(manifest, skip):
        path = parquet_file(store, rel)
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowInvalid) as exc:
            text = " ".join(str(exc).split())
            raise StoreError(f"{store}: {rel}: damaged Parquet file ({text}){_remedy(rel)}") from None
        problem = column_problem(store, rel, schema.names, expected)
        if problem is not None:
            raise problem


def check_writable(store: Path, skip: tuple[str, str] | None = None) -> dict[str, Any]:
    """The manifest of a store a writer may add to: read, checked, and every Parquet file checked
    (`check_tables`). The session cache and schema.json are derived copies, which writes replace or remove."""
    manifest = layout.read_manifest(store)
    check_tables(store, manifest, skip)
    return manifest


def _remedy(rel: str) -> str:
    if rel.startswith(layout.OBJECTS_DIR + "/"):
        return " (restore it, or measure the table again with --overwrite)"
    return ""
