"""Benchmark: queries on a large object table, cellar (cold and warm) against polars and PyTables.

Generates a deterministic store of `--rows` objects (default 5,000,000) x `--columns` columns (default 200): the
keys and centroids a measured slide has (a 200,000 x 200,000 px slide, 0.25 um pixels), `area`, a phenotype
`cluster` code (0..15) and float64 intensity statistics (`intensity_<stat>__c<k>`) for the rest, in the
store's spatial order, written by cellar's own store writer (one Parquet file, zstd, `--row-group` rows per
row group). The same rows go into an HDF5 file laid out as OMERO.tables stores them (`/OME/Measurements`, a
PyTables table, one field per column, with `ColumnTypes` / `ColumnDescriptions`).

Queries, each timed `--repeat` times (median):
1. filter on two columns -> label ids (about 1% of the rows);
2. spatial box -> label ids (about 1% of the slide);
3. group-by `cluster` with 10 averages;
4. filter -> all columns of about 0.1% of the rows;
5. top-100 objects by a column.

Engines: cellar cold from the Parquet files (`query.open(store, cache=False)` afresh for every run:
manifest, then the query on the Parquet file), polars (`pl.scan_parquet` on the same file), cellar warm from
RAM (`query.open(store, cache=True)` once, the store read into Arrow memory), then, after `cellar cache`
writes the store's on-disk session cache: cellar cold from the cache (`query.open(store)` afresh for every
run: the files memory-mapped anew), the same after `cellar cache --rows` adds the row-major copy, and warm
from that cache (opened once); and PyTables (`Table.get_where_list` +
`read_coordinates`; reading the table in blocks where it has no query call, for the group-by and top-k).
"Cold" means a new engine state each run: the operating system's page cache is warm for every engine alike.
Every file is flushed to disk (`os.sync()`) after it is written; before an engine is timed, the other
engines' files are dropped from the page cache (`evict`: together they exceed this machine's memory) and
each query runs once untimed, bringing the engine's own pages in. The warm engines are closed
(`Objects.close()`) before the next engine runs.

Run: `python benchmarks/bench_query.py` (the issue's 5M x 200), or `--rows 1000000` for a quicker run;
`--row-groups 32768,131072,524288` times the cold queries at several row-group sizes instead (the choice of
the store's default).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STATS = ("mean", "std", "min", "max", "median", "q05", "q95", "sum")
SLIDE_PX = 200_000
PIXEL_UM = 0.25


def generate(n_rows: int, n_cols: int, seed: int = 0) -> tuple[pa.Table, dict]:
    """The table in the store's spatial order, and the query parameters (thresholds at quantiles)."""
    from schemas.store import spatial_order

    rng = np.random.default_rng(seed)
    cy = rng.uniform(0, SLIDE_PX, n_rows)
    cx = rng.uniform(0, SLIDE_PX, n_rows)
    order = spatial_order(cy, cx)
    cy, cx = cy[order], cx[order]
    cols: dict[str, np.ndarray] = {
        "label_id": (order + 1).astype(np.uint64),
        "centroid_y": cy, "centroid_x": cx, "centroid_y_um": cy * PIXEL_UM, "centroid_x_um": cx * PIXEL_UM,
        "area": np.round(rng.lognormal(5.5, 0.4, n_rows)), "cluster": rng.integers(0, 16, n_rows).astype(np.int64),
    }
    cols["area_um2"] = cols["area"] * PIXEL_UM**2
    k = 0
    while len(cols) < n_cols:
        stat, ch = STATS[k % len(STATS)], k // len(STATS)
        cols[f"intensity_{stat}__c{ch:02d}"] = rng.gamma(2.0, 400.0, n_rows)
        k += 1
    params = {
        "area_hi": float(np.quantile(cols["area"], 0.9)),
        "area_top": float(np.quantile(cols["area"], 0.99)),
        "mean_hi": float(np.quantile(cols["intensity_mean__c03"], 0.9)),
        "box": (60_000.0, 80_000.0, 80_000.0, 100_000.0),  # x0, y0, x1, y1 in pixels: 1% of the slide
        "averages": [c for c in cols if c.startswith("intensity_mean__")][:10],
    }
    fields = [pa.field(name, pa.from_numpy_dtype(v.dtype), metadata={"unit": "", "description": name})
              for name, v in cols.items()]
    table = pa.Table.from_arrays([pa.array(v) for v in cols.values()], schema=pa.schema(fields))
    return table, params


def write_store(table: pa.Table, out: Path, row_group: int) -> Path:
    from measure import store_write

    store_write.ROW_GROUP_SIZE = row_group
    entry = {"image": "slide", "label_image": "cells", "n_objects": table.num_rows, "channels": [],
             "columns": [{"name": f.name, "dtype": str(f.type), "unit": "", "description": f.name}
                         for f in table.schema]}
    store_write.write_table(out, entry, table, overwrite=True)
    os.sync()  # no engine is timed while the kernel still writes back what an earlier step wrote
    return out


def write_omero_h5(parquet: Path, out: Path, block: int = 131072) -> None:
    """The rows as OMERO.tables stores them (PyTables table /OME/Measurements; see ../shared/FORMATS.md)."""
    import tables

    pf = pq.ParquetFile(parquet)
    # OMERO has 64-bit signed integers (LongColumn) and doubles (DoubleColumn)
    dtype = np.dtype([(f.name, np.int64 if pa.types.is_integer(f.type) else np.float64) for f in pf.schema_arrow])
    kinds = [b"::omero::grid::LongColumn" if dtype[i].kind in "iu" else b"::omero::grid::DoubleColumn"
             for i in range(len(dtype))]
    with tables.open_file(out, "w", title="OMERO HDF Measurement Storage") as h5:
        group = h5.create_group("/", "OME")
        tab = h5.create_table(group, "Measurements", dtype, expectedrows=pf.metadata.num_rows)
        h5.create_array(group, "ColumnTypes", kinds)
        h5.create_array(group, "ColumnDescriptions", [b""] * len(kinds))
        tab.attrs["__version"] = "2"
        tab.attrs["__initialized"] = time.time()
        for batch in pf.iter_batches(batch_size=block):
            rec = np.empty(batch.num_rows, dtype)
            for name in dtype.names:
                rec[name] = batch.column(name).to_numpy()
            tab.append(rec)
        tab.flush()
    os.sync()


def _sql(p: dict) -> dict[str, str]:
    x0, y0, x1, y1 = p["box"]
    avgs = ", ".join(f'avg("{c}") AS "{c}"' for c in p["averages"])
    return {
        "filter -> ids": f"area > {p['area_hi']} AND intensity_mean__c03 > {p['mean_hi']}",
        "box -> ids": (x0, y0, x1, y1),
        "group-by, 10 averages": f"SELECT cluster, {avgs} FROM objects GROUP BY cluster",
        "filter -> all columns": f"area > {p['area_top']} AND intensity_mean__c03 > {p['mean_hi']}",
        "top-100": "intensity_max__c05",
    }


def cellar_queries(objs, p: dict) -> dict:
    q = _sql(p)
    return {
        "filter -> ids": lambda: len(objs.where(q["filter -> ids"]).label_ids()),
        "box -> ids": lambda: len(objs.within(*q["box -> ids"], units="px").label_ids()),
        "group-by, 10 averages": lambda: len(objs.sql(q["group-by, 10 averages"]).fetchall()),
        "filter -> all columns": lambda: objs.where(q["filter -> all columns"]).to_arrow().num_rows,
        "top-100": lambda: objs.order_by(q["top-100"], descending=True).limit(100).to_arrow().num_rows,
    }


def polars_queries(parquet: Path, p: dict) -> dict:
    import polars as pl

    x0, y0, x1, y1 = p["box"]
    col = pl.col

    def lf():
        return pl.scan_parquet(parquet)

    return {
        "filter -> ids": lambda: lf().filter((col("area") > p["area_hi"]) & (col("intensity_mean__c03") > p["mean_hi"]))
        .select("label_id").collect().height,
        "box -> ids": lambda: lf().filter(col("centroid_x").is_between(x0, x1) & col("centroid_y").is_between(y0, y1))
        .select("label_id").collect().height,
        "group-by, 10 averages": lambda: lf().group_by("cluster").agg([col(c).mean() for c in p["averages"]])
        .collect().height,
        "filter -> all columns": lambda: lf().filter((col("area") > p["area_top"]) & (col("intensity_mean__c03") > p["mean_hi"]))
        .collect().height,
        "top-100": lambda: lf().top_k(100, by="intensity_max__c05").collect().height,
    }


def pytables_queries(h5: Path, p: dict) -> dict:
    import tables

    x0, y0, x1, y1 = p["box"]

    def table():
        fh = tables.open_file(h5, "r")
        return fh, fh.root.OME.Measurements

    def where_ids(cond: str) -> int:
        fh, t = table()
        with fh:
            return len(t.read_coordinates(t.get_where_list(cond), field="label_id"))

    def where_rows(cond: str) -> int:
        fh, t = table()
        with fh:
            return len(t.read_coordinates(t.get_where_list(cond)))

    def group_by() -> int:
        fh, t = table()
        with fh:
            sums = np.zeros((16, len(p["averages"])))
            counts = np.zeros(16)
            step = t.chunkshape[0] * 64
            for start in range(0, t.nrows, step):
                rows = t.read(start, min(start + step, t.nrows))
                counts += np.bincount(rows["cluster"], minlength=16)
                for j, c in enumerate(p["averages"]):
                    sums[:, j] += np.bincount(rows["cluster"], weights=rows[c], minlength=16)
            return len(sums / counts[:, None])

    def top_k() -> int:
        fh, t = table()
        with fh:
            values = t.col("intensity_max__c05")
            best = np.argpartition(-values, 100)[:100]
            rows = t.read_coordinates(np.sort(best))
            return len(rows[np.argsort(-rows["intensity_max__c05"])])

    return {
        "filter -> ids": lambda: where_ids(f"(area > {p['area_hi']}) & (intensity_mean__c03 > {p['mean_hi']})"),
        "box -> ids": lambda: where_ids(f"(centroid_x >= {x0}) & (centroid_x <= {x1}) & (centroid_y >= {y0}) & (centroid_y <= {y1})"),
        "group-by, 10 averages": group_by,
        "filter -> all columns": lambda: where_rows(f"(area > {p['area_top']}) & (intensity_mean__c03 > {p['mean_hi']})"),
        "top-100": top_k,
    }


def warm_queries(results: dict, key: str, opener, store: Path, params: dict, counts: dict, repeat: int) -> float:
    """Time every query on one `opener(store, cache=True)`; returns the opening time."""
    t = time.perf_counter()
    warm = opener(store, cache=True)
    load = time.perf_counter() - t
    results[key] = {}
    for name, fn in cellar_queries(warm, params).items():
        results[key][name], n = timed(fn, repeat)
        assert n == counts[name], (name, n, counts[name])
    warm.close()  # as a notebook would: the cache's memory goes back to the system for the next engines
    return load


def evict(*paths: Path) -> None:
    """Drop these files' pages (every file under a folder) from the operating system's page cache.

    The benchmark's files (30 GiB at 5M x 200: Parquet, the session cache with its row-major copy, HDF5) do
    not fit in this machine's page cache together, so the engine timed next would find some of its pages
    evicted by whichever files were touched last. Before each engine the others' files are dropped (they are
    on disk: `os.sync()` ran after every write), and `timed` reads the engine's own files once first.
    """
    for root in paths:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn, repeat: int) -> tuple[float, int]:
    """(median seconds, the result's row count) of `repeat` calls, after one untimed call (which brings the
    engine's files into the page cache)."""
    fn()
    times, n = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--columns", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--peer-repeat", type=int, default=3, help="runs of the PyTables queries (median)")
    parser.add_argument("--row-group", type=int, default=None, help="rows per row group (default: the store's)")
    parser.add_argument("--row-groups", help="comma-separated row-group sizes: time cellar cold at each instead")
    parser.add_argument("--workdir", help="keep the data here (default: a temporary directory)")
    args = parser.parse_args()

    import query
    from measure import store_write

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cellar-qbench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    table, params = generate(args.rows, args.columns)
    print(f"data: {table.num_rows:,} rows x {table.num_columns} columns generated in {time.perf_counter() - t:.1f} s",
          flush=True)
    sizes = [int(s) for s in args.row_groups.split(",")] if args.row_groups else [args.row_group or store_write.ROW_GROUP_SIZE]
    names = list(_sql(params))
    results: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for size in sizes:
        store = write_store(table, work / f"store-{size}.cellar", size)
        if not args.row_groups:
            del table  # every engine runs with the same free memory (and page cache)
            gc.collect()
        objs = query.open(store)
        parquet = store / objs.tables[0][1]["dir"] / objs.tables[0][1]["files"][0]
        cache_dir = store / "cache"
        print(f"store ({size:,} rows per row group): {parquet.stat().st_size / 2**30:.2f} GiB", flush=True)
        key = f"cellar cold ({size:,}-row groups)" if args.row_groups else "cellar cold, Parquet"
        results[key] = {}
        for name in names:
            # a fresh query.open (manifest, DuckDB connection, views) for every run
            results[key][name], counts[name] = timed(
                lambda: cellar_queries(query.open(store, cache=False), params)[name](), args.repeat)
        if args.row_groups:
            continue
        results["polars scan_parquet"] = {}
        for name, fn in polars_queries(parquet, params).items():
            results["polars scan_parquet"][name], n = timed(fn, args.repeat)
            assert n == counts[name], (name, n, counts[name])
        load = warm_queries(results, "cellar warm, RAM (session cache)", query.open, store, params, counts, args.repeat)
        print(f"session cache read into RAM in {load:.1f} s", flush=True)
        from query import hotcache

        for rows in (False, True):
            built = hotcache.build(store, rows=rows)
            os.sync()
            what = "with its row-major copy (cellar cache --rows)" if rows else "(cellar cache)"
            print(f"on-disk session cache {what} written in {built['seconds']:.1f} s "
                  f"({built['bytes'] / 2**30:.2f} GiB)", flush=True)
            key = f"cellar cold, mapped cache{' + rows' if rows else ''}"
            results[key] = {}
            evict(parquet)
            for name in names:  # a fresh query.open maps the files anew: no pages of them are mapped yet
                results[key][name], n = timed(lambda: cellar_queries(query.open(store), params)[name](), args.repeat)
                assert n == counts[name], (name, n, counts[name])
        load = warm_queries(results, "cellar warm, mapped cache + rows", query.open, store, params, counts, args.repeat)
        print(f"mapped session cache opened in {load * 1000:.1f} ms", flush=True)
        h5 = work / "omero.h5"
        t = time.perf_counter()
        write_omero_h5(parquet, h5)
        print(f"OMERO.tables HDF5 written in {time.perf_counter() - t:.1f} s ({h5.stat().st_size / 2**30:.2f} GiB)",
              flush=True)
        evict(parquet, cache_dir)
        results["PyTables (OMERO.tables layout)"] = {}
        for name, fn in pytables_queries(h5, params).items():
            results["PyTables (OMERO.tables layout)"][name], n = timed(fn, args.peer_repeat)
            assert n == counts[name], (name, n, counts[name])

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.rows:,} rows x {args.columns} columns; medians of {args.repeat} (PyTables {args.peer_repeat}); "
          f"rows returned: {', '.join(f'{k} {v:,}' for k, v in counts.items())}\n")
    print("| engine | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for engine, row in results.items():
        print(f"| {engine} | " + " | ".join(f"{row[n] * 1000:,.1f} ms" for n in names) + " |")
    for cold in ("cellar cold, Parquet", "cellar cold, mapped cache", "cellar cold, mapped cache + rows"):
        if cold not in results:
            continue
        for peer in ("polars scan_parquet", "PyTables (OMERO.tables layout)"):
            print(f"| {cold} faster than {peer.split(' (')[0]} by | " + " | ".join(
                f"{results[peer][n] / results[cold][n]:.1f}x" for n in names) + " |")
    if not args.workdir:
        shutil.rmtree(work)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
