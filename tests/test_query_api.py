"""The lazy Python query API (`query.api.Query`), cold from the Parquet files and warm from the session cache."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cellar import measure
from cellar import query
from cellar.ngff.write import write_image
from cellar.query import backends
from cellar.schemas.errors import QueryError, StoreError
from cellar.schemas.store import spatial_order
from helpers import intensities, nuclei_like, read_table


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    labels = nuclei_like((120, 150), 70, seed=41)
    a = write_image(tmp / "a.ome.zarr", intensities((120, 150), 2, seed=42), "cyx", chunks=(1, 40, 50),
                    labels={"nuclei": labels}, channel_names=["DAPI", "CD8"], scale={"y": 0.5, "x": 0.5},
                    translation={"y": 10.0, "x": 20.0})
    b = write_image(tmp / "b.ome.zarr", intensities((120, 150), 1, seed=43), "cyx", chunks=(1, 40, 50),
                    labels={"nuclei": labels[::-1].copy()}, channel_names=["DAPI"], scale={"y": 0.5, "x": 0.5})
    labels3 = nuclei_like((12, 40, 40), 25, seed=44)
    c = write_image(tmp / "c.ome.zarr", intensities((12, 40, 40), 1, seed=45), "czyx", chunks=(1, 6, 20, 20),
                    labels={"cells": labels3}, scale={"z": 2.0, "y": 0.5, "x": 0.5})
    for img, lbl, name in ((a, "nuclei", "a"), (b, "nuclei", "b"), (c, "cells", "c")):
        measure.measure(str(img), lbl, tmp / f"{name}.cellar", workers=1)
    return tmp / "a.cellar", tmp / "b.cellar", tmp / "c.cellar"


@pytest.fixture(scope="module")
def mapped_store(stores, tmp_path_factory):
    """A copy of the first store with its on-disk session cache built (`cellar cache`)."""
    import shutil

    from cellar.query import cachebuild

    folder = tmp_path_factory.mktemp("mapped")
    shutil.copytree(stores[0], folder / "a.cellar")
    shutil.copytree(stores[0], folder / "rows" / "a.cellar")
    cachebuild.build(folder / "a.cellar")
    cachebuild.build(folder / "rows" / "a.cellar", rows=True)
    return folder


@pytest.fixture(params=["polars", "duckdb", "warm", "mapped", "mapped-rows", "mapped-duckdb"])
def objs(request, stores, mapped_store):
    """The same store six ways: cold on polars' Parquet scan (the default for plain queries), cold with
    every query in DuckDB, warm from the session cache (DuckDB on Arrow memory), and from the memory-mapped
    on-disk cache (polars and DuckDB on the mapped file; with its row-major copy; DuckDB alone)."""
    if request.param == "warm":
        return query.open(stores[0], cache=True)
    if request.param.startswith("mapped"):
        store = mapped_store / ("rows" if request.param == "mapped-rows" else "") / "a.cellar"
        objs = query.open(store, engine="duckdb" if request.param.endswith("duckdb") else "auto")
        assert objs.mapped and objs.cached is not None
        return objs
    return query.open(stores[0], engine="auto" if request.param == "polars" else "duckdb")


def test_where_count_and_label_ids_match_pandas(objs, stores):
    _, df = read_table(stores[0])
    q = objs.where("area_um2 > 8 AND intensity_mean__CD8 > 29000")
    expected = df[(df.area_um2 > 8) & (df.intensity_mean__CD8 > 29000)]
    assert 0 < q.count() == len(expected) < len(df)
    ids = q.label_ids()
    assert ids.dtype == np.uint64
    np.testing.assert_array_equal(ids, np.sort(expected.label_id.to_numpy()))


def test_queries_are_immutable_and_compose(objs):
    big = objs.where("area > 40")
    both = big.where("eccentricity < 0.8")
    assert both.count() < big.count() == objs.where("area > 40").count()


def test_select_and_every_output_type(objs, stores):
    q = objs.where("area > 40").select("label_id", "area", "intensity_mean__DAPI").order_by("label_id")
    t = q.to_arrow()
    assert isinstance(t, pa.Table) and t.column_names == ["label_id", "area", "intensity_mean__DAPI"]
    assert isinstance(q.to_polars(), pl.DataFrame) and isinstance(q.to_pandas(), pd.DataFrame)
    _, df = read_table(stores[0])
    np.testing.assert_array_equal(t.column("area").to_numpy(), df[df.area > 40].area.to_numpy())


@pytest.mark.parametrize("units", ["px", "um"])
def test_within_a_box_matches_the_centroids(objs, stores, units):
    _, df = read_table(stores[0])
    suffix = "_um" if units == "um" else ""
    x0, x1 = np.quantile(df[f"centroid_x{suffix}"], [0.2, 0.6])
    y0, y1 = np.quantile(df[f"centroid_y{suffix}"], [0.3, 0.9])
    ids = objs.within(x0, y0, x1, y1, units=units).label_ids()
    cx, cy = df[f"centroid_x{suffix}"], df[f"centroid_y{suffix}"]
    expected = df[(cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)].label_id
    assert len(ids) > 3
    np.testing.assert_array_equal(ids, np.sort(expected.to_numpy()))


def test_physical_coordinates_include_the_translation(objs, stores):
    _, df = read_table(stores[0])
    np.testing.assert_allclose(df.centroid_x_um, df.centroid_x * 0.5 + 20.0)
    assert objs.within(0, 0, 19.9, 1000).count() == 0  # everything lies right of x = 20 um


def test_within_a_3d_box(stores):
    objs = query.open(stores[2])
    _, df = read_table(stores[2])
    q = objs.within(5, 5, 15, 15, z0=4, z1=14)
    expected = df[df.centroid_x_um.between(5, 15) & df.centroid_y_um.between(5, 15) & df.centroid_z_um.between(4, 14)]
    assert len(expected) > 0
    np.testing.assert_array_equal(q.label_ids(), np.sort(expected.label_id.to_numpy()))


def test_near_is_a_disc(objs, stores):
    _, df = read_table(stores[0])
    x, y, r = float(df.centroid_x_um.median()), float(df.centroid_y_um.median()), 20.0
    d = np.hypot(df.centroid_x_um - x, df.centroid_y_um - y)
    ids = objs.near(x, y, r).label_ids()
    assert 3 < len(ids) < len(df)
    np.testing.assert_array_equal(ids, np.sort(df[d <= r].label_id.to_numpy()))


def test_order_by_and_limit_give_the_top_objects(objs, stores):
    _, df = read_table(stores[0])
    top = objs.order_by("area", descending=True).limit(5).select("label_id", "area").to_pandas()
    assert top.area.tolist() == sorted(df.area, reverse=True)[:5]
    ids = objs.order_by("area", descending=True).limit(5).label_ids()
    np.testing.assert_array_equal(ids, top.label_id.to_numpy())  # the query's order, not sorted


def test_describe_gives_unit_description_and_statistics(objs, stores):
    _, df = read_table(stores[0])
    d = objs.where("area > 30").describe("area_um2")
    sub = df[df.area > 30].area_um2
    assert d["unit"] == "micrometer^2" and "area" in d["description"].lower()
    assert d["count"] == len(sub) and d["nulls"] == 0
    assert d["min"] == sub.min() and d["max"] == sub.max()
    assert d["mean"] == pytest.approx(sub.mean())
    assert d["quantiles"][0.5] == pytest.approx(np.quantile(sub, 0.5))
    assert d["quantiles"][0.05] == pytest.approx(np.quantile(sub, 0.05))


def test_empty_result_keeps_its_columns(objs):
    q = objs.where("area < 0").select("label_id", "area")
    t = q.to_arrow()
    assert t.num_rows == 0 and t.column_names == ["label_id", "area"]
    assert q.count() == 0 and q.label_ids().size == 0 and q.label_ids().dtype == np.uint64


@pytest.mark.parametrize("call, message", [
    (lambda o: o.where("aera > 80"), r"unknown column 'aera' \(did you mean: area"),
    (lambda o: o.select("label_id", "intensity_mean__CD9"), r"unknown column 'intensity_mean__CD9' \(did you mean: intensity_mean__CD8"),
    (lambda o: o.order_by("eccentricty"), r"unknown column 'eccentricty' \(did you mean: eccentricity"),
    (lambda o: o.describe("solidty"), r"unknown column 'solidty' \(did you mean: solidity"),
    (lambda o: o.where("area > 'big'"), r"Conversion Error: Could not convert string 'big'"),
    (lambda o: o.within(10, 0, 5, 10), r"x0 = 10 > x1 = 5; corners inverted"),
    (lambda o: o.within(0, 0, 5, 5, z0=1), r"give both z0 and z1"),
    (lambda o: o.near(0, 0, -1), r"r = -1; expected a distance >= 0"),
    (lambda o: o.within(0, 0, 5, 5, units="mm"), r"units='mm'"),
    (lambda o: o.limit(-3), r"limit: -3"),
])
def test_bad_queries_raise_one_line_query_errors(objs, call, message):
    with pytest.raises(QueryError, match=message) as info:
        call(objs).count()
    assert "\n" not in str(info.value)


def test_several_stores_are_one_table_and_label_ids_need_one(stores):
    objs = query.open(list(stores[:2]))
    n_a, n_b = read_table(stores[0])[0]["n_objects"], read_table(stores[1])[0]["n_objects"]
    assert objs.count() == n_a + n_b
    with pytest.raises(QueryError, match="spans 2 tables"):
        objs.label_ids()
    assert len(objs.where("image = 'b'").label_ids()) == n_b
    assert objs.where("image = 'b'").to_arrow().column("intensity_mean__CD8").null_count == n_b


def test_sql_over_a_query_and_the_columns_view(objs):
    rows = objs.where("area > 40").sql("SELECT count(*), min(area) FROM q").fetchall()[0]
    assert rows[0] == objs.where("area > 40").count() and rows[1] > 40
    units = dict(objs.sql("SELECT name, unit FROM columns").fetchall())
    assert units["area_um2"] == "micrometer^2"


def test_cache_answers_like_the_files(stores):
    cold, warm = query.open(stores[0]), query.open(stores[0], cache=True)
    assert warm.cached is not None and warm.cached.num_rows == cold.count()
    a = cold.order_by("label_id").to_arrow()
    b = warm.order_by("label_id").to_arrow()
    assert a.column_names == b.column_names and a.equals(b)


def test_close_ends_the_session_and_later_queries_say_so(objs):
    n = objs.count()
    with objs:
        assert objs.where("area > 0").count() == n
    for call in (objs.count, objs.to_arrow, lambda: objs.where("area > 1").label_ids(),
                 lambda: objs.sql("SELECT 1").fetchall(), lambda: objs.describe("area")):
        with pytest.raises(QueryError, match="closed; open the store again"):
            call()


def test_close_hands_the_session_cache_in_ram_back_to_the_system(stores):
    """The cache in RAM is allocated from the system allocator (pyarrow's default pool keeps freed pages
    resident) and freed on close."""
    pool = pa.system_memory_pool()
    before = pool.bytes_allocated()
    objs = query.open(stores, cache=True)  # three files: DuckDB hands over several chunks per column
    assert pool.bytes_allocated() - before >= 0.9 * objs.cached.nbytes
    objs.close()
    assert pool.bytes_allocated() == before


def test_store_rows_follow_a_hilbert_curve(stores):
    """Consecutive rows are spatial neighbours: along the curve, steps are short compared with random order."""
    entry, _ = read_table(stores[0])
    t = pq.read_table(stores[0] / entry["dir"] / entry["files"][0])
    y, x = t.column("centroid_y").to_numpy(), t.column("centroid_x").to_numpy()
    step = np.hypot(np.diff(y), np.diff(x)).mean()
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(len(y))
    assert step < 0.5 * np.hypot(np.diff(y[shuffled]), np.diff(x[shuffled])).mean()


def test_spatial_order_is_a_hilbert_curve_on_a_grid():
    y, x = np.mgrid[0:8, 0:8]
    order = spatial_order(y.ravel().astype(float), x.ravel().astype(float), bits=3)
    pts = np.stack([y.ravel()[order], x.ravel()[order]], axis=1)
    assert sorted(order.tolist()) == list(range(64))
    assert (np.abs(np.diff(pts, axis=0)).sum(axis=1) == 1).all()  # every step goes to a 4-neighbour


def test_plain_queries_run_on_polars_without_duckdb(stores):
    objs = query.open(stores[0])
    q = objs.where("area > 40 AND intensity_mean__CD8 > 100").within(20, 10, 80, 60).order_by("area").limit(5)
    assert q._polars() is not None
    _, df = read_table(stores[0])  # the Parquet file through pyarrow, into pandas
    sub = df[(df.area > 40) & (df.intensity_mean__CD8 > 100) & df.centroid_x_um.between(20, 80)
             & df.centroid_y_um.between(10, 60)]
    assert len(sub) > 5  # the limit cuts
    got = q.to_arrow()
    assert q.count() == 5 and got.num_rows == 5 and len(q.label_ids()) == 5
    assert got.column("area").to_pylist() == sorted(sub.area)[:5]  # the five smallest, in order
    assert set(got.column("label_id").to_pylist()) <= set(sub.label_id)
    assert objs._base is None  # no DuckDB connection was needed


@pytest.mark.parametrize("condition, simple", [
    ("area > 40 AND intensity_mean__CD8 > 100", True),
    ("(area BETWEEN 10 AND 50) OR NOT eccentricity < 0.5", True),
    ("label_id IN (3, 10, 17) AND centroid_x IS NOT NULL", True),
    ("\"area\" >= 1e2 AND image = 'a'", True),
    ("area_um2 * 2 - 0.5 > 20 AND label_id NOT IN (-1, 4)", True),  # arithmetic with a floating-point operand
    ("area / 2 > 20", False),  # division: integer or float, the engines differ
    ("label_id - 80 > 0", False),  # integer arithmetic: polars wraps around below 0, DuckDB does not
    ("-area < -40", False),  # an integer column negated, likewise
    ("area > '40'", False),  # text compared with a number: DuckDB casts it, polars refuses
    ("abs(area - 40) < 5", False),  # functions
    ("AREA > 40", False),  # DuckDB folds case, polars does not
    ("area::DOUBLE > 40", False),
    ("arae > 40", False),
])
def test_which_conditions_polars_may_run(stores, condition, simple):
    """The rule is decided on the text before anything runs; what it sends to polars, polars answers as DuckDB
    does, and what it keeps from polars, DuckDB answers."""
    from cellar.query.sql import reads_alike

    objs = query.open(stores[0])
    assert reads_alike(condition, objs.column_types) is simple
    if condition == "arae > 40":
        return
    auto, duck = (query.open(stores[0], engine=e).where(condition) for e in ("auto", "duckdb"))
    assert (auto._polars() is not None) is simple and duck._polars() is None
    assert auto.count() == duck.count() > 0
    np.testing.assert_array_equal(auto.label_ids(), duck.label_ids())


BACKENDS = ("parquet", "ram", "mapped", "mapped-rows")


def _backend(stores, mapped_store, name: str, engine: str = "auto") -> query.Objects:
    """The first store on a backend: its Parquet files, the session cache in RAM, the mapped on-disk cache
    (with and without its row-major copy)."""
    if name.startswith("mapped"):
        return query.open(mapped_store / ("rows" if name == "mapped-rows" else "") / "a.cellar", engine=engine)
    return query.open(stores[0], cache=name == "ram", engine=engine)


def _backends(stores, mapped_store, engine: str = "auto") -> dict[str, query.Objects]:
    return {name: _backend(stores, mapped_store, name, engine) for name in BACKENDS}


def test_each_backend_is_the_one_its_options_choose(stores, mapped_store):
    objs = _backends(stores, mapped_store)
    assert [type(o.backend) for o in objs.values()] == [backends.ParquetFiles, backends.InRam,
                                                      backends.MappedCache, backends.MappedCache]
    assert [o.is_cached for o in objs.values()] == [False, True, True, True]
    assert objs["parquet"].cached is None and not objs["parquet"].mapped and not objs["ram"].mapped
    assert objs["mapped"].mapped == objs["mapped"].backend.paths and objs["mapped"].cached is not None
    assert objs["ram"].cache() is objs["ram"] and isinstance(objs["ram"].backend, backends.InRam)
    cold = query.open(stores[0], cache=False)
    assert isinstance(cold.cache().backend, backends.InRam)  # Objects.cache() reads the files into RAM
    assert isinstance(objs["mapped"].cache().backend, backends.MappedCache)  # the mapped files answer as fast
    narrowed = query.open([stores[0], stores[1]], cache=False).narrow({"a"})
    assert isinstance(narrowed.backend, backends.ParquetFiles) and narrowed.n_tables == 1
    for o in objs.values():
        o.close()
        assert not o.is_cached and o.cached is None and o.mapped == []


def test_objects_dropped_are_freed_at_once(stores, mapped_store):
    """No reference cycle between an Objects and its backend: the last reference gone, it is freed (its DuckDB
    connections and its memory with it) without waiting for the garbage collector."""
    import gc
    import weakref

    gc.disable()
    try:
        for name in BACKENDS:
            objs = _backend(stores, mapped_store, name)
            objs.where("area > 3").to_arrow(), objs.where("abs(area) > 3").count()  # on polars and DuckDB
            dropped = weakref.ref(objs)
            del objs
            assert dropped() is None, name
    finally:
        gc.enable()


@pytest.mark.parametrize("engine", ["auto", "duckdb"])
def test_every_backend_answers_the_same(stores, mapped_store, engine):
    """Filters, boxes, discs, order and limit, projections: the same rows, values and types from every backend
    (on polars and on DuckDB)."""
    objs = _backends(stores, mapped_store, engine)
    x0, x1, y0, y1 = 25.0, 60.0, 15.0, 50.0
    queries = {
        "filter": lambda o: o.where("area > 40 AND intensity_mean__CD8 > 100"),
        "or, in, null": lambda o: o.where("label_id IN (3, 10, 17, 40) OR eccentricity < 0.5 AND centroid_x IS NOT NULL"),
        "functions (DuckDB)": lambda o: o.where("abs(area - 40) < 15"),
        "box": lambda o: o.within(x0, y0, x1, y1),
        "box px, filter": lambda o: o.within(10, 10, 80, 60, units="px").where("area_um2 * 2 > 10"),
        "disc": lambda o: o.near(40, 30, 15),
        "order, limit": lambda o: o.where("area > 10").order_by("area", "label_id", descending=True).limit(7),
        "select": lambda o: o.within(x0, y0, x1, y1).select("label_id", "area_um2", "image"),
        "nothing": lambda o: o.where("area < 0"),
        "all": lambda o: o.query(),
    }
    for name, make in queries.items():
        answers = {backend: make(o) for backend, o in objs.items()}
        tables = {backend: q.to_arrow() for backend, q in answers.items()}
        first = tables["parquet"]
        if not any(d for _, d in make(objs["parquet"]).order):  # unordered: compare in label order
            tables = {b: t.sort_by("label_id") if "label_id" in t.column_names else t for b, t in tables.items()}
            first = tables["parquet"]
        for backend, table in tables.items():
            assert table.schema.equals(first.schema), (name, backend)
            assert table.equals(first), (name, backend)
            assert answers[backend].count() == first.num_rows, (name, backend)
            np.testing.assert_array_equal(answers[backend].label_ids(), answers["parquet"].label_ids())
    assert tables["parquet"].num_rows > 0


def test_the_session_caches_take_the_same_rows(stores, mapped_store):
    objs = _backends(stores, mapped_store)
    n = objs["ram"].count()
    rows = np.array([n - 1, 0, 5, 5, 2])  # unsorted and repeated: in this order
    expected = objs["parquet"].to_arrow().take(pa.array(rows))
    for backend in ("ram", "mapped", "mapped-rows"):
        taken = objs[backend].take(rows)
        assert taken.equals(expected.cast(taken.schema)), backend
        assert objs[backend].take(rows, ["area", "label_id"]).column_names == ["area", "label_id"]
    with pytest.raises(QueryError, match="take: no session cache"):
        objs["parquet"].take(rows)


@pytest.mark.parametrize("backend", ["parquet", "ram", "mapped"])
def test_a_polars_failure_while_running_is_reported_not_run_again_in_duckdb(stores, mapped_store, monkeypatch, backend):
    """An error polars meets while running a query is one line QueryError (a StoreError when it names a store
    file); DuckDB does not run the query again to answer instead. An error of another kind is a bug: it surfaces
    as it is."""
    objs = _backends(stores, mapped_store)[backend]
    queries = [objs.where("area > 40"), objs.within(25, 15, 60, 50).select("label_id", "area"),
               objs.near(40, 30, 15).limit(5)]
    assert all(q._polars() is not None for q in queries)

    def fails(self, *args, **kwargs):
        raise pl.exceptions.ComputeError("the engine broke\n\nThis error occurred in the following expression: ...")

    def no_duckdb(self, *args, **kwargs):
        raise AssertionError("DuckDB ran the query")

    monkeypatch.setattr(pl.LazyFrame, "collect", fails)
    monkeypatch.setattr(query.Objects, "fetch", no_duckdb)
    for q in queries:
        for call in (q.count, q.label_ids, q.to_arrow):
            with pytest.raises(QueryError, match="^the engine broke$"):
                call()

    def bug(self, *args, **kwargs):
        raise pl.exceptions.InvalidOperationError("a bug")

    monkeypatch.setattr(pl.LazyFrame, "collect", bug)
    with pytest.raises(pl.exceptions.InvalidOperationError, match="a bug"):
        objs.where("area > 40").count()


@pytest.mark.parametrize("gone", ["missing", "pages"])
def test_a_parquet_file_that_fails_polars_while_running_is_named(stores, tmp_path, gone):
    """A file removed, or whose pages stop decoding, after the store was opened and polars' scan built: a
    StoreError naming the file, from polars' run (no second run in DuckDB)."""
    import shutil

    store = Path(shutil.copytree(stores[0], tmp_path / "a.cellar"))
    objs = query.open(store)
    q = objs.where("area > 1")
    assert q._polars() is not None
    (part,) = store.rglob("*.parquet")
    if gone == "missing":
        part.unlink()
    else:
        data = bytearray(part.read_bytes())
        footer = int.from_bytes(data[-8:-4], "little")
        end = len(data) - 8 - footer
        data[4 + (end - 4) // 4:4 + 3 * (end - 4) // 4] = b"\xa5" * ((end - 4) // 2)
        part.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=part.name) as info:
        q.to_arrow()
    assert "\n" not in str(info.value)


_COLUMNS = st.sampled_from(["area", "area_um2", "label_id", "eccentricity", "centroid_x", "image"])
_OPERANDS = st.one_of(_COLUMNS, st.sampled_from(["1", "-3", "40", "0.5", "-2.5", "1e2", "'a'", "TRUE"]))


@st.composite
def _conditions(draw, depth: int = 2) -> str:
    """Random conditions of the SQL subset and just outside it (integer arithmetic, text against numbers)."""
    value = st.one_of(_OPERANDS, st.builds(lambda a, op, b: f"({a} {op} {b})", _COLUMNS,
                                           st.sampled_from(["+", "-", "*"]), _OPERANDS))
    leaf = st.one_of(
        st.builds(lambda a, op, b: f"{a} {op} {b}", value, st.sampled_from(["=", "<>", "<", "<=", ">", ">="]), value),
        st.builds(lambda a, lo, hi, neg: f"{a} {neg}BETWEEN {lo} AND {hi}", value, value, value,
                  st.sampled_from(["", "NOT "])),
        st.builds(lambda a, items, neg: f"{a} {neg}IN ({', '.join(items)})", value,
                  st.lists(_OPERANDS, min_size=1, max_size=3), st.sampled_from(["", "NOT "])),
        st.builds(lambda a, neg: f"{a} IS {neg}NULL", value, st.sampled_from(["", "NOT "])))
    if depth == 0:
        return draw(leaf)
    return draw(st.one_of(leaf, st.builds(lambda a, op, b: f"({a} {op} {b})", _conditions(depth - 1),
                                          st.sampled_from(["AND", "OR"]), _conditions(depth - 1)),
                          st.builds(lambda a: f"NOT ({a})", _conditions(depth - 1))))


@settings(max_examples=300, deadline=None)
@given(condition=_conditions())
@example(condition="(label_id - 40) > 1")  # unsigned arithmetic: polars wraps around below 0
@example(condition="-area < -40 OR (eccentricity * 2) BETWEEN 0.5 AND 1")
def test_what_the_rule_sends_to_polars_polars_answers_as_duckdb(stores, condition):
    """Random conditions: those the rule (`reads_alike`) sends to polars give polars' answer equal to DuckDB's,
    on the files and on the session cache."""
    from cellar.query.sql import reads_alike

    auto, duck, warm = _engines(stores[0])
    if not reads_alike(condition, auto.column_types):
        return
    expected = duck.where(condition).label_ids()
    for objs in (auto, warm):
        q = objs.where(condition)
        assert q._polars() is not None, condition
        np.testing.assert_array_equal(q.label_ids(), expected, err_msg=condition)


@functools.cache
def _engines(store: Path) -> tuple[query.Objects, query.Objects, query.Objects]:
    return query.open(store), query.open(store, engine="duckdb"), query.open(store, cache=True)
