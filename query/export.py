"""Exports of a query's rows into the formats other tools read, streamed in row batches (DuckDB hands the
rows over as Arrow record batches, so a large export never holds the whole table in memory; AnnData is the
exception, being an in-memory format).

- `omero-h5`: OMERO.tables' own HDF5 layout (see ../shared/FORMATS.md), appended with PyTables' table API:
  group `/OME`, table `Measurements`, arrays `ColumnTypes` and `ColumnDescriptions`, attributes `__version`
  = '2' and `__initialized`, the store's provenance as further attributes. Integers become LongColumn
  (int64), floats DoubleColumn, booleans BoolColumn, text StringColumn (fixed width: the longest value);
  `image_id` adds an ImageColumn `Image`, `roi_column` maps a column of ROI ids to a RoiColumn `Roi`.
  Names are made identifier-safe (for `getWhereList` conditions); each description carries the unit and,
  when renamed, the original name.
- `csv`: comma-separated with a header row, after `#` comment lines giving the provenance and every
  column's unit (read it with `comment='#'` in DuckDB, pandas or polars).
- `parquet`: one file; units and descriptions as field metadata, provenance as file metadata.
- `anndata` (`.h5ad` or `.zarr`; `pip install cellar[anndata]`): numeric measurements in `X` (names and
  units in `var`), keys and text columns in `obs`, centroids (x, y) in `obsm["spatial"]`, and
  `uns["spatialdata_attrs"]` linking it to the label image.
- `ngff-properties`: columns written into the label image's `image-label.properties`, at most `max_cells`
  values (it is JSON).

Every file is written under a temporary name beside OUTPUT and renamed into place (`schemas.atomic`), so a
failure midway (disk full, permissions) leaves no partial file at OUTPUT.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from ..schemas import lazy
from ..schemas import store as layout
from ..schemas.atomic import atomic_write
from ..schemas.errors import CellarError, UsageError
from .formats import FORMATS, MAX_CELLS, MAX_STRING
from .sql import quote

if TYPE_CHECKING:
    from .api import Query

# loaded by the formats and routes that need them: a CSV export of rows polars finds runs without DuckDB
duckdb = lazy.module("duckdb")
np = lazy.module("numpy")
pa = lazy.module("pyarrow")

BATCH_ROWS = 65_536
# Whole rows come from the row files with numpy and pyarrow, which cost a process that has not loaded them
# 110 ms (`cellar export`): about what polars takes to decode whole rows of a 100,000-row table from its
# Parquet file. Such a process takes a CSV export's rows from the row files only where the query covers more
# rows than this (benchmarks/bench_query.py --measured, `cellar export` of one table against polars).
ROW_FILES_UNLOADED = 150_000
OMERO_TITLE = "OMERO HDF Measurement Storage"
_INT64_MAX = 2**63 - 1


def _provenance(q: Query) -> dict[str, str]:
    tables = [t for _, t in q._pruned().objects.tables]  # the tables the query reads (its filters' images)
    return {
        "cellar_version": str(tables[0].get("cellar_version", "")) if tables else "",
        "source": ", ".join(sorted({str(t.get("source", {}).get("url", "")) for t in tables})),
        "tables": ", ".join(f"{t['image']}/{t['label_image']}" for t in tables),
        "where": " AND ".join(q.filters) or "",
        "exported": layout.now(),
    }


def _reader(q: Query) -> pa.RecordBatchReader:
    """The query's rows in batches: from the row files where the query's rule takes them from there (a filter's
    or top-k's whole rows, at most `api.ROW_FILE_SHARE` of the rows: in memory at once, as small as that), else
    streamed from DuckDB (`_batches`)."""
    return _batches(q, q.from_row_files())


def _batches(q: Query, fetched: pa.Table | None) -> pa.RecordBatchReader:
    """The rows `fetched` from the row files in batches, or where None, the query's rows streamed from DuckDB.
    An error DuckDB meets while the batches stream (a Parquet file whose data do not decode) reaches pyarrow's
    reader as an OSError: it is the store's error, not one writing the output."""
    if fetched is not None:
        return pa.RecordBatchReader.from_batches(fetched.schema, fetched.to_batches(max_chunksize=BATCH_ROWS))
    source = q.relation().arrow(batch_size=BATCH_ROWS)

    def batches():
        try:
            yield from source
        except OSError as exc:
            raise q.objects.error(exc) from None

    return pa.RecordBatchReader.from_batches(source.schema, batches())


def export(q: Query, fmt: str, output: str | Path, *, overwrite: bool = False, image_id: int | None = None,
           roi_column: str | None = None, max_string: int = MAX_STRING, max_cells: int = MAX_CELLS,
           image_url: str | None = None) -> dict[str, Any]:
    """Write the query's rows to `output` as `fmt` (one of FORMATS); returns a summary (rows, columns,
    renamed columns, ...)."""
    if fmt not in FORMATS:
        raise UsageError(f"--to {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "ngff-properties":
        return _ngff_properties(q, max_cells, image_url)
    output = Path(output)
    writer = {"omero-h5": lambda p: _omero(q, p, image_id, roi_column, max_string),
              "csv": lambda p: _csv(q, p), "parquet": lambda p: _parquet(q, p),
              "anndata": lambda p: _anndata(q, p)}[fmt]
    if fmt == "anndata" and output.suffix not in (".h5ad", ".zarr"):
        raise UsageError(f"{output}: an AnnData export ends in .h5ad or .zarr")
    if fmt == "anndata":
        try:
            import anndata  # noqa: F401
        except ImportError:
            raise UsageError("the anndata export needs the anndata package: pip install 'cellar[anndata]'") from None
    try:
        with atomic_write(output, overwrite=overwrite) as tmp:  # a file, or a directory (AnnData's .zarr)
            summary = writer(tmp)
    except duckdb.Error as exc:  # met while the rows stream in: a Parquet file whose data do not decode
        raise q.objects.error(exc) from None
    except OSError as exc:
        raise UsageError(f"{output}: cannot write ({exc.strerror or exc})") from None
    return summary


# -- OMERO.tables ---------------------------------------------------------------------------------------
def omero_names(names: list[str]) -> dict[str, str]:
    """Column name -> identifier-safe, unique OMERO column name (names starting with '__' are reserved)."""
    safe = layout.unique_identifiers([n.lstrip("_") or "c" for n in names])
    return dict(zip(names, safe))


def _omero(q: Query, path: Path, image_id: int | None, roi_column: str | None, max_string: int) -> dict:
    import tables

    rel = q.relation()
    schema = {name: str(t) for name, t in zip(rel.columns, rel.types)}
    if roi_column is not None:
        q.objects.check_columns([roi_column], "--roi-column")
        if roi_column not in schema:
            raise UsageError(f"--roi-column {roi_column}: not among the exported columns")
    if image_id is not None and image_id < 0:
        raise UsageError(f"--image-id {image_id}: expected an OMERO image id >= 0")
    text = [c for c, t in schema.items() if t.startswith("VARCHAR")]
    widths = {}
    if text:

        row = q.objects.fetch(f"SELECT {', '.join(f'max(strlen({quote(c)}))' for c in text)} FROM ({q.to_sql()})")[0]
        for c, w in zip(text, row):
            if w is not None and w > max_string:
                raise UsageError(f"column {c!r} holds text of {w} bytes, longer than --max-string {max_string}; "
                                 "raise it or leave the column out (--columns)")
            widths[c] = max(1, int(w or 1))
    names = omero_names(list(schema))
    fields, kinds, descriptions = [], [], []
    if image_id is not None:
        fields.append(("Image", np.int64))
        kinds.append("ImageColumn")
        descriptions.append("OMERO image id")
    for c, t in schema.items():
        info = q.objects.column_info(c) if c in q.objects.column_names else {"unit": "", "description": ""}
        if c == roi_column:
            kind, dtype = "RoiColumn", np.int64
        elif t.startswith(("VARCHAR",)):
            kind, dtype = "StringColumn", f"S{widths[c]}"
        elif t == "BOOLEAN":
            kind, dtype = "BoolColumn", np.bool_
        elif t in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"):
            kind, dtype = "LongColumn", np.int64
        elif t in ("FLOAT", "DOUBLE") or t.startswith("DECIMAL"):
            kind, dtype = "DoubleColumn", np.float64
        else:
            raise UsageError(f"column {c!r} has type {t}, which OMERO.tables cannot hold; leave it out (--columns)")
        name = "Roi" if c == roi_column else names[c]
        fields.append((name, dtype))
        kinds.append(kind)
        text_parts = [f"unit: {info['unit']}" if info["unit"] else "", info["description"],
                      f"cellar column: {c}" if name != c else ""]
        descriptions.append("; ".join(p for p in text_parts if p))
    dtype = np.dtype(fields)
    n = 0
    with tables.open_file(path, "w", title=OMERO_TITLE) as h5:
        group = h5.create_group("/", "OME")
        table = h5.create_table(group, "Measurements", dtype, expectedrows=max(1, q.count()))
        h5.create_array(group, "ColumnTypes", [f"::omero::grid::{k}".encode() for k in kinds])
        h5.create_array(group, "ColumnDescriptions", [d.encode() for d in descriptions])
        for batch in _reader(q):
            rec = np.zeros(batch.num_rows, dtype)
            if image_id is not None:
                rec["Image"] = image_id
            for c in schema:
                col = batch.column(c)
                name = "Roi" if c == roi_column else names[c]
                kind = dtype[name]
                if kind.kind == "S":  # UTF-8 bytes, NULL as empty
                    rec[name] = col.fill_null("").cast(pa.binary()).to_numpy(zero_copy_only=False).astype(kind)
                elif kind.kind == "b":
                    rec[name] = col.fill_null(False).to_numpy(zero_copy_only=False)
                elif kind.kind == "i":
                    values = col.to_numpy(zero_copy_only=False)
                    if col.null_count:
                        raise UsageError(f"column {c!r} has missing values; OMERO's LongColumn cannot hold them")
                    if values.dtype == np.uint64 and (values > _INT64_MAX).any():
                        raise UsageError(f"column {c!r} holds values above 2^63-1, beyond OMERO's LongColumn")
                    rec[name] = values.astype(np.int64)
                else:  # doubles: NULL becomes NaN, non-finite values are kept
                    rec[name] = col.cast(pa.float64()).fill_null(float("nan")).to_numpy(zero_copy_only=False)
            table.append(rec)
            n += batch.num_rows
        table.attrs["__version"] = "2"
        table.attrs["__initialized"] = time.time()
        for key, value in _provenance(q).items():
            table.attrs[key if key.startswith("cellar") else f"cellar_{key}"] = value
        table.flush()
    renamed = {c: v for c, v in names.items() if v != c and c != roi_column}
    return {"rows": n, "columns": len(fields), "renamed": renamed}


# -- CSV and Parquet ---------------------------------------------------------------------------------------
def _units(q: Query, names: list[str]) -> list[str]:
    return [q.objects.column_info(c)["unit"] if c in q.objects.column_names else "" for c in names]


def _csv(q: Query, path: Path) -> dict:
    """Written by polars' CSV writer (1.5-2.5x faster than pyarrow's on measurements), the same text whichever way the
    rows come: whole rows from the row files (`Query.from_row_files`), else streamed by polars' engine where it
    runs the query (`Query.polars_frame`, written by `sink_csv` as it reads), else DuckDB's Arrow batches."""
    fetched = q.from_row_files() if _row_files_pay(q) else None
    frame = q.polars_frame() if fetched is None else None
    reader = _batches(q, fetched) if fetched is not None or frame is None else None
    names = reader.schema.names if reader is not None else frame.collect_schema().names()
    with open(path, "wb") as fh:
        prov = _provenance(q)
        fh.write(("# cellar export: " + "; ".join(f"{k}={v}" for k, v in prov.items() if v) + "\n").encode())
        fh.write(("# units: " + ", ".join(f"{c}={u}" for c, u in zip(names, _units(q, names)) if u) + "\n").encode())
        if reader is None:
            out = _Output(fh)
            try:
                q.run_polars(lambda: frame.sink_csv(out))
            except CellarError:
                if out.failed is None:
                    raise
                raise out.failed from None  # writing failed (disk full): not the store's error
            return {"rows": q.count(), "columns": len(names), "renamed": {}}
        n, header = 0, True
        for batch in reader:
            if batch.num_rows or header:
                pl.from_arrow(batch).write_csv(fh, include_header=header)
                header = False
            n += batch.num_rows
        if header:  # no batch at all: the header alone
            pl.from_arrow(reader.schema.empty_table()).write_csv(fh)
    return {"rows": n, "columns": len(names), "renamed": {}}


def _row_files_pay(q: Query) -> bool:
    """Whether a CSV export asks the row files for whole rows (`Query.from_row_files`): where numpy and pyarrow
    are loaded, or the query covers more than ROW_FILES_UNLOADED rows (the log counts them)."""
    return "numpy" in sys.modules and "pyarrow" in sys.modules or q.covered_rows() > ROW_FILES_UNLOADED


class _Output:
    """The output file as polars writes to it, keeping the error of a write that failed (a full disk): polars
    raises it as the OSError it raises for a store file it cannot read, and `_csv` tells the two apart."""

    def __init__(self, file):
        self.file, self.failed = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.failed = exc
            raise


def _parquet(q: Query, path: Path) -> dict:
    import pyarrow.parquet as pq

    reader = _reader(q)
    names = reader.schema.names
    fields = []
    for f, unit in zip(reader.schema, _units(q, names)):
        info = q.objects.column_info(f.name) if f.name in q.objects.column_names else {"description": ""}
        fields.append(f.with_metadata({"unit": unit, "description": info["description"]}))
    schema = pa.schema(fields, metadata={"cellar": json.dumps(_provenance(q))})
    n = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in reader:
            writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))
            n += batch.num_rows
    return {"rows": n, "columns": len(names), "renamed": {}}


# -- AnnData ---------------------------------------------------------------------------------------------------
def _anndata(q: Query, path: Path) -> dict:
    import anndata as ad
    import pandas as pd

    table = q.to_arrow()
    names = table.column_names
    tables = {(t["image"], t["label_image"]) for _, t in q.objects.tables}
    keys = [c for c in ("image", "label_image", "label_id") if c in names]
    numeric = [c for c, f in zip(names, table.schema) if c not in keys
               and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]
    other = [c for c in names if c not in keys and c not in numeric]
    x = np.column_stack([table.column(c).cast(pa.float64()).fill_null(float("nan")).to_numpy(zero_copy_only=False)
                         for c in numeric]) if numeric else np.zeros((table.num_rows, 0))
    obs = pd.DataFrame({c: table.column(c).to_pandas() for c in [*keys, *other]})
    if "label_image" in obs:
        obs["region"] = pd.Categorical(obs["label_image"])
    if "label_id" in obs:
        obs["instance_id"] = obs["label_id"].astype(np.int64)
    for c in other:
        if obs[c].dtype == object:
            obs[c] = pd.Categorical(obs[c])
    obs.index = [f"{i}/{lbl}/{k}" for i, lbl, k in zip(obs.get("image", [""] * len(obs)),
                                                      obs.get("label_image", [""] * len(obs)),
                                                      obs.get("label_id", range(len(obs))))]
    units = _units(q, numeric)
    var = pd.DataFrame({"unit": units, "description": [q.objects.column_info(c)["description"] for c in numeric]},
                       index=numeric)
    adata = ad.AnnData(X=x, obs=obs, var=var)
    xy = [c for c in ("centroid_x_um", "centroid_y_um") if c in names] or [c for c in ("centroid_x", "centroid_y")
                                                                           if c in names]
    if len(xy) == 2:
        adata.obsm["spatial"] = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in xy])
    regions = sorted({lbl for _, lbl in tables})
    adata.uns["spatialdata_attrs"] = {"region": regions[0] if len(regions) == 1 else regions,
                                      "region_key": "region", "instance_key": "instance_id"}
    adata.uns["cellar"] = {**_provenance(q), "spatial_columns": xy}
    if path.suffix == ".zarr":
        # Zarr v2, which every anndata and zarr reader reads (v3 AnnData needs anndata >= 0.11, and zarr warns
        # that its consolidated metadata is outside the v3 spec); anndata's notice that its default will change
        # is about its defaults, not this file.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Writing zarr v2 data will no longer be the default",
                                    category=UserWarning)
            with ad.settings.override(zarr_write_format=2):
                adata.write_zarr(path)
    else:
        adata.write_h5ad(path)
    return {"rows": table.num_rows, "columns": len(numeric), "renamed": {}}


# -- NGFF label properties -----------------------------------------------------------------------------------------
def _ngff_properties(q: Query, max_cells: int, image_url: str | None) -> dict:
    # imported here: they load zarr and the NGFF models (450 ms), which no other format needs, nor any command
    # that only builds the CLI's parsers (they name this module's FORMATS)
    from ..ngff import labels as ngff_labels
    from . import pathviewer

    _, entry = q.objects.table(None, None) if len(q.objects.tables) == 1 else (None, None)
    if entry is None:
        raise UsageError("ngff-properties writes into one label image: choose one table with --image and --labels")
    cols = [c for c in (q.columns or q.objects.column_names) if c not in ("image", "label_image", "label_id")]
    n = q.count()
    if n * len(cols) > max_cells:
        raise UsageError(f"{n} objects x {len(cols)} columns = {n * len(cols):,} values, more than --max-cells "
                         f"{max_cells:,} for JSON metadata; choose fewer columns (--columns) or objects (--where)")
    data = q.select("label_id", *cols).order_by("label_id").to_arrow().to_pylist()
    props = []
    for row in data:
        item = {"label-value": int(row.pop("label_id"))}
        for k, v in row.items():
            item[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        props.append(item)
    image = pathviewer.source_image(entry, image_url)

    target = ngff_labels.set_image_label(image, entry["label_image"], properties=props)
    return {"rows": len(props), "columns": len(cols), "renamed": {}, "target": str(target)}
