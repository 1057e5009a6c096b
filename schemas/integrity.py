"""Checks that a store's Parquet files are what its log says, each failure one line naming the file.

Two depths:
- `parquet_file`: the file exists and starts and ends with Parquet's magic bytes (two reads of 4 bytes): a
  missing, empty, truncated or garbage file fails here. Queries run it on the files of the tables they read.
- `check_entry_files`: the table's files' footers also parse and hold the columns the log lists for them.
  Parsing a footer costs up to tens of milliseconds on a wide table (200 columns x 40 row groups: 30 ms), so
  only writers run it, on the table they write to; the query engines compare the columns from the footers
  they parse anyway (see `query.store`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from . import lazy
from . import store as layout
from .errors import StoreError

pa = lazy.module("pyarrow")
pq = lazy.module("pyarrow.parquet")

if TYPE_CHECKING:
    from .log import Snapshot

MAGIC = b"PAR1"
PARTITION_KEYS = ("image", "label_image")  # Hive keys: in the folder names, not in the files
OBJECT_KEYS = (*PARTITION_KEYS, "label_id")  # an object's key: annotations join measurements by it


def files(snap: Snapshot, entries: Iterable[dict] | None = None) -> Iterator[tuple[str, set[str]]]:
    """(store-relative path, expected column names) of the Parquet files of these table entries of `snap`
    (all for None): the tables' files and their annotation versions'."""
    for table in snap.entries() if entries is None else entries:
        names = {c["name"] for c in snap.columns(table)} - set(PARTITION_KEYS)
        yield from ((f"{table['dir']}/{name}", names) for name in table["files"])
        yield from annotation_files(table)


def annotation_files(table: dict) -> Iterator[tuple[str, set[str]]]:
    """(store-relative path, expected column names) of a table's annotation versions' files."""
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
        raise StoreError(f"{store}: the log lists {rel}, which is missing{_remedy(rel)}") from None
    except IsADirectoryError:
        raise StoreError(f"{store}: {rel}: a directory where the log lists a Parquet file") from None
    except OSError as exc:
        raise StoreError(f"{store}: {rel}: cannot read ({exc.strerror or exc})") from None
    footer = int.from_bytes(tail[:4], "little") if len(tail) == 8 else -1
    if head != MAGIC or tail[4:] != MAGIC or not 0 < footer <= size - 12:
        what = "an empty file" if size == 0 else f"{size:,} bytes, {'no' if tail[4:] != MAGIC else 'a damaged'} footer"
        raise StoreError(f"{store}: {rel}: truncated or not a Parquet file ({what}){_remedy(rel)}")
    return path


def column_problem(store: Path, rel: str, found: Iterable[str], expected: set[str]) -> StoreError | None:
    """The error for a file whose columns are not the ones the log lists for it, or None."""
    found = set(found)
    if found == expected:
        return None
    missing, extra = sorted(expected - found), sorted(found - expected)
    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    parts = [f"{len(missing)} missing: {some(missing)}" if missing else "",
             f"{len(extra)} not listed: {some(extra)}" if extra else ""]
    return StoreError(f"{store}: {rel}: not this table's file: its columns are not those the log lists "
                      f"({'; '.join(p for p in parts if p)}){_remedy(rel)}")


def check_entry_files(snap: Snapshot, entry: dict) -> None:
    """Every Parquet file of the table `entry` (see `files`) is there, parses, and holds its columns; a
    StoreError names the first that does not. Writers run it on the table they add to."""
    for rel, expected in files(snap, [entry]):
        path = parquet_file(snap.store, rel)
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowInvalid) as exc:
            text = " ".join(str(exc).split())
            raise StoreError(f"{snap.store}: {rel}: damaged Parquet file ({text}){_remedy(rel)}") from None
        problem = column_problem(snap.store, rel, schema.names, expected)
        if problem is not None:
            raise problem


def _remedy(rel: str) -> str:
    if rel.startswith(layout.OBJECTS_DIR + "/"):
        return " (restore it, or measure the table again with --overwrite)"
    return ""
