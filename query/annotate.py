"""User annotations (class, score, review flag, ...) joined to a table's objects by label id.

Each `annotate` call writes one new *version*: a Parquet file
`annotations/image=IMG/label_image=LBL/version=N/part-<run>.parquet` holding `label_id` and the user's
columns, listed in the table's entry under `annotations` by a commit to the store's log (`schemas.log`).
Measurements are never rewritten. The `objects` view joins the latest version (its columns appear beside the
measurements, NULL for objects it does not mention); the `annotations` view holds every version with a
`version` column, so a re-annotation never loses the previous one. Annotators running at once each get a
version of their own: the number is taken when the commit is made (the file moves to its folder if another
annotator took the number first).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..schemas import integrity, log
from ..schemas import store as layout
from ..schemas.atomic import atomic_write
from ..schemas.errors import StoreError, UsageError

ANNOTATIONS_DIR = "annotations"
RESERVED = ("image", "label_image", "label_id", "version")


def annotation_dir(image: str, label_image: str, version: int) -> str:
    return (f"{ANNOTATIONS_DIR}/image={layout.partition_value(image)}/"
            f"label_image={layout.partition_value(label_image)}/version={version}")


def read_source(path: Path, key: str) -> pa.Table:
    """The annotation rows of a CSV or Parquet file, `key` renamed to label_id (UBIGINT)."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    con = duckdb.connect()
    reader = "read_parquet" if path.suffix.lower() == ".parquet" else "read_csv"
    try:
        rel = con.sql(f"SELECT * FROM {reader}('{str(path).replace(chr(39), chr(39) * 2)}')")
    except duckdb.Error as exc:
        raise UsageError(f"{path}: cannot read ({' '.join(str(exc).split())})") from None
    if key not in rel.columns:
        raise UsageError(f"{path}: no column {key!r} (columns: {', '.join(rel.columns)}); pass --key COLUMN")
    try:
        ids = con.sql(f'SELECT "{key}"::UBIGINT AS label_id FROM rel').to_arrow_table()
    except duckdb.Error:
        raise UsageError(f"{path}: column {key!r} must hold whole numbers >= 0 (label ids)") from None
    table = rel.to_arrow_table()
    table = table.set_column(table.column_names.index(key), "label_id", ids.column(0))
    return table


def annotate(store: Path, image: str, label_image: str, rows: pa.Table, *, source: str,
             known_ids: np.ndarray, measured: list[str], drop_unknown: bool = False) -> dict:
    """Add a new annotation version to one table of `store`; returns its manifest record (with the number
    of rows dropped for unknown label ids)."""
    names = [c for c in rows.column_names if c != "label_id"]
    if not names:
        raise UsageError(f"{source}: no annotation columns besides the key")
    for c in names:
        if c in RESERVED or c in measured:
            raise UsageError(f"{source}: column {c!r} would hide a {'key' if c in RESERVED else 'measurement'} "
                             "column of the same name; rename it")
        if c != layout.identifier(c):
            raise UsageError(f"{source}: column {c!r} is not an identifier (letters, digits, _); rename it "
                             f"(for example {layout.identifier(c)!r})")
    ids = rows.column("label_id").to_numpy(zero_copy_only=False)
    if rows.column("label_id").null_count:
        raise UsageError(f"{source}: {rows.column('label_id').null_count} rows have no label id")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise UsageError(f"{source}: label ids given more than once: {', '.join(map(str, dup[:5]))}"
                         f"{' ...' if len(dup) > 5 else ''} ({len(dup)} ids)")
    unknown = ~np.isin(ids, known_ids)
    n_unknown = int(unknown.sum())
    if n_unknown and not drop_unknown:
        first = ", ".join(map(str, np.sort(ids[unknown])[:5]))
        raise UsageError(f"{source}: {n_unknown} of {len(ids)} rows name label ids not in {image}/{label_image} "
                         f"(first: {first}); fix them, or pass --drop-unknown to store the others")
    if n_unknown:
        rows = rows.filter(pa.array(~unknown))
    snap = log.snapshot(store)
    entry = snap.entry(image, label_image)
    if entry is None:
        raise StoreError(f"{store}: no table {image}/{label_image}")
    integrity.check_entry_files(snap, entry)  # never a new version on a table with a damaged file
    measured_files = entry["files"]
    name = f"part-{uuid.uuid4().hex[:12]}.parquet"
    where = {"dir": annotation_dir(image, label_image, _next_version(entry))}
    with atomic_write(store / where["dir"] / name, parents=True) as tmp:
        pq.write_table(rows, tmp, compression="zstd")
    record = {
        "dir": where["dir"], "files": [name], "source": source, "rows": rows.num_rows, "dropped_unknown": n_unknown,
        "columns": [{"name": c, "dtype": str(rows.schema.field(c).type)} for c in names], "created": layout.now(),
    }

    def decide(state: log.Snapshot) -> list[dict]:
        current = state.entry(image, label_image)
        if current is None or current["files"] != measured_files:
            raise StoreError(f"{store}: {image}/{label_image} was measured again or removed while it was being "
                             "annotated; run the annotation again")
        version = _next_version(current)
        wanted = annotation_dir(image, label_image, version)
        if wanted != where["dir"]:  # another annotator took the number: the file moves to the next one
            # (not os.renames: its makedirs fails when another annotator creates the folder at the same moment,
            # and it removes the old folder when empty, under an annotator about to write there)
            (store / wanted).mkdir(parents=True, exist_ok=True)
            os.rename(store / where["dir"] / name, store / wanted / name)
            where["dir"] = wanted
        return [{"annotate": {"image": image, "label_image": label_image,
                              "record": {"version": version, **record, "dir": wanted}}}]

    try:
        snap = log.commit(store, "annotate", decide)
    except BaseException:
        (store / where["dir"] / name).unlink(missing_ok=True)
        raise
    layout.remove_stale_caches(store, snap.version)  # the session caches of earlier states
    return max(snap.entry(image, label_image)["annotations"], key=lambda v: v["version"])


def _next_version(entry: dict) -> int:
    return max((v["version"] for v in entry.get("annotations") or []), default=0) + 1


def known_ids(store: Path, entry: dict) -> np.ndarray:
    """The label ids of a table, read from its Parquet files (checked first: a damaged file is a StoreError
    naming it, not a disagreement with the annotations)."""
    integrity.check_entry_files(log.snapshot(store), entry)
    paths = [store / entry["dir"] / name for name in entry["files"]]
    try:
        ids = pq.read_table(paths, columns=["label_id"]).column("label_id")
    except (OSError, pa.ArrowInvalid) as exc:
        raise StoreError(f"{store}: {entry['dir']}: damaged Parquet file ({' '.join(str(exc).split())})") from None
    return ids.to_numpy()
