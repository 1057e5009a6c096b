"""Benchmark: the OMERO.tables export of a large table against writing the same rows with PyTables' own
append path.

Generates the deterministic store of `benchmarks/bench_query.py` (default 1,000,000 rows x 200 columns), then
times, each `--repeat` times (median):
- cellar: `query.open(store).export("omero-h5", out)` end to end: the Parquet store read in row batches by
  DuckDB, converted to OMERO's column types, appended with PyTables' table API, with ColumnTypes,
  ColumnDescriptions and attributes written;
- PyTables: the same rows already in memory as one structured array (OMERO's field types), appended to a
  PyTables table in blocks of the same size (`Table.append`), then flushed: the writing alone, with no
  reading or conversion.

Run: `python benchmarks/bench_export.py` (or `--rows 100000` for a quick run).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_query import generate, write_store  # noqa: E402


def pytables_append(rec: np.ndarray, out: Path, block: int) -> None:
    import tables

    with tables.open_file(out, "w", title="OMERO HDF Measurement Storage") as h5:
        group = h5.create_group("/", "OME")
        t = h5.create_table(group, "Measurements", rec.dtype, expectedrows=len(rec))
        for start in range(0, len(rec), block):
            t.append(rec[start:start + block])
        t.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--columns", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import pyarrow as pa

    from cellar import query
    from cellar.query.export import BATCH_ROWS

    work = Path(tempfile.mkdtemp(prefix="cellar-xbench-"))
    try:
        table, _ = generate(args.rows, args.columns)
        store = write_store(table, work / "s.cellar", 131072)
        dtype = np.dtype([(f.name, np.int64 if pa.types.is_integer(f.type) else np.float64) for f in table.schema])
        rec = np.empty(table.num_rows, dtype)
        for name in dtype.names:
            rec[name] = table.column(name).to_numpy()
        del table
        times: dict[str, list[float]] = {"cellar export omero-h5 (from the store)": [],
                                         "PyTables Table.append (rows in memory)": []}
        for i in range(args.repeat):
            t = time.perf_counter()
            query.open(store).export("omero-h5", str(work / "cellar.h5"), overwrite=True)
            times["cellar export omero-h5 (from the store)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            pytables_append(rec, work / "pytables.h5", BATCH_ROWS)
            times["PyTables Table.append (rows in memory)"].append(time.perf_counter() - t)
            print(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        size = (work / "cellar.h5").stat().st_size / 2**30
        print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
              f"{args.rows:,} rows x {args.columns} columns ({size:.2f} GiB HDF5); median of {args.repeat}\n")
        print("| writer | time (s) | rows/s |")
        print("|---|---|---|")
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"| {k} | {v:.2f} | {args.rows / v:,.0f} |")
        a, b = med.values()
        print(f"\ncellar's export takes {a / b:.2f}x the time of PyTables' append alone")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
