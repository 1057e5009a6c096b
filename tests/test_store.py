"""The store: schema contract, provenance in the log, Hive layout, Parquet encoding, atomic commits."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellar import measure
from cellar import schemas
from cellar.measure import features as registry
from cellar.measure import store_write
from cellar.ngff.write import write_image
from cellar.schemas import log, rowfile
from cellar.schemas import store as layout
from cellar.schemas.errors import StoreError
from cellar.schemas.store import spatial_order
from helpers import intensities, nuclei_like, read_table, run_cli


@pytest.fixture
def image(tmp_path) -> Path:
    labels = nuclei_like((64, 64), 20, seed=1)
    return write_image(tmp_path / "slide.ome.zarr", intensities((64, 64), 2, seed=2), "cyx", chunks=(1, 32, 32),
                       labels={"nuclei": labels, "cells": labels}, channel_names=["DAPI", "CD8"],
                       scale={"y": 0.5, "x": 0.5})


def test_schema_json_is_generated_from_the_registry():
    committed = json.loads((Path(schemas.__file__).parent / "objects.json").read_text())
    assert committed == registry.schema_json(), "run `python -m cellar.measure --write-schema --update-readme`"
    assert schemas.objects_schema() == committed


def test_every_feature_declares_dtype_unit_and_description():
    for f in registry.FEATURES:
        assert f.description and f.dtype in ("uint64", "int64", "float64"), f.name
        assert f.unit or f.key or f.name.endswith("_id"), f.name  # only identifiers have no unit


def test_the_log_records_provenance_and_concrete_columns(tmp_path, image):
    store = tmp_path / "s.cellar"
    measure.measure(str(image), "nuclei", store, workers=1)
    marker = json.loads((store / "cellar.json").read_text())
    assert marker["format"] == "cellar-store" and marker["format_version"] == 2
    assert marker["cellar_version"] == schemas.cellar_version()
    commit = json.loads((store / "log" / f"{1:020d}.json").read_text())
    assert commit["version"] == 1 and commit["operation"] == "measure"
    (action,) = commit["actions"]
    entry, _ = read_table(store)
    assert action["add"] == {k: v for k, v in entry.items() if k != "columns"}
    assert entry["cellar_version"] == schemas.cellar_version()
    assert entry["image"] == "slide" and entry["label_image"] == "nuclei"
    assert entry["source"]["url"] == str(image.resolve())
    assert entry["source"]["ngff_version"] == "0.5" and entry["source"]["label_path"] == "labels/nuclei/0"
    assert entry["level"] == 0 and entry["pixel_size"] == [0.5, 0.5] and entry["pixel_unit"] == ["micrometer"] * 2
    assert [c["name"] for c in entry["channels"]] == ["DAPI", "CD8"]
    assert entry["features"] == [f.name for f in registry.select(None) if not f.key]
    assert entry["radius"] == 20.0 and entry["halo"] == 64
    assert "created" in entry and entry["n_objects"] == len(np.unique(nuclei_like((64, 64), 20, seed=1))) - 1
    names = [c["name"] for c in entry["columns"]]
    assert names[:3] == ["image", "label_image", "label_id"] and "intensity_mean__CD8" in names
    assert all(c["description"] for c in entry["columns"])
    assert json.loads((store / "schema.json").read_text()) == schemas.objects_schema()


def test_parquet_is_hive_partitioned_lz4_in_space_order_with_units_in_field_metadata(tmp_path, image):
    store = tmp_path / "s.cellar"
    measure.measure(str(image), "nuclei", store, workers=1)
    entry, df = read_table(store)
    assert entry["dir"] == "objects/image=slide/label_image=nuclei"
    path = store / entry["dir"] / entry["files"][0]
    meta = pq.ParquetFile(path).metadata
    assert meta.row_group(0).column(0).compression == "LZ4"
    schema = pq.read_schema(path)
    assert schema.field("area_um2").metadata[b"unit"] == b"micrometer^2"
    assert schema.field("label_id").type == "uint64"
    assert df["label_id"].is_monotonic_increasing  # read_table sorts; the file is in space order:
    stored = pq.read_table(path, columns=["label_id", "centroid_y", "centroid_x"]).to_pandas()
    order = spatial_order(stored.centroid_y.to_numpy(), stored.centroid_x.to_numpy())
    np.testing.assert_array_equal(order, np.arange(len(stored)))


def test_a_store_holds_several_label_images_keeps_same_settings_and_refuses_others_without_overwrite(tmp_path, image):
    store = tmp_path / "s.cellar"
    measure.measure(str(image), "nuclei", store, workers=1)
    measure.measure(str(image), "cells", store, workers=1)
    snap = log.snapshot(store)
    assert snap.keys == [("slide", "nuclei"), ("slide", "cells")] and snap.version == 2
    again = measure.measure(str(image), "nuclei", store, workers=1)  # same settings: kept, not measured again
    assert again.skipped and log.snapshot(store).version == 2
    with pytest.raises(StoreError, match="already holds image=slide label_image=nuclei, measured with other "
                                         "settings; pass --overwrite"):
        measure.measure(str(image), "nuclei", store, workers=1, channels=["CD8"])
    old_file = snap.entry("slide", "nuclei")["files"][0]
    measure.measure(str(image), "nuclei", store, workers=1, channels=["CD8"], overwrite=True)
    entry, df = read_table(store, label_image="nuclei")
    assert entry["files"][0] != old_file and "intensity_mean__DAPI" not in df
    # the replaced files (Parquet and row file) stay for readers of the earlier state, until older than the retention
    with_rows = lambda names: sorted(n for name in names for n in (name, rowfile.path_of(name)))  # noqa: E731
    assert sorted(p.name for p in (store / entry["dir"]).iterdir()) == with_rows([old_file, *entry["files"]])
    for name in with_rows([old_file]):
        os.utime(store / entry["dir"] / name, (time.time() - store_write.RETAIN_S - 1,) * 2)
    killed, recent = store / "log" / ".tmp-killed-commit", store / "log" / "columns" / ".tmp-in-progress"
    for path in (killed, recent):  # what a writer killed while creating a commit leaves, and one at work
        path.write_text("{}")
    os.utime(killed, (time.time() - store_write.RETAIN_S - 1,) * 2)
    r = run_cli("vacuum", str(store))
    assert r.returncode == 0 and "3 files no commit lists removed" in r.stderr, r.stderr
    assert sorted(p.name for p in (store / entry["dir"]).iterdir()) == with_rows(entry["files"])
    assert not killed.exists() and recent.exists()


def test_a_failed_write_leaves_no_store_and_no_temporary_files(tmp_path, image, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(store_write.pq, "ParquetWriter", boom)
    store = tmp_path / "new.cellar"
    with pytest.raises(OSError, match="disk full"):
        measure.measure(str(image), "nuclei", store, workers=1)
    assert not store.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.ome.zarr"]


def test_a_failed_write_into_an_existing_store_keeps_the_old_state(tmp_path, image, monkeypatch):
    store = tmp_path / "s.cellar"
    measure.measure(str(image), "nuclei", store, workers=1)
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}

    real = log._create_if_absent

    def fail_on_commit(path, data):
        if path.parent.name == log.LOG_DIR:
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(log, "_create_if_absent", fail_on_commit)
    with pytest.raises(OSError):
        measure.measure(str(image), "nuclei", store, workers=1, overwrite=True)
    with pytest.raises(OSError):
        measure.measure(str(image), "cells", store, workers=1)
    after = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert after == before


def test_stray_files_of_a_crashed_write_are_invisible_and_removed_by_the_next_once_old(tmp_path, image):
    store = tmp_path / "s.cellar"
    measure.measure(str(image), "nuclei", store, workers=1)
    entry, _ = read_table(store)
    stray = store / entry["dir"] / "part-deadbeef.parquet.tmp"
    stray.write_bytes(b"half a file")
    young = store / entry["dir"] / "part-cafe.parquet"  # another writer's, being written: kept
    young.write_bytes(b"a file in the making")
    os.utime(stray, (time.time() - store_write.RETAIN_S - 1,) * 2)
    from cellar import query

    assert query.open(store).sql("SELECT count(*) FROM objects").fetchall()[0][0] == entry["n_objects"]
    measure.measure(str(image), "nuclei", store, workers=1, overwrite=True)
    assert not stray.exists() and young.exists()


def test_output_that_is_not_a_store_is_never_touched(tmp_path, image):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "a.txt").write_text("precious")
    with pytest.raises(StoreError, match="not a cellar store; refusing"):
        measure.measure(str(image), "nuclei", keep, workers=1)
    assert [p.name for p in keep.iterdir()] == ["a.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    measure.measure(str(image), "nuclei", empty, workers=1)
    assert log.snapshot(empty).keys == [("slide", "nuclei")]


def test_readme_feature_table_is_generated_from_the_registry():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert registry.markdown_table() in readme, "run `python -m cellar.measure --write-schema --update-readme`"


def test_store_files_get_the_umask_permissions_so_a_group_can_read_them(tmp_path, image):
    store = tmp_path / "s.cellar"
    old = os.umask(0o022)
    try:
        measure.measure(str(image), "nuclei", store, workers=1)
        from cellar.query import cachebuild

        cachebuild.build(store, rows=True)
    finally:
        os.umask(old)
    files = [p for p in store.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"cellar.json", f"{1:020d}.json", "schema.json"} and len(files) >= 8
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) |
                     st.sampled_from(["", "a", "x/y", "..", "s01", "part-1.parquet"]),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
                         ["name", "dtype", "files", "dir", "version", "channels", "index", "column"]), inner, max_size=4),
                     max_leaves=12)


def _entry() -> dict:
    return {"image": "s01", "label_image": "nuclei", "dir": "objects/image=s01/label_image=nuclei",
            "files": ["part-1.parquet"], "n_objects": 3, "columns_id": "ab", "created": "2026",
            "channels": [{"index": 0, "name": "DAPI", "column": "c0"}], "pixel_size": [0.5, 1],
            "spacing_um": None, "timepoint": None, "annotations": [{
                "version": 1, "dir": "annotations/v", "files": ["a.parquet"], "columns": [{"name": "t", "dtype": "string"}],
                "source": "x.csv", "created": "2026"}]}


@settings(max_examples=400, deadline=None)
@given(path=st.lists(st.sampled_from(["image", "files", "channels", "pixel_size", "annotations", "spacing_um",
                                      0, "index", "columns", "dir", "version", "name"]), min_size=1, max_size=4),
       value=_JSON)
def test_the_compiled_entry_check_passes_exactly_what_the_spec_walk_passes(path, value):
    """`schemas.store._passes` (the fast check of every entry a query reads) agrees with `_spec_problem` (which
    names the problem) on JSON values: an entry with one value replaced somewhere along `path`."""
    entry = _entry()
    node = entry
    for key in path[:-1]:
        child = node.get(key) if isinstance(node, dict) else node[key] if isinstance(node, list) and isinstance(key, int) and key < len(node) else None
        if not isinstance(child, (dict, list)):
            break
        node = child
    last = path[-1]
    if isinstance(node, dict) and isinstance(last, str):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    entry = json.loads(json.dumps(entry))
    walk = layout._spec_problem(entry, layout.TABLE_SPEC, "")
    assert layout._TABLE_OK(entry) == (walk is None), walk
