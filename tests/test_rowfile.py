"""Row files (schemas/rowfile.py): written beside every measured table, they answer boxes and whole-row fetches
with exactly what the Parquet files give (DuckDB over the same store is the reference), and a damaged one is a
one-line StoreError naming it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellar import measure, query
from cellar.ngff.write import write_image
from cellar.query import api
from cellar.schemas import rowfile
from cellar.schemas.errors import StoreError
from helpers import intensities, nuclei_like, run_cli


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three images (two label images on the first), one annotated: several tables, one column list."""
    root = tmp_path_factory.mktemp("rows")
    out = root / "s.cellar"
    for k in range(3):
        labels = nuclei_like((160, 200), 120, seed=k)
        image = root / f"img{k}.zarr"
        write_image(image, intensities((160, 200), 2, seed=10 + k), "cyx", chunks=(1, 64, 64),
                    labels={"nuclei": labels, **({"cells": nuclei_like((160, 200), 60, seed=7)} if k == 0 else {})},
                    scale={"y": 0.5, "x": 0.5})
        for name in (["nuclei", "cells"] if k == 0 else ["nuclei"]):
            measure.measure(str(image), name, out, workers=1)
    ids = pq.read_table(next((out / "objects" / "image=img1").rglob("*.parquet")), columns=["label_id"])
    notes = root / "notes.parquet"
    kinds = np.array(["T", "B"])[np.arange(ids.num_rows) % 2]
    pq.write_table(pa.table({"label_id": ids.column(0), "cell_type": kinds}), notes)
    assert run_cli("annotate", str(out), "--from", str(notes), "--image", "img1", "--labels", "nuclei").returncode == 0
    return out


def _same(got: pa.Table, want: pa.Table, ordered: bool) -> None:
    if not ordered:
        keys = [("image", "ascending"), ("label_image", "ascending"), ("label_id", "ascending")]
        keys = [k for k in keys if k[0] in got.column_names]
        got, want = got.sort_by(keys), want.sort_by(keys)
    assert got.schema == want.schema
    assert got.equals(want)


QUERIES = {
    "filter, all columns": lambda o: o.where("area > 120 AND intensity_mean__c1 > 0"),
    "filter, some columns": lambda o: o.where("area > 100").select(*[c for c in o.column_names if "intensity" in c][:20],
                                                                   "image", "label_image", "label_id"),
    "filter on an annotation": lambda o: o.where("cell_type = 'T' AND area > 60"),
    "top-k": lambda o: o.order_by("intensity_max__c0", "label_id", "image", "label_image", descending=True).limit(9),
    "top-k of one image": lambda o: o.where("image = 'img2'").order_by("area").limit(5),
    "box": lambda o: o.within(20, 20, 60, 45),
    "box and a filter": lambda o: o.within(10, 5, 80, 70).where("area > 50").select("label_id", "area", "image",
                                                                                       "label_image"),
    "box of one table": lambda o: o.where("image = 'img0' AND label_image = 'cells'").within(0, 0, 50, 50, units="px"),
    "empty box": lambda o: o.within(1000, 1000, 1001, 1001),
    "near": lambda o: o.near(40, 40, 15).order_by("label_id", "image", "label_image").limit(50),
}


@pytest.mark.parametrize("name", list(QUERIES))
def test_row_files_answer_as_the_parquet_files_do(store, name, monkeypatch):
    monkeypatch.setattr(api, "ROW_FILE_SHARE", 1.0)  # the row files answer however many rows match
    objs, duck = query.open(store), query.open(store, engine="duckdb")
    read = []
    original = rowfile.RowFile.arrays
    monkeypatch.setattr(rowfile.RowFile, "arrays", lambda self, *a: read.append(1) or original(self, *a))
    got, want = QUERIES[name](objs).to_arrow(), QUERIES[name](duck).to_arrow()
    _same(got, want, ordered="top-k" in name or name == "near")
    assert read or got.num_rows == 0 or name == "filter on an annotation", "the row files were not used"


def test_label_ids_and_counts_of_a_box(store):
    objs, duck = query.open(store), query.open(store, engine="duckdb")
    q = lambda o: o.where("image = 'img2'").within(30, 10, 90, 70)  # noqa: E731
    assert np.array_equal(q(objs).label_ids(), q(duck).label_ids()) and len(q(objs).label_ids())
    assert q(objs).count() == q(duck).count()


def test_the_spatial_index_reads_only_the_blocks_a_box_meets(tmp_path):
    n = 5000
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 1000, n))  # in space order, as tables are stored
    table = pa.table({"label_id": np.arange(1, n + 1, dtype=np.uint64), "centroid_x": x,
                      "centroid_y": rng.uniform(0, 1000, n), "area": rng.uniform(0, 1, n)})
    path = tmp_path / "t.rows"
    writer = rowfile.Writer(path, table.schema)
    writer.write(table.slice(0, 1200))
    writer.write(table.slice(1200))
    writer.close()
    rf = rowfile.RowFile(path, "t.rows", n)
    touched = []
    keys = rf.keys["centroid_x"]
    rf.keys["centroid_x"] = type("Spy", (), {"__getitem__": lambda _, s: touched.append(s) or keys[s]})()
    rows = rf.in_ranges([("centroid_x", 100, 150), ("centroid_y", 0, 1000)])
    want = np.flatnonzero((x >= 100) & (x <= 150))
    assert np.array_equal(rows, want)
    assert 1 <= len(touched) <= 2  # of 10 blocks
    got = rf.arrays(rows[::-1], ["area", "label_id"])
    assert np.array_equal(got["area"], table.column("area").to_numpy()[want[::-1]])


def test_tables_with_nulls_or_text_get_no_row_file_and_still_answer(tmp_path):
    from cellar.measure import store_write

    out = tmp_path / "s.cellar"
    cols = [{"name": n, "dtype": d, "unit": "", "description": n} for n, d in
            [("image", "string"), ("label_image", "string"), ("label_id", "uint64"), ("area", "float64"), ("tag", "string")]]
    for image, tag in (("a", ["x", "y", "z"]), ("b", None)):
        table = pa.table({"label_id": pa.array([1, 2, 3], pa.uint64()), "area": [1.0, None, 3.0],
                          **({"tag": tag} if tag else {})})
        entry = {"image": image, "label_image": "n", "n_objects": 3, "channels": [],
                 "columns": cols if tag else cols[:4]}
        store_write.write_table(out, entry, table)
    assert not list(out.rglob("*.rows"))
    assert query.open(out).where("area > 0").order_by("area").to_arrow().column("area").to_pylist() == [1.0, 1.0, 3.0, 3.0]


def _with_footer(data: bytes, change) -> bytes:
    """A row file's bytes with its JSON footer changed by `change` (the layout: ..., footer, its length, MAGIC)."""
    import json

    length = int.from_bytes(data[-16:-8], "little")
    footer = json.loads(data[-16 - length:-16])
    change(footer)
    text = json.dumps(footer).encode()
    return data[:-16 - length] + text + len(text).to_bytes(8, "little") + data[-8:]


@pytest.mark.parametrize("damage", ["truncated", "not a row file", "other row count", "an index past the end",
                                    "a column of text"])
def test_a_damaged_row_file_is_one_line_naming_it(store, tmp_path, damage):
    import shutil

    copy = tmp_path / "s.cellar"
    shutil.copytree(store, copy)
    path = next((copy / "objects" / "image=img2").rglob("*.rows"))
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "not a row file":
        path.write_bytes(b"x" * len(data))
    elif damage == "an index past the end":  # the file opens without numpy: its regions are checked as it opens
        path.write_bytes(_with_footer(data, lambda f: f["keys"]["label_id"].__setitem__(0, len(data))))
    elif damage == "a column of text":
        path.write_bytes(_with_footer(data, lambda f: f["columns"][1].__setitem__(1, "|O")))
    else:
        other = next((copy / "objects" / "image=img1").rglob("*.rows"))
        shutil.copy(other, path)
        if other.stat().st_size == len(data):
            pytest.skip("the two tables have as many rows")
    with pytest.raises(StoreError, match=r"image=img2/label_image=nuclei/part-\w+\.rows: damaged row file"):
        query.open(copy).order_by("area").limit(3).to_arrow()
    r = run_cli("sql", str(copy), "SELECT 1")  # the SQL path reads no row file
    assert r.returncode == 0


COMBINABLE = {"mean": ["area", "intensity_mean__c0"], "count": "area", "max": "label_id", "min": "perimeter",
              "sum": ["area", "intensity_mean__c1"]}


@pytest.mark.parametrize("aggregates", ["combinable", "with median and std"])
@pytest.mark.parametrize("where", [None, "area > 50", "cell_type = 'T'", "area > 1e9 OR label_image = 'cells'"])
def test_group_by_agrees_between_polars_and_duckdb(store, where, aggregates):
    """Grouped by partition keys with aggregates that combine, polars reduces each file apart (`_file_parts`): a
    group whose rows are all filtered out is no group; the others equal DuckDB's to rounding."""
    objs, duck = query.open(store), query.open(store, engine="duckdb")
    keys = ("image", "label_image") if where != "cell_type = 'T'" else ("image", "cell_type")
    wanted = dict(COMBINABLE) if aggregates == "combinable" else {**COMBINABLE, "std": ["area"], "median": "area"}

    def run(o):
        q = o.where(where) if where else o.query()
        return q.group_by(*keys).agg(**wanted)

    by_file = api.Grouped(objs.where(where) if where else objs.query(), keys)._file_parts(
        (objs.where(where) if where else objs.query())._pruned(), [(f, c) for f, cs in wanted.items()
                                                                   for c in ([cs] if isinstance(cs, str) else cs)])
    assert (by_file is not None) == (aggregates == "combinable" and where != "cell_type = 'T'")
    got, want = run(objs), run(duck)
    assert got.schema == want.schema and got.num_rows >= 1
    if where and "1e9" in where:
        assert got.column("label_image").to_pylist() == ["cells"]
    for name in got.column_names:
        a, b = got.column(name).to_pylist(), want.column(name).to_pylist()
        assert a == b or np.allclose(a, b, rtol=1e-12), name


def test_group_by_names_unknown_aggregates_and_columns(store):
    from cellar.schemas.errors import QueryError

    with pytest.raises(QueryError, match="unknown aggregate 'avg'"):
        query.open(store).group_by("image").agg(avg=["area"])
    with pytest.raises(QueryError, match="unknown column 'aera'"):
        query.open(store).group_by("image").agg(mean=["aera"])


def test_a_store_whose_path_holds_an_equals_sign_is_scanned_file_by_file(store, tmp_path, monkeypatch):
    """polars reads every `key=value` folder of a path as a Hive key: such a store is scanned a file at a time."""
    import shutil

    copy = tmp_path / "run=1" / "s.cellar"
    shutil.copytree(store, copy)
    monkeypatch.setattr(api, "ROW_FILE_SHARE", 1.0)
    for q in (QUERIES["filter, all columns"], QUERIES["top-k"], lambda o: o.where("area > 80").select("image", "label_id")):
        _same(q(query.open(copy)).to_arrow(), q(query.open(copy, engine="duckdb")).to_arrow(), ordered=False)


def _rewrite(path, change: str) -> None:
    table = pq.read_table(path)
    if change == "a stray column":
        table = table.append_column("stray", pa.array(np.zeros(table.num_rows)))
    elif change == "a column missing":
        table = table.drop_columns(["area"])
    else:  # "a column of another type"
        table = table.set_column(table.schema.get_field_index("area"), "area", table["area"].cast(pa.float64()))
    pq.write_table(table, path)


@pytest.mark.parametrize("change", ["a stray column", "a column missing", "a column of another type"])
@pytest.mark.parametrize("image", ["img0", "img2"])  # the scan's first file, and one after it
def test_a_file_with_other_columns_inside_a_scan_is_named(store, tmp_path, image, change):
    """One scan reads many files, given the columns the log lists (no footer is read before it runs): any of them
    holding other columns, or other types, is named."""
    import shutil

    copy = tmp_path / "s.cellar"
    shutil.copytree(store, copy)
    path = next((copy / "objects" / f"image={image}" / "label_image=nuclei").rglob("*.parquet"))
    _rewrite(path, change)
    with pytest.raises(StoreError, match=rf"image={image}/label_image=nuclei/part-\w+\.parquet: "):
        query.open(copy).where("area > 80").select("image", "label_id").to_arrow()
    if change == "a stray column" and image != "img0":
        # DuckDB reads the columns the log lists from every file of the scan, by name: the stray one is not read
        sql = "SELECT image, label_image, label_id FROM objects WHERE area > 80 ORDER BY ALL"
        assert query.open(copy).sql(sql).fetchall() == query.open(store).sql(sql).fetchall()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_exports_from_the_row_files_and_polars_equal_those_streamed_from_duckdb(store, tmp_path, monkeypatch, fmt):
    """An export's rows come from the row files, from polars' engine (CSV) or from DuckDB: the same file."""
    used = {"rows": [], "polars": []}
    for name in ("from_row_files", "polars_frame"):
        original = getattr(api.Query, name)
        monkeypatch.setattr(api.Query, name, lambda self, _o=original, _k=name[:4]: (
            lambda t: used["rows" if _k == "from" else "polars"].append(t is not None) or t)(_o(self)))
    where = "image = 'img1' AND label_image = 'nuclei' AND area > 40"
    monkeypatch.setattr(api, "ROW_FILE_SHARE", 1.0)
    query.open(store).where(where).export(fmt, str(tmp_path / f"rows.{fmt}"))
    monkeypatch.setattr(api, "ROW_FILE_SHARE", 0.0)
    query.open(store).where(where).export(fmt, str(tmp_path / f"polars.{fmt}"))
    query.open(store, engine="duckdb").where(where).export(fmt, str(tmp_path / f"duck.{fmt}"))
    assert used["rows"] == [True, False, False]  # DuckDB's engine streams
    assert used["polars"] == ([True, False] if fmt == "csv" else [])  # polars writes CSV; Parquet: DuckDB's batches
    if fmt == "csv":
        rows = [(tmp_path / f"{k}.csv").read_text().splitlines() for k in ("rows", "polars", "duck")]
        # the first line: provenance, with the time
        assert rows[0][1:] == rows[1][1:] == rows[2][1:] and len(rows[0]) > 10
    else:
        got, want = pq.read_table(tmp_path / "rows.parquet"), pq.read_table(tmp_path / "duck.parquet")
        assert got.equals(want) and pq.read_table(tmp_path / "polars.parquet").equals(want) and got.num_rows > 10


def test_a_process_without_numpy_exports_a_small_query_from_parquet_as_the_row_files_would(store, tmp_path):
    """A CSV export in a process that has not loaded numpy and pyarrow takes whole rows from the row files only
    for queries covering more than ROW_FILES_UNLOADED rows (loading them costs more than polars' Parquet scan of
    a table): the same file either way, and below the limit numpy is never loaded."""
    import subprocess
    import sys

    where = "image = 'img1' AND label_image = 'nuclei' AND area > 40"
    script = ("import sys; from cellar import query; from cellar.query import api, export; "
              "export.ROW_FILES_UNLOADED = int(sys.argv[2]); api.ROW_FILE_SHARE = 1.0; "
              f"query.open(sys.argv[1]).where({where!r}).export('csv', sys.argv[3]); "
              "print('numpy' in sys.modules, 'pyarrow' in sys.modules)")
    loaded = []
    for limit, name in ((10**9, "parquet"), (0, "rows")):
        out = subprocess.run([sys.executable, "-c", script, str(store), str(limit), str(tmp_path / f"{name}.csv")],
                             capture_output=True, text=True, check=True)
        assert out.stderr == ""
        loaded.append(out.stdout.split())
    assert loaded == [["False", "False"], ["True", "True"]]
    rows = [(tmp_path / f"{k}.csv").read_text().splitlines() for k in ("parquet", "rows")]
    assert rows[0][1:] == rows[1][1:] and len(rows[0]) > 10  # the first line: provenance, with the time
