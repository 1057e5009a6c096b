"""Shared generators and the registry-driven comparison against scikit-image regionprops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.measure import regionprops_table

from measure import features as registry

DATA = Path(__file__).parent / "data"


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


def read_table(store: Path, image: str | None = None, label_image: str | None = None) -> tuple[dict, "object"]:
    """(manifest entry, pandas DataFrame) of one table of a store."""
    manifest = json.loads((store / "manifest.json").read_text())
    entry = next(t for t in manifest["tables"]
                 if (image is None or t["image"] == image) and (label_image is None or t["label_image"] == label_image))
    frames = [pq.read_table(store / entry["dir"] / f) for f in entry["files"]]
    return entry, frames[0].to_pandas() if len(frames) == 1 else None


def geometry_of(entry: dict) -> registry.Geometry:
    spacing = entry["spacing_um"]
    origin = None
    if spacing is not None:
        factors = [s / p for s, p in zip(spacing, entry["pixel_size"])]
        origin = tuple(t * f for t, f in zip(entry["translation"], factors))
    return registry.Geometry(tuple(entry["axes"]), tuple(spacing) if spacing else None, origin,
                             tuple(c["column"] for c in entry["channels"]))


def assert_matches_regionprops(store: Path, labels: np.ndarray, channels: np.ndarray, rtol: float = 1e-6) -> int:
    """Compare every store column with its regionprops equivalent (or a direct numpy computation).

    `labels` is the whole (spatial) label image and `channels` the (C, *spatial) intensities that were
    measured. Returns the number of columns compared.
    """
    entry, df = read_table(store)
    geo = geometry_of(entry)
    present = np.unique(labels)
    present = present[present != 0]
    assert df["label_id"].to_numpy().tolist() == present.astype(np.uint64).tolist()
    if len(present) == 0:
        return 0
    small = labels.astype(np.int64)
    cache: dict = {}

    def rp(channel: int | None, spacing: bool) -> dict:
        key = (channel, spacing)
        if key not in cache:
            kwargs = {"spacing": geo.spacing_um} if spacing else {}
            img = None if channel is None else channels[channel]
            props = ["label", "num_pixels", "area", "bbox", "centroid"]
            if img is not None:
                props += ["intensity_mean", "intensity_std", "intensity_min", "intensity_max"]
            cache[key] = regionprops_table(small, img, properties=props, **kwargs)
        return cache[key]

    compared = 0
    for col in registry.columns(geo):
        got = df[col.name].to_numpy()
        if col.skimage is not None:
            ref = rp(col.channel, col.skimage_spacing)
            assert np.array_equal(ref["label"], present)
            expected = np.asarray(ref[col.skimage], np.float64)
            if col.skimage_spacing and col.axis is not None:
                expected = expected + geo.origin_um[col.axis]
        elif col.feature.startswith("intensity_sum"):
            expected = ndi.sum_labels(channels[col.channel].astype(np.float64), small, present)
        elif col.feature == "label_id":
            continue
        else:
            raise AssertionError(f"no reference for column {col.name}")
        if np.dtype(col.dtype).kind in "iu":
            assert np.array_equal(got, expected.astype(got.dtype)), col.name
        else:
            np.testing.assert_allclose(got, expected, rtol=rtol, atol=0, err_msg=col.name)
        compared += 1
    return compared


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `cellar ARGS` in a subprocess exactly as a user would (the installed console script)."""
    exe = Path(sys.executable).with_name("cellar")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cellar.cli"]
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="session")
def dsb2018() -> tuple[np.ndarray, np.ndarray]:
    """The real DSB2018 nuclei image (uint16) and its hand-made labels (125 nuclei, values up to 183)."""
    return tifffile.imread(DATA / "dsb2018_image.tif"), tifffile.imread(DATA / "dsb2018_labels.tif")
