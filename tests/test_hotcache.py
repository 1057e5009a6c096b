"""The on-disk session cache (`cellar cache`, `query.hotcache`): answers like the Parquet files, is used only
while it matches the store, goes away when the store changes, and gathers whole rows exactly."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellar import measure
from cellar import query
from cellar.query import backends, cachebuild, hotcache
from cellar.query.annotate import annotate
from cellar.query.arrow import take_rows
from cellar.schemas import log
from cellar.schemas import store as layout
from helpers import run_cli, two_slides


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hc")
    a, b = two_slides(tmp, (90, 110), 40, seed=61)
    return tmp, a, b


@pytest.fixture
def store(sources, tmp_path):
    copy = tmp_path / "a.cellar"
    shutil.copytree(sources[0] / "a.cellar", copy)
    return copy


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by("label_id")


def test_a_built_cache_is_mapped_and_answers_like_the_parquet_files(store):
    parquet = query.open(store)
    assert not parquet.mapped
    info = cachebuild.build(store)
    cache_files = [p for p in (store / layout.CACHE_DIR).rglob("*") if p.is_file()]
    assert info["rows"] == len(parquet) and info["bytes"] == sum(p.stat().st_size for p in cache_files)
    mapped = query.open(store)
    assert mapped.mapped and mapped.cached.num_rows == len(parquet)
    assert _sorted(mapped.to_arrow()).equals(_sorted(query.open(store, cache=False).to_arrow()))
    q = "area > 30 AND intensity_mean__CD8 > 100"
    assert np.array_equal(mapped.where(q).label_ids(), parquet.where(q).label_ids())
    top_m = mapped.order_by("intensity_max__DAPI", descending=True).limit(7).to_arrow()
    top_p = parquet.order_by("intensity_max__DAPI", descending=True).limit(7).to_arrow()
    assert top_m.equals(top_p)
    group = "SELECT round(area / 50) AS k, count(*), avg(intensity_mean__DAPI) FROM objects GROUP BY k ORDER BY k"
    assert mapped.sql(group).fetchall() == parquet.sql(group).fetchall()
    assert query.open(store, cache=False).mapped == []  # cache=False always reads the Parquet files


def test_the_build_shows_progress_with_rich(store, monkeypatch):
    """The bar the CLI shows on a terminal (rich, a dependency) names the store and counts the objects."""
    from rich.console import Console

    monkeypatch.setattr(hotcache, "BATCH_ROWS", 16)  # several batches, so the bar advances in steps
    shown = io.StringIO()
    console = Console(file=shown, force_terminal=True, width=120, color_system=None)
    info = cachebuild.build(store, progress=True, console=console)
    n = sum(pq.read_metadata(f).num_rows for f in (store / "objects").rglob("*.parquet"))
    assert info["rows"] == n and hotcache.find(store, log.snapshot(store))
    frames = shown.getvalue()
    assert f"caching {store.name}" in frames and f"{n}/{n} objects" in frames, frames


def test_annotating_makes_the_cache_stale_and_removes_it(store):
    cachebuild.build(store)
    old = hotcache.find(store, log.snapshot(store))
    ids = query.open(store).label_ids()[:5]
    annotate(store, "a", "nuclei", pa.table({"label_id": pa.array(ids, pa.uint64()), "cls": ["t"] * 5}),
             source="test", known_ids=ids, measured=[])
    assert not old.exists()  # the writer removed the previous state's cache
    objs = query.open(store)
    assert not objs.mapped and objs.where("cls = 't'").count() == 5  # the Parquet files, annotation joined
    cachebuild.build(store)
    mapped = query.open(store)
    assert mapped.mapped and mapped.where("cls = 't'").count() == 5  # the cache holds the joined annotation


def test_remeasuring_makes_the_cache_stale(store, sources):
    cachebuild.build(store)
    measure.measure(str(sources[2]), "nuclei", store, workers=1)  # a second table: a new version of the store
    objs = query.open(store)
    assert not objs.mapped and len(objs.tables) == 2
    assert not (store / layout.CACHE_DIR).exists()


def test_several_stores_use_the_caches_only_when_every_store_has_one(store, sources, tmp_path):
    other = tmp_path / "b.cellar"
    shutil.copytree(sources[0] / "b.cellar", other)
    cachebuild.build(store)
    assert not query.open([store, other]).mapped
    cachebuild.build(other)
    both = query.open([store, other])
    assert len(both.mapped) == 2
    parquet = query.open([store, other], cache=False)
    assert both.count() == parquet.count()
    sql = "SELECT image, count(*), sum(intensity_mean__CD8 IS NULL) FROM objects GROUP BY image ORDER BY image"
    assert both.sql(sql).fetchall() == parquet.sql(sql).fetchall()


@pytest.mark.parametrize("threads", [False, True], ids=["one-thread", "columns-shared-among-threads"])
def test_take_rows_equals_pyarrow_take_on_chunked_columns_with_nulls_and_text(threads, monkeypatch):
    from cellar.query import arrow as api

    monkeypatch.setattr(api, "PARALLEL_VALUES", 0 if threads else 10**12)
    monkeypatch.setattr(api.os, "cpu_count", lambda: 3)  # more than one thread, and a share of two columns
    rng = np.random.default_rng(5)
    n = 1000
    table = pa.table({
        "f": rng.normal(size=n), "u": rng.integers(0, 2**63, n, dtype=np.uint64),
        "i": pa.array(rng.integers(-5, 5, n).astype(np.int16)),
        "with_nulls": pa.array([None if k % 7 == 0 else float(k) for k in range(n)]),
        "text": pa.array([f"s{k}" for k in range(n)]), "flag": pa.array(rng.random(n) > 0.5),
    })
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=97))
    assert chunked.column("f").num_chunks > 1
    for rows in (rng.integers(0, n, 50), np.arange(n)[::-1], np.array([3, 3, 999, 0]), np.array([], np.int64)):
        expected = table.take(pa.array(rows, pa.int64()))
        assert take_rows(chunked, rows).equals(expected)
        assert take_rows(table, rows).equals(expected)  # one chunk per column, as the cache in RAM has


def _take_in_child(table, rows, expected, queue):
    queue.put(take_rows(table, rows).equals(expected))


def test_take_rows_in_a_forked_child_after_the_parent_used_its_threads(monkeypatch):
    """A child forked after the parent's take used its thread pool has none of those threads: it must start
    its own, not wait forever on the parent's."""
    import multiprocessing

    from cellar.query import arrow as api

    monkeypatch.setattr(api, "PARALLEL_VALUES", 0)
    table = pa.table({f"c{k}": np.arange(100.0) + k for k in range(4)})
    rows = np.array([5, 1, 99])
    expected = table.take(pa.array(rows))
    assert take_rows(table, rows).equals(expected)  # the parent's pool now exists
    assert api._POOL is not None or (api.os.cpu_count() or 1) < 2
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_take_in_child, args=(table, rows, expected, queue))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
        pytest.fail("take_rows hung in a forked child")
    assert child.exitcode == 0 and queue.get(timeout=5)


def test_cli_builds_reports_and_drops_the_cache(store):
    done = run_cli("cache", str(store))
    assert done.returncode == 0, done.stderr
    assert "session cache of" in done.stderr and hotcache.find(store, log.snapshot(store))
    status = run_cli("cache", str(store), "--status")
    assert status.returncode == 0 and "fresh" in status.stderr
    rows = run_cli("cache", str(store), "--rows")  # adds the row-major copy to the fresh cache
    assert rows.returncode == 0 and "row-major" in rows.stderr and hotcache.status(store)["row_major"]
    dropped = run_cli("cache", str(store), "--drop")
    assert dropped.returncode == 0 and "5 cache files removed" in dropped.stderr
    assert not (store / layout.CACHE_DIR).exists() and not query.open(store).mapped


def test_cli_cache_of_a_missing_store_is_one_line(tmp_path):
    done = run_cli("cache", str(tmp_path / "nope.cellar"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "nope.cellar" in done.stderr


def test_a_damaged_cache_file_is_a_one_line_store_error(store):
    cachebuild.build(store)
    path = hotcache.find(store, log.snapshot(store))
    path.write_bytes(b"not arrow")
    done = run_cli("sql", str(store), "SELECT count(*) FROM objects")
    assert done.returncode == 2 and "unreadable session cache" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("damage", ["truncated", "not-npy"])
def test_a_damaged_row_major_copy_is_a_store_error_naming_it(store, damage):
    from cellar.schemas.errors import StoreError

    cachebuild.build(store, rows=True)
    path = layout.cache_sibling(hotcache.find(store, log.snapshot(store)), "rows")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a numpy file")
    with pytest.raises(StoreError, match=f"{path.name}: unreadable session cache"):
        query.open(store).where("area > 0").to_arrow()


def test_whole_rows_from_the_row_major_copy_equal_the_parquet_rows(store):
    ids = query.open(store).label_ids()
    scores = pa.table({"label_id": pa.array(ids[::3], pa.uint64()), "score": np.linspace(0, 1, len(ids[::3])),
                       "cls": ["x"] * len(ids[::3])})
    annotate(store, "a", "nuclei", scores, source="test", known_ids=ids, measured=[])  # numeric column with nulls
    cachebuild.build(store, rows=True)
    mapped, parquet = query.open(store), query.open(store, cache=False)
    assert mapped.backend.mapped._rows_file is not None and "score" in mapped.backend.mapped._rows_file.dtype.names
    for q in ("area > 30", "score > 0.3 OR intensity_mean__CD8 > 200", f"label_id = {ids[0]}"):
        a = mapped.where(q).order_by("intensity_mean__DAPI", descending=True).to_arrow()
        b = parquet.where(q).order_by("intensity_mean__DAPI", descending=True).to_arrow()
        assert a.column_names == b.column_names, q
        assert a.num_rows == b.num_rows > 0, (q, a.num_rows, b.num_rows)
        assert a.equals(b.cast(a.schema)), q
    rows = np.array([5, 0, 5, len(ids) - 1])  # repeated and unsorted rows keep their order
    assert mapped.take(rows).equals(mapped.backend.mapped.columns().take(pa.array(rows)))


@pytest.mark.parametrize("where", ["mapped", "ram"])
def test_boxes_skip_blocks_by_their_centroid_ranges_and_find_every_object(store, monkeypatch, where):
    monkeypatch.setattr(hotcache, "BATCH_ROWS", 12)  # many small batches, as a large store has,
    monkeypatch.setattr(hotcache, "BLOCK_ROWS", 5)  # each with blocks of its own (the last one shorter)
    parquet = query.open(store, cache=False)
    if where == "mapped":
        cachebuild.build(store)
        mapped = query.open(store)
        ranges = mapped.backend.mapped.batch_ranges
        assert len(ranges["batches"]) > 3 and len(ranges["starts"]) > 2 * len(ranges["batches"])
    else:  # the cache in RAM keeps the same ranges per block of its one chunk
        mapped = query.open(store, cache=True)
        assert isinstance(mapped.backend, backends.InRam)
        ranges = mapped.backend._bounds
        assert len(ranges["starts"]) > 6 and "centroid_x_um" in ranges
        q = mapped.within(10, 10, 40, 40, units="px")
        assert q.objects.backend._box(["label_id"], q.ranges).num_rows == q.count()  # the blocks answer
        xs = mapped.cached.column("centroid_x").to_numpy()
        assert np.array_equal(ranges["centroid_x"][0], [xs[i:i + 5].min() for i in range(0, len(xs), 5)])
    rng = np.random.default_rng(3)
    for _ in range(25):
        x0, y0 = rng.uniform(0, 110, 2)
        w, h = rng.uniform(0, 60, 2)
        for units in ("px", "um"):
            s = 0.5 if units == "um" else 1.0
            a = mapped.within(x0 * s, y0 * s, (x0 + w) * s, (y0 + h) * s, units=units)
            b = parquet.within(x0 * s, y0 * s, (x0 + w) * s, (y0 + h) * s, units=units)
            assert np.array_equal(a.label_ids(), b.label_ids())
            assert a.count() == b.count()
        near = mapped.near(x0, y0, w, units="px").where("area > 20")
        assert np.array_equal(near.label_ids(), parquet.near(x0, y0, w, units="px").where("area > 20").label_ids())
        assert _sorted(near.to_arrow()).equals(_sorted(parquet.near(x0, y0, w, units="px").where("area > 20").to_arrow()))
    assert mapped.within(500, 500, 600, 600, units="px").to_arrow().num_rows == 0  # outside every batch


def test_columns_rebuilt_from_recorded_buffer_places_equal_the_arrow_reader(store, monkeypatch):
    monkeypatch.setattr(hotcache, "BATCH_ROWS", 9)
    cachebuild.build(store)
    mapped = query.open(store).backend.mapped
    recorded = mapped._places[0]
    assert {"label_id", "area", "centroid_x", "image"} <= set(recorded)  # numbers and text alike
    for name in recorded:
        direct = mapped._direct([name])
        assert direct.column(0).num_chunks > 3 and direct.column(0).equals(mapped.table.column(name)), name


def test_a_write_during_the_build_leaves_no_cache_and_says_so(store, monkeypatch):
    from cellar import query as query_store

    real = cachebuild._buffer_places

    def meanwhile(path):  # another process annotates the store while the cache is being written
        ids = query_store.Objects([store], cache=False).label_ids()[:2]
        annotate(store, "a", "nuclei", pa.table({"label_id": pa.array(ids, pa.uint64()), "c": ["x", "y"]}),
                 source="other", known_ids=ids, measured=[])
        return real(path)

    monkeypatch.setattr(cachebuild, "_buffer_places", meanwhile)
    with pytest.raises(hotcache.StoreError, match="changed while its cache was written"):
        cachebuild.build(store)
    assert not (store / layout.CACHE_DIR).exists() or not any((store / layout.CACHE_DIR).iterdir())
    assert not query.open(store).mapped


def test_boxes_with_text_columns_take_the_arrow_path_and_agree(store, monkeypatch):
    monkeypatch.setattr(hotcache, "BLOCK_ROWS", 4)
    ids = query.open(store).label_ids()
    annotate(store, "a", "nuclei", pa.table({"label_id": pa.array(ids, pa.uint64()),
                                             "cls": ["t" if i % 3 else "s" for i in range(len(ids))]}),
             source="test", known_ids=ids, measured=[])
    cachebuild.build(store)
    mapped, parquet = query.open(store), query.open(store, cache=False)
    assert mapped.backend.mapped._view("cls", 0) is None and mapped.backend.mapped._view("label_id", 0) is not None
    for box in ((0, 0, 60, 50), (30, 20, 110, 90), (200, 200, 300, 300)):
        a = mapped.within(*box, units="px").where("cls = 't'")
        b = parquet.within(*box, units="px").where("cls = 't'")
        assert np.array_equal(a.label_ids(), b.label_ids())
        assert _sorted(a.to_arrow()).equals(_sorted(b.to_arrow()))


def test_block_bounds_cover_every_block_nan_and_short_ones_included():
    values = np.array([1.0, np.nan, 3.0, np.nan, np.nan, np.nan, 7.0])
    bounds = hotcache.block_bounds({"x": values}, 3)
    assert bounds["starts"].tolist() == [0, 3, 6, 7]
    assert bounds["x"][0].tolist() == [1.0, -np.inf, 7.0] and bounds["x"][1].tolist() == [3.0, np.inf, 7.0]
    # a box never skips a block that holds a row inside it
    assert hotcache.meeting_blocks(bounds, [("x", 2.0, 2.5)]) == [(0, 3), (3, 3)]
