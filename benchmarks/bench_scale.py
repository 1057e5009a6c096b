"""Benchmark: `cellar measure` memory and time as the slide grows (8192 x 8192 -> 32768 x 32768).

Generates deterministic slides of touching nuclei-like objects with 2 uint16 channels, tile by tile (each
8192 x 8192 tile is `bench_measure.make_slide` with a seed of its own and its label ids offset, so a
32768 x 32768 slide holds ~1.6M objects and is never in memory whole), writes them as OME-Zarr 0.5
(512 x 512 chunks), then times `cellar measure` end to end on each (a fresh process, default workers and
features) and samples the peak RSS of the process tree (parent plus forked workers, summed, so pages they
share are counted twice). The last table compares time per pixel and per object with the smallest slide:
a ratio of 1.0 is linear scaling.

Run: `python benchmarks/bench_scale.py` (8192 and 32768; about 10 minutes to generate and 3 to measure on
2 cores, about 4 GB of disk in a temporary directory), `--sizes 8192,16384` for a shorter run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from bench_measure import make_slide, run_tracked

TILE = 8192
OBJECTS_PER_TILE = 100_000
CHANNELS = 2


def write_slide(path: Path, size: int) -> int:
    """Write a size x size slide tile by tile; returns its number of objects."""
    from cellar.ngff.write import write_image

    # Metadata from the fixture writer on a small array, then level 0 replaced by full-size arrays.
    write_image(path, np.zeros((CHANNELS, 512, 512), np.uint16), "cyx", chunks=(1, 512, 512),
                labels={"nuclei": np.zeros((512, 512), np.uint32)}, scale={"y": 0.5, "x": 0.5},
                channel_names=[f"ch{i}" for i in range(CHANNELS)], overwrite=True)
    root = zarr.open_group(str(path), mode="r+")
    image = root.create_array("0", shape=(CHANNELS, size, size), chunks=(1, 512, 512), dtype="uint16",
                              overwrite=True)
    labels = root["labels/nuclei"].create_array("0", shape=(size, size), chunks=(512, 512), dtype="uint32",
                                                overwrite=True)
    n_objects = 0
    n = size // TILE
    for k in range(n * n):
        ty, tx = divmod(k, n)
        lab, img = make_slide(TILE, OBJECTS_PER_TILE, CHANNELS, seed=k)
        present = lab > 0
        n_objects += len(np.unique(lab[present]))
        lab[present] += np.uint32(k * 2 * OBJECTS_PER_TILE)  # ids unique across tiles
        box = (slice(ty * TILE, (ty + 1) * TILE), slice(tx * TILE, (tx + 1) * TILE))
        labels[box] = lab
        image[(slice(None), *box)] = img
        del lab, img, present
    return n_objects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8192,32768", help="slide sizes, multiples of 8192")
    parser.add_argument("--repeat", type=int, default=1, help="cellar runs per size (median)")
    parser.add_argument("--workdir", help="keep data here (default: a temporary directory, removed after)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(s % TILE for s in sizes):
        raise SystemExit(f"--sizes: multiples of {TILE} expected")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cellar-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("cellar"))
    rows = []
    for size in sizes:
        path = work / f"slide{size}.ome.zarr"
        done = work / f"slide{size}.json"  # a slide kept in --workdir is not generated again
        if done.exists() and path.exists():
            n_objects = json.loads(done.read_text())["objects"]
            print(f"{size} x {size}: {n_objects:,} objects, kept from an earlier run", flush=True)
        else:
            t = time.perf_counter()
            n_objects = write_slide(path, size)
            done.write_text(json.dumps({"objects": n_objects}))
            print(f"{size} x {size}: {n_objects:,} objects, generated and written in {time.perf_counter() - t:.0f} s",
                  flush=True)
        cmd = [exe, "measure", str(path), "--labels", "nuclei", "--out", str(work / f"slide{size}.cellar"),
               "--overwrite", "--quiet"]
        if not rows:
            run_tracked(cmd)  # compiles or loads the numba kernels once, as any first use does
        runs = [run_tracked(cmd)[:2] for _ in range(args.repeat)]
        elapsed = statistics.median(r[0] for r in runs)
        peak = max(r[1] for r in runs)
        print(f"  cellar measure: {elapsed:.1f} s, peak RSS {peak / 2**20:,.0f} MB", flush=True)
        rows.append((size, n_objects, elapsed, peak))
        if not args.workdir:
            shutil.rmtree(path)

    base = rows[0]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{CHANNELS} x uint16 channels, default features, median of {args.repeat}\n")
    print("| slide | objects | time (s) | objects/s | peak RSS (MB) | time per pixel vs the first | "
          "time per object vs the first |")
    print("|---|---|---|---|---|---|---|")
    for size, n_objects, elapsed, peak in rows:
        per_px = (elapsed / size**2) / (base[2] / base[0] ** 2)
        per_obj = (elapsed / n_objects) / (base[2] / base[1])
        print(f"| {size} x {size} | {n_objects:,} | {elapsed:.1f} | {n_objects / elapsed:,.0f} | "
              f"{peak / 2**20:,.0f} | {per_px:.2f} | {per_obj:.2f} |")
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
