"""Every measured value equals scikit-image regionprops on the whole image in memory, whatever the chunking."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from cellar import measure
from cellar.ngff.write import write_image
from helpers import assert_matches_regionprops, feature_columns, intensities, nuclei_like, read_table



def _measure(tmp_path: Path, labels, chans, axes, chunks, version="0.5", region_pixels=0, workers=1, halo=6,
             features="all", **kw):
    """Write an NGFF image and measure it one chunk per region. The small default halo makes most objects
    that cross a chunk border too large for it, so they go through the deferred (own crop) path."""
    image = write_image(tmp_path / "img.zarr", chans, axes, chunks=chunks, labels={"cells": labels},
                        version=version, **kw)
    store = tmp_path / "out.cellar"
    measure.measure(str(image), "cells", store, region_pixels=region_pixels, workers=workers, halo=halo,
                    features=features)
    return store


# Chunk shapes: whole-image, moderate, and tiny odd ones where most objects cross chunk borders.
CHUNKS_2D = [(1, 160, 200), (1, 64, 48), (1, 13, 7)]
CHUNKS_3D = [(1, 24, 40, 40), (1, 8, 16, 16), (1, 5, 7, 6)]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("chunks", CHUNKS_2D, ids=lambda c: "x".join(map(str, c[1:])))
def test_2d_equals_regionprops_at_any_chunking(tmp_path, version, chunks):
    labels = nuclei_like((160, 200), 90, seed=1)
    labels[:, :9] = 999_999  # one object along the whole left border, crossing every row of chunks
    chans = intensities((160, 200), 2, seed=2)
    store = _measure(tmp_path, labels, chans, "cyx", chunks, version=version,
                     scale={"y": 0.325, "x": 0.25}, translation={"y": 100.0, "x": -20.0})
    assert assert_matches_regionprops(store, labels, chans) == feature_columns("yx", (0.325, 0.25), ["c0", "c1"], "all")
    _, df = read_table(store)
    assert "perimeter" in df and "perimeter_um" not in df  # anisotropic pixels: no physical perimeter


# Shape features with streamed intensity statistics only: no whole-object kernel reads intensities, so a block's
# halo is read for its labels alone (`KernelPlan.crop_intensities`).
SHAPE_AND_STREAMED = ("area,bbox_min,bbox_max,centroid,intensity_mean,intensity_min,intensity_max,eccentricity,"
                      "orientation,axis_major_length,axis_minor_length,perimeter,solidity,extent,euler_number,"
                      "intensity_std,centroid_weighted")


@pytest.mark.parametrize("chunks", CHUNKS_2D, ids=lambda c: "x".join(map(str, c[1:])))
@pytest.mark.parametrize("workers", [1, 2])
def test_shape_features_with_streamed_intensities_equal_regionprops_at_any_chunking(tmp_path, chunks, workers):
    labels = nuclei_like((160, 200), 90, seed=1)
    chans = intensities((160, 200), 2, seed=2)
    store = _measure(tmp_path, labels, chans, "cyx", chunks, features=SHAPE_AND_STREAMED, halo=16, workers=workers)
    compared = assert_matches_regionprops(store, labels, chans)
    assert compared == feature_columns("yx", (1.0, 1.0), ["c0", "c1"], SHAPE_AND_STREAMED)
    assert {"perimeter", "solidity", "intensity_mean__c0", "intensity_std__c1", "centroid_weighted_x__c0"} <= set(compared)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("chunks", CHUNKS_3D, ids=lambda c: "x".join(map(str, c[1:])))
def test_3d_equals_regionprops_at_any_chunking(tmp_path, version, chunks):
    labels = nuclei_like((24, 40, 40), 25, seed=3, radius=5)
    chans = intensities((24, 40, 40), 1, seed=4)
    store = _measure(tmp_path, labels, chans, "czyx", chunks, version=version,
                     scale={"z": 2.0, "y": 0.5, "x": 0.5})
    entry, df = read_table(store)
    assert "area_um3" in df and "centroid_z" in df and "bbox_max_z" in df
    assert assert_matches_regionprops(store, labels, chans) == feature_columns("zyx", (2.0, 0.5, 0.5), ["c0"], "all")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int16, np.int32, np.int64])
def test_every_integer_label_dtype(tmp_path, dtype):
    labels = nuclei_like((64, 64), 30, seed=5, dtype=np.int64)
    labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape).astype(dtype)  # fits uint8
    chans = intensities((64, 64), 1, seed=6)
    store = _measure(tmp_path, labels, chans, "cyx", (1, 16, 24))
    assert assert_matches_regionprops(store, labels, chans) == feature_columns("yx", (1.0, 1.0), ["c0"], "all")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_every_intensity_dtype(tmp_path, dtype):
    labels = nuclei_like((64, 80), 30, seed=7)
    chans = intensities((64, 80), 2, seed=8, dtype=dtype)
    store = _measure(tmp_path, labels, chans, "cyx", (1, 17, 23))
    # float32: regionprops' np.mean accumulates in float32, cellar in float64 (see the schema description).
    compared = assert_matches_regionprops(store, labels, chans, rtol=1e-5 if dtype == np.float32 else 1e-6)
    assert compared == feature_columns("yx", (1.0, 1.0), ["c0", "c1"], "all")


def test_parallel_workers_give_the_same_table_as_one_process(tmp_path):
    labels = nuclei_like((200, 180), 120, seed=9)
    chans = intensities((200, 180), 3, seed=10)
    image = write_image(tmp_path / "img.zarr", chans, "cyx", chunks=(1, 50, 45), labels={"cells": labels})
    measure.measure(str(image), "cells", tmp_path / "one.cellar", region_pixels=0, workers=1)
    measure.measure(str(image), "cells", tmp_path / "two.cellar", region_pixels=0, workers=2)
    _, one = read_table(tmp_path / "one.cellar")
    _, two = read_table(tmp_path / "two.cellar")
    assert one.columns.tolist() == two.columns.tolist()
    for col in one.columns:  # float sums may merge in another order: equal to rounding
        np.testing.assert_allclose(one[col].to_numpy(np.float64), two[col].to_numpy(np.float64), rtol=1e-12)
    assert assert_matches_regionprops(tmp_path / "two.cellar", labels, chans) == feature_columns(
        "yx", (1.0, 1.0), ["c0", "c1", "c2"])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("chunks", [(512, 512), (64, 64), (37, 91)], ids=lambda c: f"{c[0]}x{c[1]}")
def test_real_dsb2018_nuclei_equal_regionprops(tmp_path, dsb2018, version, chunks):
    image, labels = dsb2018
    store = _measure(tmp_path, labels, image[None], "cyx", (1, *chunks), version=version, scale={"y": 0.3, "x": 0.3})
    compared = assert_matches_regionprops(store, labels, image[None])
    assert compared == feature_columns("yx", (0.3, 0.3), ["c0"], "all")
    assert "perimeter_um" in compared  # square pixels: physical perimeters too
    entry, df = read_table(store)
    assert len(df) == 125 and entry["n_objects"] == 125


def test_time_axis_measures_the_chosen_timepoint(tmp_path):
    labels = np.stack([nuclei_like((48, 64), 12, seed=s) for s in (11, 12)])  # t, y, x
    chans = np.stack([intensities((48, 64), 2, seed=s) for s in (13, 14)])  # t, c, y, x
    image = write_image(tmp_path / "img.zarr", chans, "tcyx", chunks=(1, 1, 16, 16), labels={"cells": labels})
    measure.measure(str(image), "cells", tmp_path / "t1.cellar", timepoint=1, region_pixels=0, workers=1)
    assert assert_matches_regionprops(tmp_path / "t1.cellar", labels[1], chans[1]) == feature_columns(
        "yx", (1.0, 1.0), ["c0", "c1"])
    entry, _ = read_table(tmp_path / "t1.cellar")
    assert entry["timepoint"] == 1


def test_label_image_with_a_channel_axis_of_size_one(tmp_path):
    labels = nuclei_like((40, 40), 10, seed=15)
    chans = intensities((40, 40), 1, seed=16)
    store = _measure(tmp_path, labels[None], chans, "cyx", (1, 16, 16))  # labels as (c=1, y, x)
    assert assert_matches_regionprops(store, labels, chans) == feature_columns("yx", (1.0, 1.0), ["c0"], "all")


def test_selected_channels_and_channel_names_make_the_columns(tmp_path):
    labels = nuclei_like((40, 50), 10, seed=17)
    chans = intensities((40, 50), 3, seed=18)
    image = write_image(tmp_path / "img.zarr", chans, "cyx", labels={"cells": labels},
                        channel_names=["DAPI", "CD8 (AF488)", "CD4"])
    measure.measure(str(image), "cells", tmp_path / "s.cellar", channels=["CD4", "CD8 (AF488)"], workers=1)
    entry, df = read_table(tmp_path / "s.cellar")
    assert [c["name"] for c in entry["channels"]] == ["CD4", "CD8 (AF488)"]
    assert "intensity_mean__CD4" in df and "intensity_mean__CD8_AF488" in df and "intensity_mean__DAPI" not in df
    assert assert_matches_regionprops(tmp_path / "s.cellar", labels, chans[[2, 1]]) == feature_columns(
        "yx", (1.0, 1.0), ["CD4", "CD8_AF488"])


def test_nan_intensities_propagate_like_numpy(tmp_path):
    labels = np.zeros((20, 20), np.uint16)
    labels[2:8, 2:8] = 1
    labels[10:18, 10:18] = 2
    chans = np.full((1, 20, 20), 5.0, np.float32)
    chans[0, 3, 3] = np.nan
    chans[0, 12:14, 12:14] = 9.0
    store = _measure(tmp_path, labels, chans, "cyx", (1, 7, 7))
    _, df = read_table(store)
    assert np.isnan(df.loc[0, ["intensity_mean__c0", "intensity_min__c0", "intensity_max__c0"]].astype(float)).all()
    assert df.loc[1, "intensity_max__c0"] == 9.0 and df.loc[1, "intensity_min__c0"] == 5.0
    np.testing.assert_allclose(df.loc[1, "intensity_mean__c0"], (60 * 5 + 4 * 9) / 64)


def test_non_finite_intensities_give_numpys_and_scipys_values(tmp_path):
    """NaN and +-inf pixels: every intensity column equals numpy / scipy / regionprops on the same pixels
    (NaN propagates to the sums, moments and order statistics; infinities follow numpy's arithmetic)."""
    labels = nuclei_like((64, 96), 12, seed=41)
    chans = intensities((64, 96), 2, seed=42).astype(np.float32)
    # Only pixels inside no other object's bounding box: regionprops multiplies the whole box by the mask,
    # so a neighbour's inf or NaN in the box would turn its own values into NaN (0 * inf).
    boxes = ndi.find_objects(labels)
    cover = np.zeros(labels.shape, int)
    for box in filter(None, boxes):
        cover[box] += 1
    ids = [k + 1 for k, box in enumerate(boxes) if box and ((labels == k + 1) & (cover == 1)).sum() >= 2]
    for k, (value, c) in enumerate([(np.nan, 0), (np.inf, 0), (-np.inf, 1), (np.nan, 1), (np.inf, 1)]):
        ys, xs = np.nonzero((labels == ids[k]) & (cover == 1))
        chans[c, ys[0], xs[0]] = value
        chans[c, ys[-1], xs[-1]] = value
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        store = _measure(tmp_path, labels, chans, "cyx", (1, 16, 16))
        compared = assert_matches_regionprops(store, labels, chans)
        assert compared == feature_columns("yx", (1.0, 1.0), ["c0", "c1"], "all")


def test_sparse_64bit_label_values(tmp_path):
    """Label values far apart (hash-like, up to 2**64 - 1) take the sorting path and stay exact."""
    labels = np.zeros((30, 30), np.uint64)
    big = [np.uint64(2**64 - 1), np.uint64(2**63 + 5), np.uint64(17)]
    labels[0:10, 0:30] = big[0]
    labels[12:20, 3:9] = big[1]
    labels[25:30, 25:30] = big[2]
    chans = np.arange(900, dtype=np.uint16).reshape(1, 30, 30)
    store = _measure(tmp_path, labels, chans, "cyx", (1, 8, 11))
    _, df = read_table(store)
    assert df["label_id"].tolist() == sorted(int(b) for b in big)
    assert df["area"].tolist() == [25, 48, 300]
    assert df.loc[2, "bbox_min_y"] == 0 and df.loc[2, "bbox_max_x"] == 30
    np.testing.assert_allclose(df.loc[2, "intensity_mean__c0"], chans[0, 0:10].mean())


def test_empty_label_image_gives_an_empty_table_with_all_columns(tmp_path):
    labels = np.zeros((32, 32), np.uint32)
    chans = intensities((32, 32), 2, seed=19)
    store = _measure(tmp_path, labels, chans, "cyx", (1, 16, 16))
    entry, df = read_table(store)
    assert len(df) == 0 and entry["n_objects"] == 0
    assert list(df.columns) == ["label_id", *feature_columns("yx", (1.0, 1.0), ["c0", "c1"], "all")]
    assert "perimeter_um" in df and "texture_entropy__c1" in df and "touching_neighbors" in df


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 30), st.integers(1, 30)),
)
def test_random_label_images_and_chunkings_equal_regionprops(data, shape):
    n_values = data.draw(st.integers(1, 6), label="n_values")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    # Blocky random labels: upsampled noise gives objects of varied shapes, often non-convex or split.
    coarse = rng.integers(0, n_values + 1, (max(1, shape[0] // 3), max(1, shape[1] // 3)))
    labels = np.kron(coarse, np.ones((3, 3), np.int64))[: shape[0], : shape[1]]
    labels = np.pad(labels, ((0, shape[0] - labels.shape[0]), (0, shape[1] - labels.shape[1])))
    labels = np.where(rng.random(shape) < 0.1, rng.integers(0, n_values + 1, shape), labels).astype(np.uint16)
    chans = rng.integers(0, 1000, (1, *shape)).astype(np.uint16)
    chunks = (1, data.draw(st.integers(1, shape[0]), label="cy"), data.draw(st.integers(1, shape[1]), label="cx"))
    with tempfile.TemporaryDirectory() as tmp:
        store = _measure(Path(tmp), labels, chans, "cyx", chunks, scale={"y": 0.7, "x": 1.3})
        compared = assert_matches_regionprops(store, labels, chans)
        assert compared == (feature_columns("yx", (0.7, 1.3), ["c0"], "all") if labels.any() else [])


def test_level_one_measures_the_downsampled_pyramid_level(tmp_path):
    labels = nuclei_like((96, 128), 30, seed=20)
    chans = intensities((96, 128), 2, seed=21)
    image = write_image(tmp_path / "img.zarr", chans, "cyx", chunks=(1, 32, 32), labels={"cells": labels},
                        n_levels=2, scale={"y": 0.5, "x": 0.5})
    measure.measure(str(image), "cells", tmp_path / "l1.cellar", level=1, region_pixels=0, workers=1)
    entry, _ = read_table(tmp_path / "l1.cellar")
    assert entry["level"] == 1 and entry["spacing_um"] == [1.0, 1.0] and entry["shape"] == [48, 64]
    assert assert_matches_regionprops(tmp_path / "l1.cellar", labels[::2, ::2], chans[:, ::2, ::2]) == feature_columns(
        "yx", (1.0, 1.0), ["c0", "c1"])


@pytest.mark.parametrize("axes, shape", [("yx", (40, 56)), ("zyx", (12, 30, 26))])
def test_images_without_a_channel_axis(tmp_path, axes, shape):
    labels = nuclei_like(shape, 12, seed=22, radius=5)
    chans = intensities(shape, 1, seed=23)
    store = _measure(tmp_path, labels, chans[0], axes, tuple(max(3, s // 3) for s in shape))
    entry, df = read_table(store)
    assert [c["name"] for c in entry["channels"]] == ["c0"] and "intensity_mean__c0" in df
    assert assert_matches_regionprops(store, labels, chans) == feature_columns(axes, (1.0,) * len(axes), ["c0"], "all")


@pytest.mark.parametrize("halo, region_pixels", [(64, 0), (64, 1 << 22), (1, 0)])
def test_halo_sizes_and_region_sizes_give_the_same_exact_table(tmp_path, halo, region_pixels):
    """A large halo measures crossing objects inside the block; halo 1 defers nearly all of them."""
    labels = nuclei_like((150, 170), 70, seed=24, radius=9)
    chans = intensities((150, 170), 1, seed=25)
    store = _measure(tmp_path, labels, chans, "cyx", (1, 40, 45), halo=halo, region_pixels=region_pixels)
    assert assert_matches_regionprops(store, labels, chans) == feature_columns("yx", (1.0, 1.0), ["c0"], "all")


@pytest.mark.parametrize("dtype", [np.uint16, np.float64])
def test_streamed_and_whole_object_intensity_statistics_agree(tmp_path, dtype):
    """Sum, mean, std, min, max and weighted centroids come from the streaming pass when only they are asked
    for, and from the whole-object kernel when distribution features are measured too: the same values."""
    labels = nuclei_like((90, 110), 40, seed=21)
    chans = intensities((90, 110), 2, seed=22, dtype=dtype)
    chans[1, 40:50, 40:60] = 7  # narrow value ranges next to wide ones (counting sort in one and two passes)
    streaming = "intensity_sum,intensity_mean,intensity_std,intensity_min,intensity_max,centroid_weighted"
    _measure(tmp_path / "a", labels, chans, "cyx", (1, 23, 31), features=streaming)
    _measure(tmp_path / "b", labels, chans, "cyx", (1, 23, 31), features=f"{streaming},intensity_median")
    _, a = read_table(tmp_path / "a" / "out.cellar")
    _, b = read_table(tmp_path / "b" / "out.cellar")
    assert len(a) == len(b) > 30
    for col in a.columns:
        np.testing.assert_allclose(a[col].to_numpy(np.float64), b[col].to_numpy(np.float64), rtol=1e-12, err_msg=col)
    for name, features in (("a", streaming), ("b", f"{streaming},intensity_median")):
        compared = assert_matches_regionprops(tmp_path / name / "out.cellar", labels, chans)
        assert compared == feature_columns("yx", (1.0, 1.0), ["c0", "c1"], features)
