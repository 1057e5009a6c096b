"""A store of many tables: partition pruning before any file is opened, counts from the log, and answers equal
to those of the whole store's views."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cellar import measure
from cellar import query
from cellar.query.sql import partition_terms
from cellar.schemas.errors import StoreError
from cellar.ngff.write import write_image
from helpers import intensities, nuclei_like

KEYS = ["image", "label_image", "label_id"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Three slides with nuclei and cells; s0 has one channel, the others two (two column lists); the third is
    named "s'2", which the store keeps as its Hive partition value "s_2"."""
    tmp = tmp_path_factory.mktemp("cohort")
    store = tmp / "c.cellar"
    for k, n_channels in enumerate((1, 2, 2)):
        image = write_image(tmp / f"s{k}.zarr", intensities((48, 64), n_channels, seed=k), "cyx", chunks=(1, 24, 32),
                            labels={"nuclei": nuclei_like((48, 64), 12, seed=k),
                                    "cells": nuclei_like((48, 64), 8, radius=9.0, seed=k + 5)})
        for label_image in ("nuclei", "cells"):
            measure.measure(str(image), label_image, store, workers=1, image_name="s'2" if k == 2 else f"s{k}")
    return store


@pytest.mark.parametrize("filters, expected", [
    (["image = 's1'"], ({"s1"}, None, True)),
    (["'s1' = image AND label_image IN ('cells', 'nuclei')"], ({"s1"}, {"cells", "nuclei"}, True)),
    (["image IN ('s0', 's1')", "image = 's1' AND area > 3"], ({"s1"}, None, False)),
    (["(image = 'it''s' AND area BETWEEN 1 AND 3) AND \"label_image\" = 'x'"], ({"it's"}, {"x"}, False)),
    (["image = 's1' AND label_image = \"x\""], ({"s1"}, None, False)),  # "x": a column
    (['"image" = \'s1\''], ({"s1"}, None, True)),
    (["area > 5 OR image = 's1' AND label_image = 'cells'"], (None, None, False)),  # a OR (b AND c)
    (["(area > 5 OR image = 's1') AND label_image = 'cells'"], (None, {"cells"}, False)),
    (["NOT image = 's1'"], (None, None, False)),
    (["image <> 's1'", "image = label_image"], (None, None, False)),
    (["CASE WHEN area > 3 AND image = 's1' THEN 1 ELSE 0 END = 1"], (None, None, False)),
    (["image = 's1' COLLATE nocase"], (None, None, False)),
    (["image = 's0'", "image = 's1'"], (set(), None, True)),
])
def test_partition_terms_take_only_what_restricts_every_row(filters, expected):
    assert partition_terms(filters) == expected


FILTERS = [
    "image = 's1'",
    "image = 's0' AND area > 20",
    "label_image = 'cells'",
    "image IN ('s0', 's_2') AND label_image = 'nuclei'",
    "image = 's_2' AND label_image = 'cells'",
    "image = 'nowhere'",
    "area > 30 OR image = 's1' AND label_image = 'cells'",
    "intensity_mean__c1 > 0 AND image = 's0'",  # s0 has no second channel: NULL, no row
    "intensity_mean__c1 IS NULL AND label_image = 'nuclei'",
]


@pytest.mark.parametrize("condition", FILTERS)
def test_a_pruned_query_answers_as_the_whole_store_does(cohort, condition):
    objs = query.open(cohort)
    whole = objs.sql(f"SELECT * FROM objects WHERE {condition}").to_arrow_table()
    q = objs.where(condition)
    got = q.to_arrow()
    assert sorted(got.column_names) == sorted(whole.column_names) == sorted(objs.column_names)
    got = got.select(whole.column_names).sort_by([(k, "ascending") for k in KEYS])
    assert got.equals(whole.sort_by([(k, "ascending") for k in KEYS]))
    assert q.count() == whole.num_rows
    assert q.sql("SELECT count(*) FROM q").fetchall() == [(whole.num_rows,)]
    if len({(i, lbl) for i, lbl in zip(whole.column("image").to_pylist(), whole.column("label_image").to_pylist())}) == 1:
        assert sorted(q.label_ids().tolist()) == sorted(whole.column("label_id").to_pylist())


def test_the_image_name_is_its_partition_value_for_every_engine(cohort):
    objs = query.open(cohort)
    assert sorted({key[0] for key in objs.snapshots[0].keys}) == ["s0", "s1", "s_2"]
    assert objs.sql("SELECT DISTINCT image FROM objects ORDER BY 1").fetchall() == [("s0",), ("s1",), ("s_2",)]
    assert sorted(set(objs.where("area > 0").to_arrow().column("image").to_pylist())) == ["s0", "s1", "s_2"]


def test_a_query_on_some_images_opens_only_their_files(cohort, tmp_path):
    """Partition pruning happens before any file is opened, and a count of whole tables comes from the log: with
    s1's files gone, queries on s0 and counts of s1 still answer; a query that needs s1's rows names the file."""
    store = shutil.copytree(cohort, tmp_path / "c.cellar")
    objs = query.open(store)
    counts = {key: objs.snapshots[0].n_objects(*key) for key in objs.snapshots[0].keys}
    before = objs.where("image = 's0' AND area > 20").to_arrow()
    for part in (store / "objects" / "image=s1").rglob("*.parquet"):
        part.unlink()
    objs = query.open(store)
    assert objs.where("image = 's0' AND area > 20").to_arrow().equals(before)
    assert objs.where("image = 's0'").where("label_image = 'cells'").label_ids().size == counts[("s0", "cells")]
    assert objs.where("image = 's1'").count() == counts[("s1", "nuclei")] + counts[("s1", "cells")]
    assert objs.count() == sum(counts.values())
    with pytest.raises(StoreError, match=r"objects/image=s1/label_image=\w+/part-\w+\.parquet, which is missing"):
        objs.where("area > 20").count()


@pytest.mark.parametrize("condition", [None, *FILTERS])
def test_a_group_by_of_two_column_lists_a_file_at_a_time_agrees_with_duckdb(cohort, condition):
    """Grouped by partition keys, polars reduces each file apart: a column a table lacks (s0 has no second
    channel) is NULL there, so its group's mean is NULL; groups of no rows are none."""
    wanted = {"mean": ["intensity_mean__c1", "area"], "count": ["intensity_mean__c1"], "sum": ["area"],
              "max": ["intensity_max__c1"]}

    def run(engine):
        objs = query.open(cohort, engine=engine)
        return (objs.where(condition) if condition else objs.query()).group_by("image", "label_image").agg(**wanted)

    got, want = run("auto"), run("duckdb")
    assert got.schema == want.schema
    assert got.column("image").to_pylist() == want.column("image").to_pylist()
    for name in got.column_names:
        a, b = got.column(name).to_pylist(), want.column(name).to_pylist()
        assert a == b or np.allclose(np.array(a, float), np.array(b, float), rtol=1e-12, equal_nan=True), name
