"""Benchmark: `cellar measure` end to end against scikit-image `regionprops_table` and nyxus on the same image.

Generates a deterministic slide (default 8192 x 8192, 4 uint16 channels, ~100k touching nuclei-like
objects), writes it as OME-Zarr 0.5 (512 x 512 chunks), then in one run:

- cellar: the `cellar measure` command in a subprocess, end to end (Python start, OME-Zarr read and
  decompress, features, Parquet store written), default workers (one per core), `--features` as given
  (default: cellar's default groups, morphology, intensity and spatial);
- cellar API: `measure.measure()` called in this (already warm) Python process, the same work without
  interpreter start-up and imports;
- regionprops: `skimage.measure.regionprops_table` with the scikit-image properties of the selected
  features (taken from cellar's registry), in pixel units, on in-memory arrays already loaded, so its time
  excludes all I/O; it covers fewer features than cellar (no quantiles, MAD, skewness, kurtosis, boundary
  mean, neighbours);
- regionprops + extra_properties: the same call with the per-object intensity features regionprops lacks
  added the way its users add them, as `extra_properties` written with numpy and scipy (sum, quantiles 5/25/
  75/95, MAD, skewness, kurtosis, boundary mean), so both sides compute the same per-object features
  (`--no-extra` to skip); the spatial group (neighbours) is left out of both regionprops runs;
- nyxus (if installed): `Nyxus(["*ALL_INTENSITY*", "*ALL_MORPHOLOGY*"]).featurize` on the in-memory arrays,
  one intensity/label pair per channel, with one thread per core (`--no-nyxus` to skip).

cellar runs `--repeat` times (median); the slower peers run once each (`--peer-repeat` to change).

Peak memory is the largest summed RSS of the process and its children, sampled every 20 ms (forked workers
share pages with their parent, so the sum over-counts cellar's real use).
`--like-for-like` instead compares the features both sides compute (README's first table), in one run:
- the basic set (BASIC below: area, bounding box, centroid, intensity mean/min/max, eccentricity, orientation,
  axis lengths, perimeter, solidity, extent, Euler number): `cellar measure --features BASIC` end to end against
  `regionprops_table` with exactly those properties on in-memory arrays, and nyxus' comparable groups
  (BASIC_MORPHOLOGY and ALL_INTENSITY, which compute more than these) on in-memory arrays;
- the cheap set (CHEAP: area, bounding box, centroid, intensity mean/min/max): `cellar measure --features CHEAP`
  against regionprops with those properties, and against the floor: every chunk of the OME-Zarr image and
  labels read and decoded, and one compiled pass over the pixels computing those features (counts, bounds,
  coordinate sums, per-channel sums/min/max), in a pool of as many processes as cellar uses, by bands of rows;
- start-up: `cellar measure` of a 64 x 64 image, whole process (interpreter, imports, kernels loaded from
  numba's cache, a table written), median of 5.

Run: `python benchmarks/bench_measure.py` (the issue's 8192 x 8192 / 100k-object slide), or
`python benchmarks/bench_measure.py --size 4096 --objects 25000` (the 4096 x 4096 / 25k case); add
`--size 1024 --objects 1500 --repeat 1` for a quick check.
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

import installed  # noqa: I001 - benchmarks/ is the script's folder, first on sys.path

REGIONPROPS_SCRIPT = """
import sys, time, numpy as np
from scipy import ndimage as ndi
from skimage.measure import regionprops_table
labels = np.load(sys.argv[1]); image = np.load(sys.argv[2])
props = sys.argv[3].split(",")

# cellar's per-object features that regionprops lacks, as a regionprops user adds them: extra properties
# in plain numpy (scipy.stats' skew, kurtosis and median_abs_deviation give the same values but cost ~1 ms
# a call), called by regionprops once per region and channel with the region's 2D intensity crop
def intensity_sum(mask, img):
    return img[mask].sum(dtype=np.float64)

def intensity_quantiles(mask, img):
    return np.quantile(img[mask].astype(np.float64), [0.05, 0.25, 0.75, 0.95])

def intensity_mad(mask, img):
    v = img[mask].astype(np.float64)
    return np.median(np.abs(v - np.median(v)))

def _moments(v):
    d = v - v.mean()
    d2 = d * d
    return d2.mean(), (d2 * d).mean(), (d2 * d2).mean()

def intensity_skewness(mask, img):
    m2, m3, _ = _moments(img[mask].astype(np.float64))
    return m3 / m2 ** 1.5 if m2 > 0 else np.nan

def intensity_kurtosis(mask, img):
    m2, _, m4 = _moments(img[mask].astype(np.float64))
    return m4 / m2 ** 2 - 3.0 if m2 > 0 else np.nan

def intensity_boundary_mean(mask, img):
    return img[mask & ~ndi.binary_erosion(mask)].mean()

extra = [intensity_sum, intensity_quantiles, intensity_mad, intensity_skewness, intensity_kurtosis,
         intensity_boundary_mean] if sys.argv[4] == "extra" else ()
t = time.perf_counter()
out = regionprops_table(labels, np.moveaxis(image, 0, -1), properties=props, extra_properties=extra)
print(time.perf_counter() - t, len(out["label"]))
"""

NYXUS_SCRIPT = """
import os, sys, time, numpy as np
from nyxus import Nyxus
labels = np.load(sys.argv[1]); image = np.load(sys.argv[2])
nyx = Nyxus(["*ALL_INTENSITY*", "*ALL_MORPHOLOGY*"], n_feature_calc_threads=os.cpu_count())
names = [f"ch{i}" for i in range(len(image))]
t = time.perf_counter()
df = nyx.featurize(image, np.stack([labels] * len(image)), intensity_names=names, label_names=names)
print(time.perf_counter() - t, df["ROI_label"].nunique())
"""


BASIC = ("area,bbox_min,bbox_max,centroid,intensity_mean,intensity_min,intensity_max,eccentricity,orientation,"
         "axis_major_length,axis_minor_length,perimeter,solidity,extent,euler_number")
CHEAP = "area,bbox_min,bbox_max,centroid,intensity_mean,intensity_min,intensity_max"

NYXUS_BASIC_SCRIPT = NYXUS_SCRIPT.replace('"*ALL_MORPHOLOGY*"', '"*BASIC_MORPHOLOGY*"')

FLOOR_SCRIPT = """
import multiprocessing, sys, time, numpy as np, numba, zarr
path, workers, band = sys.argv[1], int(sys.argv[2]), 1024

@numba.njit(nogil=True)
def one_pass(labels, image, y0, geo, acc):
    # per label: count, y min, y max, x min, x max, y sum, x sum; per channel and label: sum, min, max
    for y in range(labels.shape[0]):
        for x in range(labels.shape[1]):
            k = labels[y, x]
            if k == 0:
                continue
            gy = y + y0
            geo[k, 0] += 1
            geo[k, 1] = min(geo[k, 1], gy)
            geo[k, 2] = max(geo[k, 2], gy)
            geo[k, 3] = min(geo[k, 3], x)
            geo[k, 4] = max(geo[k, 4], x)
            geo[k, 5] += gy
            geo[k, 6] += x
            for c in range(image.shape[0]):
                v = np.float64(image[c, y, x])
                acc[c, k, 0] += v
                acc[c, k, 1] = min(acc[c, k, 1], v)
                acc[c, k, 2] = max(acc[c, k, 2], v)

def arrays():
    return zarr.open_array(path + "/labels/nuclei/0", mode="r"), zarr.open_array(path + "/0", mode="r")

def fresh(n, c):
    geo = np.zeros((n + 1, 7)); geo[:, 1] = geo[:, 3] = np.inf; geo[:, 2] = geo[:, 4] = -np.inf
    acc = np.zeros((c, n + 1, 3)); acc[:, :, 1] = np.inf; acc[:, :, 2] = -np.inf
    return geo, acc

def part(y0):
    labels, image = arrays()
    lab, img = labels[y0:y0 + band], image[:, y0:y0 + band]
    if mode == "read":
        return None
    geo, acc = fresh(n, img.shape[0])
    one_pass(lab, img, y0, geo, acc)
    return geo, acc

labels, image = arrays()
n = int(sys.argv[3])
g, a = fresh(n, image.shape[0])
one_pass(labels[:8, :8], image[:, :8, :8], 0, g, a)  # compiled here, before the pool forks
out = {}
for mode in ("read", "floor"):
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        t = time.perf_counter()
        parts = pool.map(part, range(0, labels.shape[0], band))
        if mode == "floor":  # the bands' partial results merged: each object's features
            geo, acc = fresh(n, image.shape[0])
            for g, a in parts:
                geo[:, 0] += g[:, 0]; geo[:, 5:] += g[:, 5:]; acc[:, :, 0] += a[:, :, 0]
                geo[:, 1] = np.minimum(geo[:, 1], g[:, 1]); geo[:, 3] = np.minimum(geo[:, 3], g[:, 3])
                geo[:, 2] = np.maximum(geo[:, 2], g[:, 2]); geo[:, 4] = np.maximum(geo[:, 4], g[:, 4])
                acc[:, :, 1] = np.minimum(acc[:, :, 1], a[:, :, 1]); acc[:, :, 2] = np.maximum(acc[:, :, 2], a[:, :, 2])
            mean = acc[:, 1:, 0] / np.maximum(geo[1:, 0], 1)
        out[mode] = time.perf_counter() - t
print(out["read"], out["floor"], int((geo[1:, 0] > 0).sum()))
"""


def like_for_like(args, work: Path, zarr_path: Path, n_objects: int) -> None:
    """The README's first table: cellar against regionprops and nyxus on the same features, and against the floor
    (see the module's docstring), in one run."""
    workers = os.cpu_count() or 1
    cellar_bin = str(Path(sys.executable).with_name("cellar"))
    times: dict[str, list[float]] = {}

    env = installed.bytecode_env()  # as after `pip install` (see benchmarks/installed.py)

    def timed(key: str, cmd: list[str], parse=None) -> None:
        elapsed, _, out = run_tracked(cmd, env)
        times.setdefault(key, []).append(parse(out) if parse else elapsed)
        print(f"  {key}: {times[key][-1]:.2f} s", flush=True)

    for name, features in (("basic", BASIC), ("cheap", CHEAP)):
        cmd = [cellar_bin, "measure", str(zarr_path), "--labels", "nuclei", "--out", str(work / f"{name}.cellar"),
               "--overwrite", "--quiet", "--features", features]
        subprocess.run(cmd, check=True, env=env)  # numba's cache filled, as after any first use
        for _ in range(args.repeat):
            timed(f"cellar {name}", cmd)
        props = ",".join(regionprops_properties(features))
        for _ in range(args.peer_repeat):
            timed(f"regionprops {name}", [sys.executable, "-c", REGIONPROPS_SCRIPT, str(work / "labels.npy"),
                                          str(work / "image.npy"), props, ""], lambda out: float(out.split()[0]))
    if not args.no_nyxus:
        for _ in range(args.peer_repeat):
            timed("nyxus basic", [sys.executable, "-c", NYXUS_BASIC_SCRIPT, str(work / "labels.npy"),
                                  str(work / "image.npy")], lambda out: float(out.split()[0]))
    for _ in range(args.repeat):
        timed("read", [sys.executable, "-c", FLOOR_SCRIPT, str(zarr_path), str(workers), str(n_objects)],
              lambda out: float(out.split()[0]))
        timed("floor", [sys.executable, "-c", FLOOR_SCRIPT, str(zarr_path), str(workers), str(n_objects)],
              lambda out: float(out.split()[1]))
    tiny = work / "tiny.ome.zarr"
    from cellar.ngff.write import write_image

    tiny_labels, tiny_image = make_slide(64, 10, args.channels)
    write_image(tiny, tiny_image, "cyx", chunks=(1, 64, 64), labels={"nuclei": tiny_labels}, overwrite=True)
    start = [cellar_bin, "measure", str(tiny), "--labels", "nuclei", "--out", str(work / "tiny.cellar"),
             "--overwrite", "--quiet"]
    subprocess.run(start, check=True, env=env)
    for _ in range(5):
        timed("start-up", start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmachine: {platform.machine()}, {workers} cores, Python {platform.python_version()}; {args.size} x "
          f"{args.size}, {args.channels} x uint16, {n_objects:,} objects; cellar median of {args.repeat} (end to end, "
          f"OME-Zarr -> store), peers median of {args.peer_repeat} (arrays in memory)\n")
    print("| features | cellar measure | regionprops_table | cellar faster by | nyxus | cellar faster by |")
    print("|---|---|---|---|---|---|")
    for name, features in (("basic", BASIC), ("cheap", CHEAP)):
        c, r = med[f"cellar {name}"], med[f"regionprops {name}"]
        nyx = med.get(f"nyxus {name}")
        print(f"| {name} ({features.count(',') + 1} features) | {c:.2f} s | {r:.2f} s | {r / c:.1f}x | "
              + (f"{nyx:.2f} s | {nyx / c:.1f}x |" if nyx else "- | - |"))
    print(f"\nfloor of the cheap set (read every chunk + one compiled pass, {workers} processes): {med['floor']:.2f} s "
          f"(reading alone {med['read']:.2f} s); cellar's cheap set is {med['cellar cheap'] / med['floor']:.2f}x the "
          f"floor. Start-up (`cellar measure` of a 64 x 64 image, whole process): {med['start-up']:.2f} s.")
    (work / "like_for_like.json").write_text(json.dumps(med))


def regionprops_properties(features: str | None) -> list[str]:
    """The regionprops_table properties equivalent to cellar's selected features (pixel units)."""
    from cellar.measure import features as registry

    props = ["label"]
    for f in registry.select(features):
        if f.skimage and not f.physical:
            base = f.skimage.split("-")[0]
            if base not in props:
                props.append(base)
    return props


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


def run_tracked(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with PeakRSS(proc.pid) as rss:
        out, err = proc.communicate()
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return elapsed, rss.peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--features", default=None, help="cellar --features (default: the default groups)")
    parser.add_argument("--repeat", type=int, default=3, help="cellar runs (median)")
    parser.add_argument("--peer-repeat", type=int, default=1, help="regionprops and nyxus runs (median)")
    parser.add_argument("--no-nyxus", action="store_true")
    parser.add_argument("--no-extra", action="store_true",
                        help="skip the regionprops run with extra_properties for the features it lacks")
    parser.add_argument("--workdir", help="keep data here (default: a temporary directory)")
    parser.add_argument("--like-for-like", action="store_true",
                        help="the basic and cheap feature sets against regionprops, nyxus and the floor (see above)")
    args = parser.parse_args()

    from cellar import measure
    from cellar.ngff.write import write_image

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

    if args.like_for_like:
        like_for_like(args, work, zarr_path, n_objects)
        if not args.workdir:
            shutil.rmtree(work)
        return
    store = work / "slide.cellar"
    feature_args = ["--features", args.features] if args.features else []
    cli = [str(Path(sys.executable).with_name("cellar")), "measure", str(zarr_path), "--labels", "nuclei",
           "--out", str(store), "--overwrite", "--quiet", *feature_args]
    # A warm-up run compiles and caches the numba kernels, as any first use on a machine does.
    subprocess.run(cli, check=True)
    runs: dict[str, list[tuple[float, int]]] = {"cellar": [], "api": [], "regionprops": [], "regionprops_extra": [],
                                                "nyxus": []}
    for i in range(args.repeat):
        elapsed, peak, _ = run_tracked(cli)
        runs["cellar"].append((elapsed, peak))
        t = time.perf_counter()
        measure.measure(str(zarr_path), "nuclei", store, overwrite=True, features=args.features)
        runs["api"].append((time.perf_counter() - t, 0))
        print(f"cellar run {i + 1}: {elapsed:.2f} s end to end, {runs['api'][-1][0]:.2f} s in a warm process",
              flush=True)
    props = regionprops_properties(args.features)
    peers = [(name, [sys.executable, "-c", REGIONPROPS_SCRIPT, str(work / "labels.npy"), str(work / "image.npy"),
                     ",".join(props), name.removeprefix("regionprops_")])
             for name in ("regionprops", "regionprops_extra")
             if name == "regionprops" or (not args.no_extra and (args.features is None or "intensity" in args.features))]
    if not args.no_nyxus:
        try:
            import nyxus  # noqa: F401

            peers.append(("nyxus", [sys.executable, "-c", NYXUS_SCRIPT, str(work / "labels.npy"),
                                    str(work / "image.npy")]))
        except ImportError:
            print("nyxus is not installed: skipped (pip install nyxus)")
    for i in range(args.peer_repeat):
        for name, cmd in peers:
            _, peak, out = run_tracked(cmd)
            runs[name].append((float(out.split()[0]), peak))
            print(f"{name} run {i + 1}: {runs[name][-1][0]:.2f} s", flush=True)

    med = {k: statistics.median(t for t, _ in v) for k, v in runs.items() if v}
    peak = {k: max(p for _, p in v) for k, v in runs.items() if v}
    labels_of = {
        "cellar": "cellar measure (end to end, OME-Zarr -> Parquet)",
        "api": "cellar API, warm process (OME-Zarr -> Parquet)",
        "regionprops": "regionprops_table, the features it has (in memory, I/O excluded)",
        "regionprops_extra": "regionprops_table + extra_properties for the other intensity features (in memory)",
        "nyxus": "nyxus ALL_INTENSITY + ALL_MORPHOLOGY (in memory)",
    }
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {n_objects} objects; cellar median of {args.repeat}, peers of "
          f"{args.peer_repeat}; cellar features: {args.features or 'default groups'}; regionprops properties: "
          f"{', '.join(props[1:])}\n")
    print("| tool | time (s) | objects/s | peak RSS (MB) | cellar end to end is faster by |")
    print("|---|---|---|---|---|")
    for key in med:
        rss = f"{peak[key] / 2**20:,.0f}" if peak[key] else "-"
        ratio = "-" if key in ("cellar", "api") else f"{med[key] / med['cellar']:.1f}x"
        print(f"| {labels_of[key]} | {med[key]:.2f} | {n_objects / med[key]:,.0f} | {rss} | {ratio} |")
    (work / "result.json").write_text(json.dumps({"objects": n_objects, "median_s": med, "peak_bytes": peak}))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
