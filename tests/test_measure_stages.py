"""The stages of `measure` one at a time: plan, reduce blocks, finish objects, commit (`cellar.measure.run`)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellar.measure import features as registry
from cellar.measure import run, store_write
from cellar.measure.accumulate import Stats
from cellar.measure.block import KernelPlan
from cellar.ngff.write import write_image
from cellar.schemas import log
from cellar.schemas.errors import StoreError
from helpers import intensities, nuclei_like, read_table

SHAPES = {2: (48, 64), 3: (10, 40, 48)}


def _image(path: Path, ndim: int, chunks: tuple[int, ...], seed: int = 5) -> Path:
    """Touching nuclei in two uint16 channels, 2D or 3D, the same for a seed whatever the chunks."""
    shape, axes = SHAPES[ndim], "zyx"[3 - ndim:]
    labels = nuclei_like(shape, 14 if ndim == 2 else 10, seed=seed, radius=7.0)
    return write_image(path, intensities(shape, 2, seed=seed + 1), "c" + axes, chunks=chunks, labels={"nuclei": labels},
                       channel_names=["DAPI", "CD8"], scale=dict.fromkeys(axes, 0.5))


def _plan(image: Path, out: Path, features: str | None = None, **options) -> run.MeasurePlan:
    target = run.target_table(str(image), "nuclei", out, features=features)
    assert run.kept_table(target) is None
    return run.plan_measurement(target, **options)


def _finished(plan: run.MeasurePlan, workers: int = 1) -> tuple[run.ReducedBlocks, run.FinishedObjects]:
    with run.Executor(plan.read, workers) as ex:
        reduced = run.reduce_blocks(plan, ex, progress=False)
        return reduced, run.finish_objects(plan, reduced, ex)


def _table(plan: run.MeasurePlan, objects: run.FinishedObjects) -> dict[str, np.ndarray]:
    """The finished columns of every object, by column name, rows by label id."""
    table = pa.concat_tables(run.row_groups(plan, objects, provenance={}))
    order = np.argsort(table.column("label_id").to_numpy())
    return {name: table.column(name).to_numpy()[order] for name in table.column_names}


@pytest.mark.parametrize("ndim, chunks, region_pixels", [
    (2, (1, 16, 16), 0), (2, (1, 16, 16), 1024), (2, (1, 7, 9), 100), (2, (1, 48, 64), run.DEFAULT_REGION_PIXELS),
    (3, (1, 4, 16, 16), 0), (3, (1, 3, 11, 16), 2000),
])
def test_the_plan_covers_every_pixel_once_in_regions_of_whole_chunks(tmp_path, ndim, chunks, region_pixels):
    image = _image(tmp_path / "img.ome.zarr", ndim, chunks)
    plan = _plan(image, tmp_path / "s.cellar", region_pixels=region_pixels)
    hits = np.zeros(SHAPES[ndim], np.int64)
    for region in plan.regions:
        hits[region] += 1
        for s, c, n in zip(region, chunks[1:], SHAPES[ndim]):
            assert s.start % c == 0 and (s.stop % c == 0 or s.stop == n)  # chunk-aligned
        if region_pixels:
            assert np.prod([s.stop - s.start for s in region]) <= max(region_pixels, np.prod(chunks))
    assert (hits == 1).all() and plan.read.shape == SHAPES[ndim]


def test_the_plan_decides_kernels_columns_and_halo_from_the_features(tmp_path):
    image = _image(tmp_path / "img.ome.zarr", 2, (1, 16, 16))
    plain = _plan(image, tmp_path / "s.cellar", features="area,centroid", halo=9)
    assert not plain.read.kernels.crop and not plain.read.kernels.touching and plain.read.halo == 0
    assert plain.read.channels == ()  # no intensity feature: the image is not read
    assert [c["name"] for c in plain.columns] == ["image", "label_image", "label_id", "area", "centroid_y",
                                                  "centroid_x"]
    full = _plan(image, tmp_path / "s.cellar", features="all", halo=9)
    k = full.read.kernels
    assert k.shape and k.intensity_crop and k.texture and k.touching and full.read.halo == 9
    assert full.read.channels == (0, 1) and {"intensity_q95__CD8", "texture_asm__DAPI"} <= {
        c["name"] for c in full.columns}


def test_the_streaming_pass_computes_the_statistics_the_features_ask_for(tmp_path):
    """Squared deviations and weighted coordinate sums are computed where a selected feature reads them
    (`Feature.streams`), and their features then equal those of the default set (where the whole-object kernel
    gives them)."""
    image = _image(tmp_path / "img.ome.zarr", 2, (1, 16, 16))
    asked = {features: _plan(image, tmp_path / f"{k}.cellar", features=features).read.kernels
             for k, features in enumerate(["intensity_mean,intensity_max", "intensity_std", "centroid_weighted", None])}
    assert [(k.spread, k.weighted) for k in asked.values()] == [(False, False), (True, False), (False, True),
                                                                 (True, True)]
    lean = _plan(image, tmp_path / "lean.cellar", features="intensity_std,centroid_weighted,intensity_min")
    default = _plan(image, tmp_path / "default.cellar")
    assert not lean.read.kernels.intensity_crop and default.read.kernels.intensity_crop
    got, want = _table(lean, _finished(lean)[1]), _table(default, _finished(default)[1])
    names = [n for n in got if n.startswith(("intensity_", "centroid_weighted"))]
    assert len(names) == 8  # two channels: std, min, and weighted y and x
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("ndim, features", [(2, None), (2, "all"), (2, "area,intensity_mean"),
                                           (2, "intensity_std,centroid_weighted"),
                                           (2, "perimeter,solidity,intensity_mean,intensity_std,centroid_weighted"),
                                           (3, None), (3, "solidity,intensity_mean,intensity_max")])
def test_reducing_blocks_in_different_chunkings_gives_the_same_objects(tmp_path, ndim, features):
    """One chunk per region with a 2-pixel halo (objects cross regions and are measured on crops of their own,
    in two workers) against the whole image as one region: the same statistics and columns."""
    whole = _image(tmp_path / "whole.ome.zarr", ndim, (1, *SHAPES[ndim]))
    cut = _image(tmp_path / "cut.ome.zarr", ndim, (1, 16, 16) if ndim == 2 else (1, 3, 16, 16))
    one = _plan(whole, tmp_path / "a.cellar", features=features)
    many = _plan(cut, tmp_path / "b.cellar", features=features, region_pixels=0, halo=2)
    assert len(one.regions) == 1 and len(many.regions) > 8
    one_reduced, one_objects = _finished(one)
    many_reduced, many_objects = _finished(many, workers=2)
    a, b = one_reduced.stats, many_reduced.stats
    for field in ("ids", "count", "coord_sum", "bbox_min", "bbox_max"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for field in ("isum", "imin", "imax", "wcoord"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))  # integer intensities: exact
    np.testing.assert_allclose(a.m2, b.m2, rtol=1e-12)
    kernels = many.read.kernels
    assert np.isnan(a.m2).all() == (not kernels.spread) or kernels.intensity_crop  # computed where asked
    assert np.isnan(a.wcoord).all() == (not kernels.weighted) or kernels.intensity_crop
    if many.read.kernels.crop:  # some objects were seen whole by no block: measured on crops of their own
        assert sum(len(ids) for ids, _, _ in many_reduced.crops) < len(b)
    one_table, many_table = _table(one, one_objects), _table(many, many_objects)
    assert one_table.keys() == many_table.keys()
    for name in one_table:
        np.testing.assert_allclose(one_table[name].astype(float), many_table[name].astype(float), rtol=1e-9,
                                   atol=1e-9, err_msg=name)


def test_finish_and_commit_run_separately_and_write_what_measure_writes(tmp_path):
    image = _image(tmp_path / "img.ome.zarr", 2, (1, 16, 16))
    t0 = time.perf_counter()
    plan = _plan(image, tmp_path / "staged.cellar", region_pixels=0, halo=3, workers=1)
    with run.Executor(plan.read, 1) as ex:
        reduced = run.reduce_blocks(plan, ex, progress=False)
        first = run.finish_objects(plan, reduced, ex)
        again = run.finish_objects(plan, reduced, ex)  # finishing leaves the reduced blocks as they were
    for name, values in _table(plan, first).items():
        np.testing.assert_array_equal(values, _table(plan, again)[name])
    run.commit_table(plan, first, t0)
    elapsed = time.perf_counter() - t0
    run.measure(str(image), "nuclei", tmp_path / "measured.cellar", region_pixels=0, halo=3, workers=1)
    staged_entry, staged = read_table(tmp_path / "staged.cellar")
    measured_entry, measured = read_table(tmp_path / "measured.cellar")
    assert staged.equals(measured) and len(staged) == len(first) == staged_entry["n_objects"]
    per_run = {"created", "files", "elapsed_s"}
    assert {k: v for k, v in staged_entry.items() if k not in per_run} == {
        k: v for k, v in measured_entry.items() if k not in per_run}
    assert 0 < staged_entry["elapsed_s"] <= elapsed and measured_entry["elapsed_s"] > 0


def test_the_elapsed_time_is_recorded_after_the_last_row_group_is_written_and_before_the_commit(tmp_path):
    """`store_write.write_table(..., written=)`: the hook `commit_table` records the elapsed time in runs once
    every row group is in the file, before the entry is committed, and what it adds is in the committed entry."""
    image = _image(tmp_path / "img.ome.zarr", 2, (1, 16, 16))
    run.measure(str(image), "nuclei", tmp_path / "a.cellar", workers=1)
    entry, frame = read_table(tmp_path / "a.cellar")
    table = pq.read_table(tmp_path / "a.cellar" / entry["dir"] / entry["files"][0])
    taken, seen = [], {}
    store = tmp_path / "b.cellar"

    def tables():
        for k in range(2):
            taken.append(k)
            yield table.slice(k * (len(table) // 2), len(table) // 2 + k * (len(table) % 2))

    def written(done: dict) -> None:
        seen.update(taken=list(taken), committed=log.is_store(store) and (done["image"], done["label_image"])
                    in log.snapshot(store))
        done["elapsed_s"] = 1.5

    fresh = {k: v for k, v in entry.items() if k not in ("dir", "files", "created", "columns_id", "elapsed_s")}
    store_write.write_table(store, {**fresh, "columns": log.read_columns(tmp_path / "a.cellar", entry["columns_id"])},
                            tables(), written=written)
    assert seen == {"taken": [0, 1], "committed": False}
    assert read_table(store)[0]["elapsed_s"] == 1.5 and read_table(store)[1].equals(frame)


def test_kept_table_keeps_a_table_measured_with_the_same_settings(tmp_path):
    image = _image(tmp_path / "img.ome.zarr", 2, (1, 16, 16))
    result = run.measure(str(image), "nuclei", tmp_path / "s.cellar", workers=1)
    assert run.kept_table(run.target_table(str(image), "nuclei", tmp_path / "s.cellar")) == result.n_objects
    other = run.target_table(str(image), "nuclei", tmp_path / "s.cellar", features="area")
    with pytest.raises(StoreError, match="measured with other settings; pass --overwrite"):
        run.kept_table(other)
    replace = run.target_table(str(image), "nuclei", tmp_path / "s.cellar", features="area", overwrite=True)
    assert run.kept_table(replace) is None


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_registry_reads_only_columns_the_kernels_write(ndim):
    """Every feature finished from whole-object kernel columns named exactly as `shape_kernels` declares them
    (`KernelPlan.crop_columns`): a feature reading another name fails here with a KeyError."""
    geo = registry.Geometry(("z", "y", "x")[3 - ndim:], (0.5,) * ndim, (0.0,) * ndim, ("DAPI", "CD8"))
    plan = KernelPlan(ndim=ndim, shape=True, intensity_crop=True, texture=ndim == 2)
    n = 3
    rng = np.random.default_rng(1)
    stats = Stats(np.array([1, 2, 3], np.uint64), np.array([4, 5, 6]), rng.integers(1, 9, (n, 3)) * 10,
                  np.zeros((n, 3), np.int64), np.full((n, 3), 3), *(rng.uniform(1, 2, (n, 2)) for _ in range(4)),
                  rng.uniform(1, 2, (n, 2, 3)))
    crop = {name: rng.uniform(1, 2, n) for name in plan.crop_columns(2)}
    results = registry.Results(stats, crop=crop, touching=np.zeros(n, np.int64))
    with np.errstate(all="ignore"):
        values = registry.compute_columns(results, geo, registry.FEATURES)
    assert {c.name for c in registry.columns(geo)} == set(values)


def test_feret_diameters_are_computed_only_when_asked_for(tmp_path):
    """The Feret diameters (45% of the 2D shape kernel's time) run only when a feature asks for them; the other
    shape columns are the same either way."""
    from cellar import measure

    image = _image(tmp_path / "img.ome.zarr", 2, (1, 24, 32))
    assert _plan(image, tmp_path / "a.cellar", "perimeter,solidity,euler_number").read.kernels.feret is False
    assert _plan(image, tmp_path / "a.cellar", "perimeter,feret_diameter_max").read.kernels.feret is True
    for name, features in (("some", "perimeter,solidity,euler_number,area"), ("all", "morphology")):
        measure.measure(str(image), "nuclei", tmp_path / f"{name}.cellar", features=features, workers=1, progress=False)
    _, some = read_table(tmp_path / "some.cellar")
    _, every = read_table(tmp_path / "all.cellar")
    assert "feret_diameter_max" not in some.columns and every["feret_diameter_max"].notna().all()
    for column in ("perimeter", "solidity", "euler_number", "area"):
        np.testing.assert_array_equal(some[column].to_numpy(), every[column].to_numpy())
