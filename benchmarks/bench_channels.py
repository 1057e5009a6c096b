"""Benchmark: how `measure()` time and column count grow with the number of channels.

Generates a deterministic 2048 x 2048 slide with ~6k touching nuclei-like objects and C uint16 channels for
each C in --channels (default 1, 4, 16, 50), writes each as OME-Zarr 0.5 (512 x 512 chunks), and times
`measure.measure()` with the default groups in a warm process (median of --repeat). Prints time, columns,
and seconds per channel beyond the first, which stays flat when the cost is linear in channels.
Run: `python benchmarks/bench_channels.py`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_measure import make_slide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--objects", type=int, default=6000)
    parser.add_argument("--channels", default="1,4,16,50")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from cellar import measure
    from cellar.ngff.write import write_image
    from cellar.schemas import log

    counts = [int(c) for c in args.channels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="cellar-bench-channels-"))
    labels, image = make_slide(args.size, args.objects, max(counts))
    n_objects = len(np.unique(labels)) - 1
    rows = []
    for c in counts:
        path = write_image(work / f"c{c}.ome.zarr", image[:c], "cyx", chunks=(1, 512, 512), labels={"nuclei": labels},
                           scale={"y": 0.5, "x": 0.5}, channel_names=[f"ch{i}" for i in range(c)])
        store = work / f"c{c}.cellar"
        measure.measure(str(path), "nuclei", store, overwrite=True)  # warm
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            measure.measure(str(path), "nuclei", store, overwrite=True)
            times.append(time.perf_counter() - t)
        snap = log.snapshot(store)
        rows.append((c, statistics.median(times), len(snap.columns(snap.entry(*snap.keys[0])))))
        print(f"{c} channels: {rows[-1][1]:.2f} s, {rows[-1][2]} columns", flush=True)
    shutil.rmtree(work)
    base = rows[0][1]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.size} x {args.size}, {n_objects} objects, default groups, median of {args.repeat}\n")
    print("| channels | columns | time (s) | s per extra channel |")
    print("|---|---|---|---|")
    for c, t, ncol in rows:
        per = f"{(t - base) / (c - counts[0]):.3f}" if c != counts[0] else "-"
        print(f"| {c} | {ncol} | {t:.2f} | {per} |")


if __name__ == "__main__":
    main()
