"""Querying stores from Python: DuckDB relations over the objects, channels and columns views."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from cellar import query
from cellar.query.backends import InRam
from cellar.schemas.errors import QueryError, StoreError
from helpers import read_table, two_slides


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q")
    two_slides(tmp, (80, 96), 30, seed=21)
    return tmp / "a.cellar", tmp / "b.cellar"


def test_sql_returns_a_relation_with_arrow_polars_and_pandas_out(stores):
    objs = query.open(stores[0])
    rel = objs.sql("SELECT label_id, area, intensity_mean__CD8 FROM objects WHERE area > 50 ORDER BY label_id")
    table = rel.to_arrow_table()
    assert isinstance(table, pa.Table) and isinstance(rel.pl(), pl.DataFrame) and isinstance(rel.df(), pd.DataFrame)
    _, df = read_table(stores[0])
    expected = df[df.area > 50].sort_values("label_id")
    assert table.column("label_id").to_pylist() == expected.label_id.tolist()
    np.testing.assert_array_equal(table.column("intensity_mean__CD8").to_numpy(), expected.intensity_mean__CD8)


def test_objects_view_has_the_partition_keys(stores):
    rows = query.open(stores[0]).sql("SELECT DISTINCT image, label_image FROM objects").fetchall()
    assert rows == [("a", "nuclei")]


def test_channels_view_is_the_long_form_of_the_per_channel_columns(stores):
    objs = query.open(stores[0])
    long = objs.sql("SELECT label_id, channel, intensity_mean, intensity_max FROM channels "
                    "ORDER BY channel, label_id").df()
    _, wide = read_table(stores[0])
    assert sorted(long.channel.unique()) == ["CD8", "DAPI"]
    cd8 = long[long.channel == "CD8"]
    np.testing.assert_array_equal(cd8.intensity_mean.to_numpy(), wide.intensity_mean__CD8.to_numpy())
    np.testing.assert_array_equal(cd8.intensity_max.to_numpy(), wide.intensity_max__CD8.to_numpy())
    assert len(long) == 2 * len(wide)


def test_channels_view_is_made_when_a_statement_first_names_it(stores):
    objs = query.open(stores[0])
    views = "SELECT count(*) FROM duckdb_views() WHERE view_name = 'channels' AND schema_name = current_schema()"
    objs.sql("SELECT count(*) FROM objects").fetchall()
    assert objs.con.sql(views).fetchall()[0][0] == 0  # binding it costs time: not for every query
    n = objs.sql("SELECT count(*) FROM Channels").fetchall()[0][0]
    assert n == 2 * objs.count() and objs.con.sql(views).fetchall()[0][0] == 1
    assert objs.sql("WITH q AS (SELECT * FROM channels) SELECT count(*) FROM q").fetchall()[0][0] == n
    fresh = query.open(stores[0])
    with pytest.raises(QueryError, match='Did you mean "channels"'):  # a misspelt name still finds it
        fresh.sql("SELECT count(*) FROM chanels")


@pytest.mark.parametrize("cache", [False, True], ids=["parquet", "session-cache"])
def test_misspelt_view_names_get_the_real_ones_suggested(stores, cache):
    objs = query.open(stores[0], cache=cache)
    for wrong, right in (("objets", "objects"), ("colums", "columns"), ("channel", "channels")):
        with pytest.raises(QueryError, match=f'Did you mean "{right}"'):
            objs.sql(f"SELECT count(*) FROM {wrong}")


def test_views_made_before_the_session_cache_read_it_afterwards(stores):
    objs = query.open(stores[0], cache=False)
    sql = "SELECT channel, count(*), sum(intensity_mean) FROM channels GROUP BY channel ORDER BY channel"
    before = objs.sql(sql).fetchall()
    rows = objs.sql("SELECT count(*) FROM objects").fetchall()
    objs.cache()
    assert isinstance(objs.backend, InRam)
    assert objs.sql(sql).fetchall() == before and objs.sql("SELECT count(*) FROM objects").fetchall() == rows
    plan = objs.sql("EXPLAIN SELECT * FROM channels").fetchall()[0][1].lower()
    assert "parquet" not in plan and "arrow" in plan  # the cache in RAM answers, not the files


def test_columns_view_gives_units_and_descriptions(stores):
    rows = dict(query.open(stores[0]).sql("SELECT name, unit FROM columns").fetchall())
    assert rows["area_um2"] == "micrometer^2" and rows["centroid_x"] == "pixel" and rows["intensity_sum__DAPI"] == "a.u."


def test_several_stores_query_as_one_table(stores):
    objs = query.open(list(stores))
    counts = dict(objs.sql("SELECT image, count(*) FROM objects GROUP BY image").fetchall())
    assert counts == {"a": read_table(stores[0])[0]["n_objects"], "b": read_table(stores[1])[0]["n_objects"]}
    # b has no CD8 channel: its rows are NULL there, and the channels view only lists what was measured.
    assert objs.sql("SELECT count(*) FROM objects WHERE image = 'b' AND intensity_mean__CD8 IS NULL").fetchall()[0][0] == counts["b"]
    per = dict(objs.sql("SELECT image || '/' || channel, count(*) FROM channels GROUP BY ALL").fetchall())
    assert per == {"a/DAPI": counts["a"], "a/CD8": counts["a"], "b/DAPI": counts["b"]}
    assert len(objs) == counts["a"] + counts["b"]


def test_empty_results_keep_their_columns(stores):
    rel = query.open(stores[0]).sql("SELECT label_id, area FROM objects WHERE area < 0")
    assert rel.columns == ["label_id", "area"] and rel.fetchall() == []


@pytest.mark.parametrize("sql, message", [
    ("SELEC 1", "Parser Error: syntax error at or near \"SELEC\""),
    ("SELECT areaa FROM objects", r"unknown column 'areaa' \(did you mean: area"),
    ("SELECT * FROM nowhere", "Table with name nowhere does not exist"),
])
def test_bad_sql_raises_one_line_query_error(stores, sql, message):
    with pytest.raises(QueryError, match=message) as info:
        query.open(stores[0]).sql(sql)
    assert "\n" not in str(info.value)


def test_opening_something_that_is_not_a_store_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        query.open(tmp_path / "nope")
    with pytest.raises(StoreError, match="not a cellar store"):
        query.open(tmp_path)
