"""Benchmark: a store of many tables (a cohort), as one table per slide makes it.

Measures one small generated image once, then adds its table to a store again and again under new image
names through the store's writer (`measure.store_write.write_table`, the commit every `cellar measure` makes),
until the store holds 10, 100, 1,000 and 10,000 tables (`--sizes`). At each size it reports:

- add: the time to add one more table (median of the last `--adds` additions before that size);
- open: `query.open(store)` in a fresh process (imports of cellar, polars, DuckDB and pyarrow's Parquet
  reader excluded, and reported apart: they cost the same at every size, and a sub-second import time drifts
  by tens of percent on this machine);
- query one image: `objs.where("image = 't00003' AND area > 20").label_ids()` after the open, same process;
- count: `objs.count()` (every object of the store) after the open, same process.

The store is copied at each size and the copies are probed once it is built, in turn (size after size, then
again), so that a drift of the machine's speed shifts every size alike; fresh-process figures are medians of
`--repeat` processes per size. Run: `python benchmarks/bench_many.py`.
"""

from __future__ import annotations

import argparse
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

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import duckdb, polars, pyarrow.parquet  # the engines' imports, the same at every size: timed apart
from cellar import query
t1 = time.perf_counter()
objs = query.open(sys.argv[1])
t2 = time.perf_counter()
ids = objs.where("image = 't00003' AND area > 20").label_ids()
t3 = time.perf_counter()
n = objs.count()
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "open": t2 - t1, "query": t3 - t2, "count": t4 - t3, "ids": len(ids), "n": n}))
"""


def _probe(stores: list[Path], repeat: int) -> list[dict[str, float]]:
    """Medians of `repeat` fresh processes per store, the stores taken in turn (a drift of the machine's speed
    then shifts every size alike)."""
    runs: list[list[dict]] = [[] for _ in stores]
    root = Path(__file__).resolve().parents[1]
    for _ in range(repeat):
        for store, found in zip(stores, runs):
            out = subprocess.run([sys.executable, "-c", PROBE, str(store)], capture_output=True, text=True,
                                 check=True, cwd=root)
            found.append(json.loads(out.stdout))
    results = []
    for found in runs:
        result = {k: statistics.median(r[k] for r in found) for k in ("import", "open", "query", "count")}
        result.update(ids=found[0]["ids"], n=found[0]["n"])
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--adds", type=int, default=10, help="additions timed before each size")
    parser.add_argument("--repeat", type=int, default=9, help="fresh processes per figure")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from cellar import measure
    from cellar.measure import store_write
    from cellar.ngff.write import write_image
    from cellar.schemas import log

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import intensities, nuclei_like

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="cellar-bench-many-"))
    image = write_image(work / "img.ome.zarr", intensities((64, 64), 2, seed=1), "cyx", chunks=(1, 64, 64),
                        labels={"nuclei": nuclei_like((64, 64), 20, seed=2)}, scale={"y": 0.5, "x": 0.5})
    measure.measure(str(image), "nuclei", work / "one.cellar", workers=1, progress=False)
    snap = log.snapshot(work / "one.cellar")
    template = snap.entry(*snap.keys[0])
    specs = snap.columns(template)
    table = pq.read_table(work / "one.cellar" / template["dir"] / template["files"][0])
    n_objects = table.num_rows

    store = work / "many.cellar"
    grown, added, building = [], 0, 0.0
    for size in sizes:
        times = []
        while added < size:
            entry = {k: v for k, v in template.items() if k not in ("dir", "files", "columns_id", "created")}
            entry.update(image=f"t{added:05d}", columns=specs)
            t = time.perf_counter()
            store_write.write_table(store, entry, table)
            times.append(time.perf_counter() - t)
            added += 1
        building += sum(times)
        copy = work / f"s{size}.cellar"  # the store at this size, probed with the others at the end
        shutil.copytree(store, copy)
        grown.append((size, statistics.median(times[-args.adds:]), building, copy))
        print(f"{size:>6} tables: add {grown[-1][1] * 1e3:.1f} ms (built in {building:.1f} s)", flush=True)
    probes = _probe([copy for *_, copy in grown], args.repeat)
    rows = []
    for (size, add, built, _), probe in zip(grown, probes):
        assert probe["n"] == size * n_objects and probe["ids"] > 0, probe
        rows.append((size, add, built, probe))
        print(f"{size:>6} tables: open {probe['open'] * 1e3:.1f} ms, query one image {probe['query'] * 1e3:.1f} ms, "
              f"count {probe['count'] * 1e3:.1f} ms (import {probe['import'] * 1e3:.0f} ms)", flush=True)
    print(f"kept {work}") if os.environ.get("BENCH_KEEP") else shutil.rmtree(work)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; tables of "
          f"{n_objects} objects x {table.num_columns} columns; fresh process per figure, median of {args.repeat}, "
          "the sizes in turn\n")
    print("| tables | add a table (ms) | store built in (s) | open (ms) | query one image (ms) | count (ms) | "
          f"open + query vs {rows[0][0]:,} tables |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0][3]["open"] + rows[0][3]["query"]
    for size, add, built, probe in rows:
        both = probe["open"] + probe["query"]
        print(f"| {size:,} | {add * 1e3:.1f} | {built:,.1f} | {probe['open'] * 1e3:.1f} | {probe['query'] * 1e3:.1f} | "
              f"{probe['count'] * 1e3:.1f} | {both / base:.2f}x |")


if __name__ == "__main__":
    main()
