"""Shared generators and the registry-driven comparison against scikit-image regionprops (`from helpers import
...`: pytest puts this folder on the path, see pyproject.toml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tifffile
from scipy import ndimage as ndi
from skimage.measure import regionprops_table

from cellar.measure import features as registry

DATA = Path(__file__).parent / "data"
# Debian's chromium, which the viewer's page tests drive with Playwright (scripts/test installs it);
# CELLAR_CHROMIUM names another binary, so that the missing-browser path can be tried on a machine that has it.
CHROMIUM = os.environ.get("CELLAR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def nuclei_like(shape: tuple[int, ...], n: int, seed: int, radius: float = 6.0, dtype=np.uint32) -> np.ndarray:
    """Touching, irregular nuclei-like objects: Voronoi cells of random seeds cut by a per-seed radius.

    Label values are shuffled and spread (k * 7 + 3), so they are neither contiguous nor in raster order.
    """
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, bool)
    pts = tuple(rng.integers(0, s, n) for s in shape)
    seeds[pts] = True
    dist, idx = ndi.distance_transform_edt(~seeds, return_indices=True)
    ids = np.zeros(shape, np.int64)
    ids[seeds] = np.arange(1, seeds.sum() + 1)
    cells = ids[tuple(idx)]
    r = rng.uniform(0.6 * radius, 1.4 * radius, seeds.sum() + 1)
    labels = np.where(dist <= r[cells], cells, 0)
    values = np.zeros(seeds.sum() + 1, np.int64)
    values[1:] = rng.permutation(seeds.sum()) * 7 + 3
    return values[labels].astype(dtype)


def intensities(shape: tuple[int, ...], n_channels: int, seed: int, dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (rng.normal(100, 30, (n_channels, *shape))).astype(dtype)
    hi = min(np.iinfo(dtype).max, 60000)
    return rng.integers(0, hi, (n_channels, *shape)).astype(dtype)


def two_slides(tmp: Path, shape: tuple[int, int], n: int, seed: int) -> tuple[Path, Path]:
    """Two measured 2D slides (stores a.cellar and b.cellar in `tmp`) of the same nuclei, the second flipped:
    a has channels DAPI and CD8, b only DAPI (so the stores' columns differ). Returns the image paths."""
    from cellar.measure import measure
    from cellar.ngff.write import write_image

    labels = nuclei_like(shape, n, seed=seed)
    chunks = (1, 32, 32)
    a = write_image(tmp / "a.ome.zarr", intensities(shape, 2, seed=seed + 1), "cyx", chunks=chunks,
                    labels={"nuclei": labels}, channel_names=["DAPI", "CD8"], scale={"y": 0.5, "x": 0.5})
    b = write_image(tmp / "b.ome.zarr", intensities(shape, 1, seed=seed + 2), "cyx", chunks=chunks,
                    labels={"nuclei": labels[::-1].copy()}, channel_names=["DAPI"], scale={"y": 0.5, "x": 0.5})
    measure(str(a), "nuclei", tmp / "a.cellar", workers=1)
    measure(str(b), "nuclei", tmp / "b.cellar", workers=1)
    return a, b


def read_table(store: Path, image: str | None = None, label_image: str | None = None) -> tuple[dict, "object"]:
    """(entry with its columns, pandas DataFrame sorted by label_id) of one table of a store (stored in space
    order), read from the store's log and the table's Parquet file."""
    from cellar.schemas import log

    snap = log.snapshot(store)
    entry = next(e for e in snap.entries()
                 if (image is None or e["image"] == image) and (label_image is None or e["label_image"] == label_image))
    entry = {**entry, "columns": snap.columns(entry)}
    frames = [pq.read_table(store / entry["dir"] / f) for f in entry["files"]]
    if len(frames) != 1:
        return entry, None
    df = frames[0].to_pandas()
    return entry, df.sort_values("label_id", ignore_index=True) if "label_id" in df else df


def relocate_source(store: Path, url: str) -> None:
    """Commit the store's (first) table again with its source image at `url` (a copy of the image)."""
    from cellar.schemas import log

    def decide(snap):
        entry = dict(snap.entry(*snap.keys[0]))
        entry["source"] = {**entry["source"], "url": url}
        return [{"add": entry}]

    log.commit(store, "relocate", decide)


def geometry_of(entry: dict) -> registry.Geometry:
    spacing = entry["spacing_um"]
    origin = None
    if spacing is not None:
        factors = [s / p for s, p in zip(spacing, entry["pixel_size"])]
        origin = tuple(t * f for t, f in zip(entry["translation"], factors))
    return registry.Geometry(tuple(entry["axes"]), tuple(spacing) if spacing else None, origin,
                             tuple(c["column"] for c in entry["channels"]))


# Absolute tolerances where a value is mathematically zero (or undefined) and both implementations return
# rounding noise: the high Hu moments of symmetric shapes, the minor eigenvalue of a line.
ATOL = {
    "moments_hu_{k}": 1e-10, "inertia_tensor_eigvals_{k}": 1e-9, "axis_minor_length": 1e-6,
    "axis_minor_length_um": 1e-6, "eccentricity": 1e-6, "axis_major_length": 1e-6, "axis_major_length_um": 1e-6,
    "orientation": 1e-9,  # radians: an angle near 0 has no meaningful relative error
}


def _texture(crop_mask: np.ndarray, values: np.ndarray, levels: int) -> np.ndarray:
    """skimage graycomatrix / graycoprops of an object's crop, quantised and masked as cellar documents."""
    from skimage.feature import graycomatrix, graycoprops

    if not np.isfinite(values).all():
        return np.full(7, np.nan)
    lo, hi = values.min(), values.max()
    q = np.ones(values.shape, np.int64)
    if hi > lo:
        q = np.minimum(np.floor((values - lo) / (hi - lo) * levels).astype(np.int64), levels - 1) + 1
    image = np.zeros(crop_mask.shape, np.uint16)
    image[crop_mask] = q
    glcm = graycomatrix(image, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=levels + 1, symmetric=True)
    glcm = glcm[1:, 1:]  # pairs with the background are not the object's texture
    props = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM", "entropy")
    return np.array([graycoprops(glcm, p).mean() for p in props])


def _references(labels: np.ndarray, channels: np.ndarray, present: np.ndarray, geo: registry.Geometry,
                texture_levels: int | None = None) -> dict:
    """Values of the features scikit-image's regionprops lacks, computed object by object with numpy, scipy
    and skimage.feature."""
    from scipy import stats as sps
    from skimage.measure import perimeter

    ref: dict = {}
    slices = ndi.find_objects(np.searchsorted(np.r_[0, present], labels) * np.isin(labels, present))
    rows = []
    for lab, sl in zip(present, slices):
        mask = labels[sl] == lab
        inner = ndi.binary_erosion(mask, border_value=0)
        row = {"perimeter": perimeter(mask, 4) if geo.ndim == 2 else np.nan}
        if geo.ndim == 3:
            from skimage.measure import marching_cubes, mesh_surface_area

            for key, spacing in (("surface_area", (1.0, 1.0, 1.0)), ("surface_area_um2", tuple(geo.spacing))):
                verts, faces, _, _ = marching_cubes(np.pad(mask, 1).astype(np.float32), 0.5, spacing=spacing)
                row[key] = mesh_surface_area(verts, faces)
            volume = mask.sum() * float(np.prod(geo.spacing))
            area = row["surface_area_um2"] if geo.spacing_um else row["surface_area"]
            row["sphericity"] = np.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area
        for c in range(channels.shape[0]):
            v = channels[c][sl][mask].astype(np.float64)
            row[("sum", c)] = v.sum()
            for q in (5, 25, 75, 95):
                row[(f"q{q:02d}", c)] = np.quantile(v, q / 100)
            row[("mad", c)] = sps.median_abs_deviation(v, scale=1.0)
            const = np.all(v == v[0])
            row[("skewness", c)] = np.nan if const else sps.skew(v)
            row[("kurtosis", c)] = np.nan if const else sps.kurtosis(v)
            row[("boundary_mean", c)] = channels[c][sl][mask & ~inner].astype(np.float64).mean()
            if texture_levels and geo.ndim == 2:
                for name, value in zip(("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "asm",
                                        "entropy"), _texture(mask, v, texture_levels)):
                    row[(f"texture_{name}", c)] = value
        rows.append(row)
    for key in rows[0]:
        ref[key] = np.array([r[key] for r in rows])
    # spatial: brute force over all pairs of centroids
    coords = np.array([np.argwhere(labels == lab).mean(axis=0) for lab in present])
    if geo.spacing_um:
        coords = coords * geo.spacing + np.asarray(geo.origin_um)
    d = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    ref["nn_distance"] = d.min(axis=1) if len(present) > 1 else np.full(len(present), np.nan)
    if len(present) > 1:  # ties (to rounding) go to the smallest label
        ref["nn_id"] = np.array([present[np.flatnonzero(row <= row.min() * (1 + 1e-9))[0]] for row in d])
    else:
        ref["nn_id"] = np.zeros(len(present))
    ref["within"] = (d <= geo.radius).sum(axis=1)
    pairs = set()
    for ax in range(labels.ndim):
        a = np.moveaxis(labels, ax, 0)
        x, y = a[:-1].ravel(), a[1:].ravel()
        keep = (x != y) & (x != 0) & (y != 0)
        pairs |= {(min(p, q), max(p, q)) for p, q in zip(x[keep].tolist(), y[keep].tolist())}
    touching = {int(lab): 0 for lab in present}
    for p, q in pairs:
        touching[p] += 1
        touching[q] += 1
    ref["touching"] = np.array([touching[int(lab)] for lab in present])
    return ref


def _expected(col: registry.Column, ref: dict, df) -> np.ndarray:
    """The reference value of a column without a scikit-image equivalent."""
    f, c = col.feature, col.channel
    simple = {"nearest_neighbor_distance": "nn_distance", "nearest_neighbor_id": "nn_id",
              "neighbors_within_radius": "within", "touching_neighbors": "touching"}
    if f in simple:
        return ref[simple[f]]
    if f in ("surface_area", "surface_area_um2", "sphericity"):
        return ref[f]
    if f == "circularity":
        with np.errstate(divide="ignore"):
            return np.where(ref["perimeter"] > 0, 4 * np.pi * df["area"].to_numpy() / ref["perimeter"] ** 2, np.nan)
    stem = f.split("__")[0]
    return ref[(stem if stem.startswith("texture_") else stem.removeprefix("intensity_"), c)]


def feature_columns(axes: str, spacing_um: tuple[float, ...] | None, channels: list[str],
                    features: str | None = None) -> list[str]:
    """The names of the feature columns (label_id aside), in table order, that the registry declares for an
    image of these spatial `axes`, pixel size and channel column suffixes measured with `features` (as
    `measure --features`; None: the default groups)."""
    geo = registry.Geometry(tuple(axes), spacing_um, None, tuple(channels))
    return [c.name for c in registry.columns(geo, registry.select(features)) if c.feature != "label_id"]


def assert_matches_regionprops(store: Path, labels: np.ndarray, channels: np.ndarray, rtol: float = 1e-6) -> list[str]:
    """Compare every store column with its regionprops equivalent (or an independent reference).

    `labels` is the whole (spatial) label image and `channels` the (C, *spatial) intensities that were
    measured. Returns the names of the columns compared, in table order (none for an empty table).
    """
    entry, df = read_table(store)
    geo = geometry_of(entry)
    present = np.unique(labels)
    present = present[present != 0]
    assert df["label_id"].to_numpy().tolist() == present.astype(np.uint64).tolist()
    if len(present) == 0:
        return []
    small = labels.astype(np.int64)
    selected = registry.select(",".join(entry["features"])) if entry.get("features") else registry.FEATURES
    cols = registry.columns(geo, selected)
    wanted: dict = {}
    for col in cols:
        if col.skimage:
            wanted.setdefault((col.channel, col.skimage_spacing), {"label"}).add(col.skimage.split("-")[0])
    refs = {}
    for (channel, spacing), props in wanted.items():
        kwargs = {"spacing": geo.spacing_um} if spacing else {}
        img = None if channel is None else channels[channel]
        refs[(channel, spacing)] = regionprops_table(small, img, properties=sorted(props), **kwargs)
        assert np.array_equal(refs[(channel, spacing)]["label"], present)
    others = None
    compared = []
    for col in cols:
        if col.feature == "label_id":
            continue
        got = df[col.name].to_numpy()
        if col.skimage is not None:
            expected = np.asarray(refs[(col.channel, col.skimage_spacing)][col.skimage], np.float64)
            if col.skimage_spacing and col.feature.startswith(("centroid", "centroid_weighted")):
                expected = expected + geo.origin_um[col.axis]
        else:
            if others is None:
                others = _references(labels, channels, present, geo, entry.get("texture_levels"))
            expected = _expected(col, others, df)
        if col.feature == "orientation":  # undefined (a tie) for objects with an isotropic inertia tensor
            ev = df[["inertia_tensor_eigvals_0", "inertia_tensor_eigvals_1"]].to_numpy() if "inertia_tensor_eigvals_0" in df else None
            if ev is not None:
                keep = (ev[:, 0] - ev[:, 1]) > 1e-9 * np.maximum(ev[:, 0], 1e-300)
                got, expected = got[keep], expected[keep]
        if geo.ndim == 3 and col.feature in ("area_convex", "area_convex_um{ndim}", "solidity"):
            # scikit-image's Qhull call fails on objects whose voxel centres are coplanar (it returns an empty
            # hull); cellar measures their true hull (documented in the column description)
            solid = np.array([np.linalg.matrix_rank(c - c[0]) == 3
                              for c in (np.argwhere(labels == lab) for lab in present)])
            got, expected = got[solid], expected[solid]
        if col.feature == "orientation":  # an axis: pi/2 and -pi/2 are the same orientation
            got = expected + (got - expected + np.pi / 2) % np.pi - np.pi / 2
        if np.dtype(col.dtype).kind in "iu":
            assert np.array_equal(got, expected.astype(got.dtype)), col.name
        else:
            np.testing.assert_allclose(got, expected, rtol=rtol, atol=ATOL.get(col.feature, 0), err_msg=col.name)
        compared.append(col.name)
    context = [c for c in df.columns if c in registry.CONTEXT_COLUMNS]
    assert compared == [c for c in df.columns if c != "label_id" and c not in context], "store columns not compared"
    return compared


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `cellar ARGS` in a subprocess exactly as a user would (the installed console script)."""
    exe = Path(sys.executable).with_name("cellar")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cellar.cli"]
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
