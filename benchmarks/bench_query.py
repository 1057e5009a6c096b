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

Engines:
- cellar cold from the Parquet files: `query.open(store, cache=False)` afresh for every run (the log, then
  the query on the Parquet file);
- polars: `pl.scan_parquet` on the same file;
- cellar cold from the on-disk session cache with its row-major copy (`cellar cache --rows`): `query.open`
  afresh for every run, the files memory-mapped anew;
- PyTables: `Table.get_where_list` + `read_coordinates`; reading the table in blocks where it has no query
  call, for the group-by and top-k;
- cellar warm: `query.open(store, cache=True)` once, from RAM (the store read into Arrow memory, before any
  cache file exists) and from the mapped cache;
- and, timed alone before the row-major copy is written, cellar cold from the cache without it.

"Cold" means a new engine state for every run; the operating system's page cache is warm for every engine
alike. Every file is flushed to disk (`os.sync()`) when written. The four cold engines are timed in turns, run
by run, after one untimed run each: this machine's speed drifts by tens of percent over minutes, and taking
turns spreads a slow spell over all of them; the order rotates from run to run, so that no engine always
follows the same one. What they read fits in memory together (the Parquet and HDF5 files and the pages of the
cache files the queries touch); all the files (30 GiB at 5M x 200) do not, so the cache-only phase drops the
Parquet pages first, and the cold engines' phase starts with none of the files in the page cache (`evict`).
The warm engines are closed (`Objects.close()`) when done.

Run: `python benchmarks/bench_query.py` (the issue's 5M x 200), or `--rows 1000000` for a quicker run;
`--row-groups 32768,131072,524288` times the cold queries at several row-group sizes instead (the choice of
the store's default).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import installed  # noqa: I001 - benchmarks/ is the script's folder, first on sys.path

STATS = ("mean", "std", "min", "max", "median", "q05", "q95", "sum")
SLIDE_PX = 200_000
PIXEL_UM = 0.25


def generate(n_rows: int, n_cols: int, seed: int = 0) -> tuple[pa.Table, dict]:
    """The table in the store's spatial order, and the query parameters (thresholds at quantiles)."""
    from cellar.schemas.store import spatial_order

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
    from cellar.measure import store_write

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


def warm_queries(results: dict, key: str, store: Path, params: dict, counts: dict, repeat: int) -> float:
    """Time every query on one `query.open(store, cache=True)`; returns the opening time."""
    from cellar import query

    t = time.perf_counter()
    warm = query.open(store, cache=True)
    load = time.perf_counter() - t
    results[key] = {}
    for name, fn in cellar_queries(warm, params).items():
        results[key][name], n = timed(fn, repeat)
        assert n == counts[name], (name, n, counts[name])
    warm.close()  # as a notebook would: the cache's memory goes back to the system for the next engines
    return load


def evict(*paths: Path) -> None:
    """Drop these files' pages (every file under a folder) from the operating system's page cache (they are
    on disk: `os.sync()` ran after every write), so that the engine timed next has the memory for its own."""
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


def in_turns(engines: dict[str, tuple[dict, int]], names: list[str], counts: dict) -> dict[str, dict[str, float]]:
    """Median seconds of every query on every engine ({engine: (queries, runs)}), the engines taking turns
    run by run (after one untimed run each), so that a slow spell of the machine falls on all of them. The
    order of the turns rotates from run to run: no engine always follows the same one (whose memory and
    caches it would inherit)."""
    times: dict[str, dict[str, list[float]]] = {e: {n: [] for n in names} for e in engines}
    order = list(engines)
    for name in names:
        for engine, (queries, _) in engines.items():
            n = queries[name]()
            assert n == counts.setdefault(name, n), (engine, name, n, counts[name])
        for run in range(max(runs for _, runs in engines.values())):
            for engine in order[run % len(order):] + order[:run % len(order)]:
                queries, runs = engines[engine]
                if run < runs:
                    t = time.perf_counter()
                    queries[name]()
                    times[engine][name].append(time.perf_counter() - t)
    return {e: {n: statistics.median(ts) for n, ts in per.items()} for e, per in times.items()}


def cold_cellar(store: Path, params: dict, **options) -> dict:
    """The queries, each on a fresh `query.open(store, **options)`."""
    from cellar import query

    return {name: (lambda name=name: cellar_queries(query.open(store, **options), params)[name]())
            for name in _sql(params)}


def _resident_gib() -> float:
    """This process's resident memory (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return float("nan")
    return kib / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--columns", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--peer-repeat", type=int, default=3, help="runs of the PyTables queries (median)")
    parser.add_argument("--row-group", type=int, default=None, help="rows per row group (default: the store's)")
    parser.add_argument("--row-groups", help="comma-separated row-group sizes: time cellar cold at each instead")
    parser.add_argument("--workdir", help="keep the data here (default: a temporary directory)")
    parser.add_argument("--measured", action="store_true",
                        help="instead, a store cellar measured: --images measurements of a generated slide")
    parser.add_argument("--images", type=int, default=MEASURED_IMAGES)
    parser.add_argument("--size", type=int, default=8192, help="--measured: the slide's side in pixels")
    parser.add_argument("--objects", type=int, default=100_000, help="--measured: nuclei per slide")
    parser.add_argument("--channels", type=int, default=16, help="--measured: channels per slide")
    parser.add_argument("--no-pytables", action="store_true", help="--measured: leave PyTables out")
    args = parser.parse_args()
    if args.measured:
        measured(args)
        return

    from cellar import query
    from cellar.measure import store_write
    from cellar.query import cachebuild

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cellar-qbench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    table, params = generate(args.rows, args.columns)
    print(f"data: {table.num_rows:,} rows x {table.num_columns} columns generated in {time.perf_counter() - t:.1f} s",
          flush=True)
    names = list(_sql(params))
    results: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    if args.row_groups:
        for size in [int(s) for s in args.row_groups.split(",")]:
            store = write_store(table, work / f"store-{size}.cellar", size)
            results[f"cellar cold ({size:,}-row groups)"] = in_turns(
                {"cellar": (cold_cellar(store, params, cache=False), args.repeat)}, names, counts)["cellar"]
        report(results, counts, names, args)
        if not args.workdir:
            shutil.rmtree(work)
        return

    store = write_store(table, work / "store.cellar", args.row_group or store_write.ROW_GROUP_SIZE)
    del table  # every engine runs with the same free memory (and page cache)
    gc.collect()
    objs = query.open(store)
    parquet = store / objs.tables[0][1]["dir"] / objs.tables[0][1]["files"][0]
    cache_dir = store / "cache"
    print(f"store ({args.row_group or store_write.ROW_GROUP_SIZE:,} rows per row group): "
          f"{parquet.stat().st_size / 2**30:.2f} GiB", flush=True)
    for name, fn in cold_cellar(store, params, cache=False).items():
        counts[name] = fn()
    load = warm_queries(results, "cellar warm, RAM (session cache)", store, params, counts, args.repeat)
    print(f"session cache read into RAM in {load:.1f} s", flush=True)

    built = cachebuild.build(store)
    os.sync()
    print(f"on-disk session cache (cellar cache) written in {built['seconds']:.1f} s "
          f"({built['bytes'] / 2**30:.2f} GiB)", flush=True)
    evict(parquet)  # a phase of its own: its files and the row-major copy's are written in turn
    results["cellar cold, mapped cache (no row-major copy; timed alone)"] = in_turns(
        {"cellar": (cold_cellar(store, params), args.repeat)}, names, counts)["cellar"]

    built = cachebuild.build(store, rows=True)
    os.sync()
    print(f"on-disk session cache with its row-major copy (cellar cache --rows) written in {built['seconds']:.1f} s "
          f"({built['bytes'] / 2**30:.2f} GiB)", flush=True)
    h5 = work / "omero.h5"
    t = time.perf_counter()
    write_omero_h5(parquet, h5)
    print(f"OMERO.tables HDF5 written in {time.perf_counter() - t:.1f} s ({h5.stat().st_size / 2**30:.2f} GiB)",
          flush=True)
    # The cold engines in turns. What they touch fits in memory together: the Parquet file, the HDF5 file and
    # the pages of the cache files the queries read (columns, and some rows of the row-major copy). The files
    # just written would fill the page cache first: they are dropped, and each engine's untimed run reads in
    # what it needs.
    evict(parquet, cache_dir, h5)
    pa.default_memory_pool().release_unused()
    print(f"benchmark process before the cold engines: {_resident_gib():.2f} GiB resident", flush=True)
    results.update(in_turns({
        "cellar cold, Parquet": (cold_cellar(store, params, cache=False), args.repeat),
        "polars scan_parquet": (polars_queries(parquet, params), args.repeat),
        "cellar cold, mapped cache + rows": (cold_cellar(store, params), args.repeat),
        "PyTables (OMERO.tables layout)": (pytables_queries(h5, params), args.peer_repeat),
    }, names, counts))
    load = warm_queries(results, "cellar warm, mapped cache + rows", store, params, counts, args.repeat)
    print(f"mapped session cache opened in {load * 1000:.1f} ms", flush=True)
    report(results, counts, names, args)
    if not args.workdir:
        shutil.rmtree(work)


def report(results: dict, counts: dict, names: list[str], args) -> None:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.rows:,} rows x {args.columns} columns; medians of {args.repeat} (PyTables {args.peer_repeat}); "
          f"rows returned: {', '.join(f'{k} {v:,}' for k, v in counts.items())}\n")
    print("| engine | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    first = ["cellar cold, Parquet", "polars scan_parquet", "cellar cold, mapped cache + rows", "PyTables (OMERO.tables layout)"]
    for engine in sorted(results, key=lambda e: first.index(e) if e in first else len(first)):
        row = results[engine]
        print(f"| {engine} | " + " | ".join(f"{row[n] * 1000:,.1f} ms" for n in names) + " |")
    for cold in ("cellar cold, Parquet", "cellar cold, mapped cache + rows"):  # timed in turns with the peers
        if cold not in results:
            continue
        for peer in ("polars scan_parquet", "PyTables (OMERO.tables layout)"):
            print(f"| {cold} faster than {peer.split(' (')[0]} by | " + " | ".join(
                f"{results[peer][n] / results[cold][n]:.1f}x" for n in names) + " |")
    sys.stdout.flush()


# -- a store that cellar measured itself (--measured) ------------------------------------------------------------
MEASURED_IMAGES = 20


def _cellar(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cellar", *args, *(["--quiet"] if args[0] == "measure" else [])],
                   check=True, stdout=subprocess.DEVNULL)


def measured_store(work: Path, images: int, size: int, objects: int, channels: int) -> Path:
    """`images` measurements of one generated slide (`bench_measure.make_slide`: `size`^2 px, `objects` nuclei,
    `channels` uint16 channels, 0.5 um pixels) under the names s00, s01, ... with the default features, as
    `cellar measure` writes them; then an annotation version (a `cell_type` of 4 classes) on every table. Kept
    in `work` and reused when it is there."""
    from bench_measure import make_slide
    from cellar.ngff.write import write_image

    store = work / "store.cellar"
    if (work / "store.done").exists():
        return store
    shutil.rmtree(store, ignore_errors=True)
    slide = work / "slide.zarr"
    if not slide.exists():
        labels, image = make_slide(size, objects, channels)
        write_image(slide, image, "cyx", chunks=(1, 1024, 1024), labels={"nuclei": labels}, scale={"y": 0.5, "x": 0.5})
        del labels, image
    for i in range(images):
        t = time.perf_counter()
        _cellar("measure", str(slide), "--labels", "nuclei", "--out", str(store), "--image-name", f"s{i:02d}")
        print(f"  measured s{i:02d} in {time.perf_counter() - t:.1f} s", flush=True)
    rng = np.random.default_rng(1)
    for i in range(images):
        ids = pq.read_table(next((store / "objects" / f"image=s{i:02d}").rglob("*.parquet")), columns=["label_id"])
        notes = work / f"notes-s{i:02d}.parquet"
        kinds = np.array(["T", "B", "M", "other"])[rng.integers(0, 4, ids.num_rows)]
        pq.write_table(pa.table({"label_id": ids.column(0), "cell_type": kinds}), notes)
        _cellar("annotate", str(store), "--from", str(notes), "--image", f"s{i:02d}", "--labels", "nuclei")
        notes.unlink()
    os.sync()
    (work / "store.done").touch()
    return store


def omero_files(store: Path, work: Path, images: list[str]) -> tuple[dict, dict]:
    """Each image's table as OMERO.tables HDF5 (`cellar export --to omero-h5`), and its annotations in a second
    file (OMERO keeps a bulk annotation table apart); reused when there."""
    h5, notes = {}, {}
    for image in images:
        h5[image], notes[image] = str(work / f"omero-{image}.h5"), str(work / f"omero-notes-{image}.h5")
        if not Path(notes[image]).exists():
            _cellar("export", str(store), "--image", image, "--labels", "nuclei", "--to", "omero-h5", h5[image],
                    "--columns", ",".join(measurement_columns(store)), "--overwrite")
            _cellar("export", str(store), "--image", image, "--labels", "nuclei", "--to", "omero-h5", notes[image],
                    "--columns", "label_id,cell_type", "--overwrite")
    os.sync()
    return h5, notes


def measurement_columns(store: Path) -> list[str]:
    from cellar import query

    with query.open(store) as objs:
        return [c for c in objs.column_names if c not in ("image", "label_image", "cell_type")]


def measured_params(store: Path) -> dict:
    """Thresholds at quantiles of the store's own values (about 1% and 0.1% of rows), a box of 1% of the slide."""
    import polars as pl

    glob = str(store / "objects" / "**" / "*.parquet")
    mean = "intensity_mean__c3"
    values = pl.scan_parquet(glob).select("area", mean).collect()
    area, inten = values.get_column("area").to_numpy(), values.get_column(mean).to_numpy()
    mean_hi = float(np.quantile(inten, 0.9))
    above = area[inten > mean_hi]
    images = sorted(p.name.split("=", 1)[1] for p in (store / "objects").iterdir())
    x = pl.scan_parquet(glob).select(pl.col("centroid_x").max(), pl.col("centroid_y").max()).collect().row(0)
    return {
        "store": str(store), "objects_glob": glob,
        "annotations_glob": str(store / "annotations" / "**" / "*.parquet"),
        "mean": mean, "mean_hi": mean_hi, "mean_5k": float(np.quantile(inten, 1 - 5000 / len(inten))),
        "area_hi": float(np.quantile(above, 0.9)), "area_top": float(np.quantile(above, 0.99)),
        "area_mid": float(np.quantile(area, 0.9)),
        "box": [0.45 * x[0], 0.45 * x[1], 0.55 * x[0], 0.55 * x[1]],
        "image": images[min(3, len(images) - 1)], "images": images,
        "averages": [f"intensity_mean__c{k}" for k in range(10)], "top": "intensity_max__c5",
    }


ENGINE_NAMES = {"cellar": "cellar (defaults)", "polars": "polars scan_parquet", "duckdb": "DuckDB read_parquet",
                "pytables": "PyTables (OMERO.tables layout)"}


def fresh_runs(params: dict, repeat: int, engines: list[str]) -> dict:
    """{engine: {query: (median query s, median import s, rows)}}: every query in a fresh process per engine and
    run, the engines taking turns (the order rotating), after one untimed run each (warm page cache)."""
    script = str(Path(__file__).with_name("query_engines.py"))
    arg = json.dumps(params)

    def once(engine: str, name: str) -> dict:
        out = subprocess.run([sys.executable, script, engine, name, arg], check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    from query_engines import QUERIES

    results: dict[str, dict] = {e: {} for e in engines}
    for name in QUERIES:
        rows = {e: once(e, name)["rows"] for e in engines}
        assert len(set(rows.values())) == 1, (name, rows)
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for r in range(repeat):
            for engine in engines[r % len(engines):] + engines[:r % len(engines)]:
                runs[engine].append(once(engine, name))
        for e in engines:
            results[e][name] = (statistics.median(x["query"] for x in runs[e]),
                                statistics.median(x["imports"] for x in runs[e]), rows[e])
        print(f"  {name}: " + ", ".join(f"{e} {results[e][name][0] * 1000:.0f} ms" for e in engines), flush=True)
    return results


WARM = """
import json, statistics, sys, time
sys.path.insert(0, {bench!r})
from cellar.query import api
import query_engines as qe
p = json.loads(sys.argv[1])
t = time.perf_counter()
objs = api.open(p["store"], cache=True)
opened = time.perf_counter() - t
x0, y0, x1, y1 = p["box"]
queries = {{
    "filter -> ids": lambda: objs.where(qe._filter(p, p["area_hi"])).select("image", "label_id").to_arrow().num_rows,
    "box -> ids": lambda: len(objs.where(f"image = '{{p['image']}}'").within(x0, y0, x1, y1, units="px").label_ids()),
    "5,000 whole rows": lambda: objs.where(f"{{p['mean']}} > {{p['mean_5k']}}").to_arrow().num_rows,
}}
out = {{"open": opened}}
for name, fn in queries.items():
    rows = fn()
    times = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    out[name] = (statistics.median(times), rows)
print(json.dumps(out))
"""


def warm_runs(params: dict, repeat: int) -> dict:
    """The session cache in RAM (`query.open(store, cache=True)`), in one process: the time to read it, and the
    median of `repeat` runs of a filter, a box and a whole-row fetch of about 5,000 rows, after one untimed run."""
    code = WARM.format(bench=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code, json.dumps(params), str(repeat)], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout)
    print("  warm: " + ", ".join(f"{k} {v[0] * 1000:.1f} ms ({v[1]:,} rows)" if isinstance(v, list) else
                                 f"{k} {v:.1f} s" for k, v in result.items()), flush=True)
    return result


def cli_runs(params: dict, work: Path, repeat: int) -> dict:
    """Whole-process times (median, in turns) of `cellar sql`, `cellar filter` and `cellar export` against
    polars and DuckDB one-liners that write the same result."""
    x0, y0, x1, y1 = params["box"]
    store, image, glob = params["store"], params["image"], params["objects_glob"]
    box = f"centroid_x BETWEEN {x0} AND {x1} AND centroid_y BETWEEN {y0} AND {y1}"
    cond = f"area > {params['area_mid']}"
    pl_box = (f"(pl.col('image') == '{image}') & pl.col('centroid_x').is_between({x0}, {x1}) & "
              f"pl.col('centroid_y').is_between({y0}, {y1})")
    pl_scan = f"pl.scan_parquet('{glob}', hive_partitioning=True)"
    py = [sys.executable, "-c"]
    pairs = {
        "cellar sql (box -> ids, CSV)": (
            [sys.executable, "-m", "cellar", "sql", store, f"SELECT label_id FROM objects WHERE image = '{image}' "
             f"AND {box}", "--output", str(work / "a.csv"), "--overwrite"],
            {"polars": py + [f"import polars as pl; {pl_scan}.filter({pl_box}).select('label_id').collect()"
                             f".write_csv('{work / 'b.csv'}')"],
             "DuckDB": py + [f"import duckdb; duckdb.sql(\"COPY (SELECT label_id FROM read_parquet('{glob}', "
                             f"hive_partitioning = true) WHERE image = '{image}' AND {box}) TO '{work / 'c.csv'}'\")"]}),
        "cellar filter (ids, text)": (
            [sys.executable, "-m", "cellar", "filter", store, "--where", cond, "--image", image, "--labels", "nuclei",
             "--output", str(work / "a.txt"), "--overwrite"],
            {"polars": py + [f"import polars as pl; {pl_scan}.filter((pl.col('image') == '{image}') & "
                             f"(pl.col('area') > {params['area_mid']})).select('label_id').sort('label_id').collect()"
                             f".write_csv('{work / 'b.txt'}', include_header=False)"]}),
        "cellar export (CSV, all columns)": (
            [sys.executable, "-m", "cellar", "export", store, "--image", image, "--labels", "nuclei", "--where",
             f"{cond} AND {params['mean']} > {params['mean_hi']}", "--to", "csv", str(work / "a-export.csv"),
             "--overwrite"],
            {"polars": py + [f"import polars as pl; {pl_scan}.filter((pl.col('image') == '{image}') & "
                             f"(pl.col('area') > {params['area_mid']}) & (pl.col('{params['mean']}') > "
                             f"{params['mean_hi']})).collect().write_csv('{work / 'b-export.csv'}')"]}),
    }
    env = installed.bytecode_env()  # as after `pip install` (see benchmarks/installed.py)
    out = {}
    for name, (cellar_cmd, peers) in pairs.items():
        commands = {"cellar": cellar_cmd, **peers}
        times: dict[str, list[float]] = {k: [] for k in commands}
        for r in range(repeat + 1):
            keys = list(commands)
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                t = time.perf_counter()
                subprocess.run(commands[key], check=True, stdout=subprocess.DEVNULL, env=env)
                if r:  # the first round is untimed
                    times[key].append(time.perf_counter() - t)
        out[name] = {k: statistics.median(v) for k, v in times.items()}
        print(f"  {name}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in out[name].items()), flush=True)
    return out


def measured(args) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cellar-qbench-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))
    t = time.perf_counter()
    store = measured_store(work, args.images, args.size, args.objects, args.channels)
    params = measured_params(store)
    print(f"store: {len(params['images'])} images measured, "
          f"{sum(p.stat().st_size for p in (store / 'objects').rglob('*.parquet')) / 2**30:.2f} GiB of Parquet, "
          f"{sum(p.stat().st_size for p in store.rglob('*') if p.is_file()) / 2**30:.2f} GiB in all "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    engines = ["cellar", "polars", "duckdb"]
    if not args.no_pytables:
        params["h5"], params["h5_notes"] = omero_files(store, work, params["images"])
        engines.append("pytables")
    results = fresh_runs(params, args.repeat, engines)
    cli = cli_runs(params, work, args.repeat)
    warm = warm_runs(params, args.repeat)
    report_measured(results, cli, params, args)
    print("\n| session cache in RAM (one process) | " + " | ".join(k for k in warm if k != "open") + " |")
    print("|---|" + "---|" * (len(warm) - 1))
    print(f"| read in {warm['open']:.1f} s | " + " | ".join(f"{v[0] * 1000:.1f} ms ({v[1]:,} rows)"
                                                         for k, v in warm.items() if k != "open") + " |")
    if not args.workdir:
        shutil.rmtree(work)


def report_measured(results: dict, cli: dict, params: dict, args) -> None:
    from query_engines import QUERIES

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{len(params['images'])} images x {args.objects:,} objects requested, {args.channels} channels; "
          f"fresh process per query, medians of {args.repeat}, imports apart; rows: "
          + ", ".join(f"{q} {results['cellar'][q][2]:,}" for q in QUERIES) + "\n")
    print("| engine | " + " | ".join(QUERIES) + " | imports |")
    print("|---|" + "---|" * (len(QUERIES) + 1))
    for engine, per in results.items():
        imports = statistics.median(v[1] for v in per.values())
        print(f"| {ENGINE_NAMES[engine]} | " + " | ".join(f"{per[q][0] * 1000:,.0f} ms" for q in QUERIES)
              + f" | {imports * 1000:,.0f} ms |")
    for peer in [e for e in results if e != "cellar"]:
        print(f"| cellar faster than {ENGINE_NAMES[peer].split(' (')[0]} by | " + " | ".join(
            f"{results[peer][q][0] / results['cellar'][q][0]:.1f}x" for q in QUERIES) + " | |")
    print("\n| command (whole process) | cellar | peers | cellar / fastest peer |")
    print("|---|---|---|---|")
    for name, times in cli.items():
        peers = {k: v for k, v in times.items() if k != "cellar"}
        print(f"| {name} | {times['cellar'] * 1000:,.0f} ms | " + ", ".join(f"{k} {v * 1000:,.0f} ms" for k, v in peers.items())
              + f" | {times['cellar'] / min(peers.values()):.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
