"""Benchmark: `cellar measure` end to end against scikit-image `regionprops_table` on the same image.

Generates a deterministic slide (default 4096 x 4096, 4 uint16 channels, ~25k touching nuclei-like
objects), writes it as OME-Zarr 0.5 (512 x 512 chunks), then in one run and interleaved:

- cellar: the `cellar measure` command in a subprocess, end to end (Python start, OME-Zarr read and
  decompress, features, Parquet store written), default workers (one per core);
- cellar API: `measure.measure()` called in this (already warm) Python process, the same work without
  interpreter start-up and imports;
- regionprops: `skimage.measure.regionprops_table` with the same properties (label, pixel count, physical
  area, bbox, centroid, intensity mean/std/min/max on the 4-channel image) on in-memory arrays that are
  already loaded, so its time excludes all I/O.

Peak memory is the largest summed RSS of the process and its children, sampled every 20 ms (forked workers
share pages with their parent, so the sum over-counts cellar's real use).
Run: `python benchmarks/bench_measure.py` (add `--size 1024 --objects 1500` for a quick check).
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
import threading
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REGIONPROPS_SCRIPT = """
import sys, time, numpy as np
from skimage.measure import regionprops_table
labels = np.load(sys.argv[1]); image = np.load(sys.argv[2])
t = time.perf_counter()
out = regionprops_table(labels, np.moveaxis(image, 0, -1), spacing=(0.5, 0.5), properties=[
    "label", "num_pixels", "area", "bbox", "centroid",
    "intensity_mean", "intensity_std", "intensity_min", "intensity_max"])
print(time.perf_counter() - t, len(out["label"]))
"""


def make_slide(size: int, n_objects: int, n_channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Touching nuclei-like objects (Voronoi cells of random seeds cut at a random radius) and channels."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros((size, size), bool)
    seeds[rng.integers(0, size, n_objects), rng.integers(0, size, n_objects)] = True
    dist, idx = ndi.distance_transform_edt(~seeds, return_indices=True)
    ids = np.zeros((size, size), np.uint32)
    n = int(seeds.sum())
    ids[seeds] = np.arange(1, n + 1, dtype=np.uint32)
    cells = ids[idx[0], idx[1]]
    del idx
    mean_radius = 0.5 * size / np.sqrt(n_objects)
    radius = rng.uniform(0.8 * mean_radius, 1.4 * mean_radius, n + 1)
    labels = np.where(dist <= radius[cells], cells, 0).astype(np.uint32)
    del dist, cells
    base = rng.integers(200, 3000, (n_channels, n + 1)).astype(np.float32)
    image = np.empty((n_channels, size, size), np.uint16)
    for c in range(n_channels):
        noise = rng.normal(0, 80, (size, size)).astype(np.float32)
        image[c] = np.clip(base[c][labels] * (labels > 0) + 100 + noise, 0, 65535).astype(np.uint16)
    return labels, image


class PeakRSS:
    """Samples the summed RSS of a process tree (Linux /proc) in a thread; `.peak` in bytes."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self, pid: int) -> list[int]:
        out = [pid]
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as fh:
                    for child in fh.read().split():
                        out.extend(self._tree(int(child)))
        except OSError:
            pass
        return out

    def _rss(self) -> int:
        total = 0
        for pid in self._tree(self.pid):
            try:
                with open(f"/proc/{pid}/statm") as fh:
                    total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.02)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_tracked(cmd: list[str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRSS(proc.pid) as rss:
        out, err = proc.communicate()
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return elapsed, rss.peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--objects", type=int, default=25_000)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="keep data here (default: a temporary directory)")
    args = parser.parse_args()

    from measure.ngff_write import write_image

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cellar-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    labels, image = make_slide(args.size, args.objects, args.channels)
    n_objects = len(np.unique(labels)) - 1
    zarr_path = write_image(work / "slide.ome.zarr", image, "cyx", chunks=(1, 512, 512), labels={"nuclei": labels},
                            scale={"y": 0.5, "x": 0.5}, channel_names=[f"ch{i}" for i in range(args.channels)],
                            overwrite=True)
    np.save(work / "labels.npy", labels)
    np.save(work / "image.npy", image)
    del labels, image
    print(f"data: {args.size} x {args.size}, {args.channels} x uint16, {n_objects} objects, "
          f"generated and written in {time.perf_counter() - t:.1f} s ({work})", flush=True)

    cellar = [str(Path(sys.executable).with_name("cellar"))]
    store = work / "slide.cellar"
    rp_cmd = [sys.executable, "-c", REGIONPROPS_SCRIPT, str(work / "labels.npy"), str(work / "image.npy")]
    # One warm-up run of cellar compiles and caches the numba kernels, as any first use on a machine does.
    subprocess.run([*cellar, "measure", str(zarr_path), "--labels", "nuclei", "--out", str(store), "--overwrite",
                    "--quiet"], check=True)
    import measure

    measure.measure(str(zarr_path), "nuclei", store, overwrite=True)  # warm: numba kernels loaded
    runs: dict[str, list[tuple[float, int]]] = {"cellar": [], "api": [], "regionprops": []}
    for i in range(args.repeat):
        elapsed, peak, _ = run_tracked([*cellar, "measure", str(zarr_path), "--labels", "nuclei", "--out", str(store),
                                        "--overwrite", "--quiet"])
        runs["cellar"].append((elapsed, peak))
        t = time.perf_counter()
        measure.measure(str(zarr_path), "nuclei", store, overwrite=True)
        runs["api"].append((time.perf_counter() - t, 0))
        _, peak, out = run_tracked(rp_cmd)
        rp_time = float(out.split()[0])
        runs["regionprops"].append((rp_time, peak))
        print(f"run {i + 1}: cellar {elapsed:.2f} s, cellar API {runs['api'][-1][0]:.2f} s, "
              f"regionprops_table {rp_time:.2f} s", flush=True)

    med = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
    peak = {k: max(p for _, p in v) for k, v in runs.items()}
    rows = [
        ("cellar measure (end to end, OME-Zarr -> Parquet)", "cellar"),
        ("cellar API, warm process (OME-Zarr -> Parquet)", "api"),
        ("regionprops_table (in memory, I/O excluded)", "regionprops"),
    ]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; median of {args.repeat}\n")
    print("| tool | time (s) | objects/s | peak RSS (MB) | speed-up vs regionprops |")
    print("|---|---|---|---|---|")
    for label, key in rows:
        rss = f"{peak[key] / 2**20:,.0f}" if peak[key] else "-"
        print(f"| {label} | {med[key]:.2f} | {n_objects / med[key]:,.0f} | {rss} | "
              f"{med['regionprops'] / med[key]:.1f}x |")
    (work / "result.json").write_text(json.dumps({"objects": n_objects, "median_s": med, "peak_bytes": peak}))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
