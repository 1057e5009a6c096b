"""Exports read back with each format's own reader and compared with the store row for row."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tables

from cellar import measure
from cellar import ngff
from cellar import query
from cellar.ngff.write import write_image
from cellar.query import export as export_mod
from cellar.schemas.errors import QueryError, UsageError
from helpers import intensities, nuclei_like, read_table, relocate_source, run_cli

OMERO_READ = Path(__file__).parent / "tools" / "omero_read.py"
# scripts/test builds OMERO's Python 3.10 environment here, holding the lock while it builds
OMERO_VENV_PYTHON = Path(__file__).parents[1] / ".venv-omero" / "bin" / "python"
OMERO_LOCK = Path(__file__).parents[1] / ".venv-omero.lock"
OMERO_LOG = Path(__file__).parents[1] / ".venv-omero.log"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    labels = nuclei_like((90, 110), 40, seed=61)
    chans = intensities((90, 110), 2, seed=62)
    chans[1] = 500  # a constant channel: skewness and kurtosis are NaN for every object
    image = write_image(tmp / "img.ome.zarr", chans, "cyx", chunks=(1, 45, 55), labels={"nuclei": labels},
                        channel_names=["DAPI", "CD 8"], scale={"y": 0.5, "x": 0.5})
    measure.measure(str(image), "nuclei", tmp / "s.cellar", workers=1)
    return tmp


@pytest.fixture
def case(source, tmp_path):
    shutil.copytree(source / "img.ome.zarr", tmp_path / "img.ome.zarr")
    shutil.copytree(source / "s.cellar", tmp_path / "s.cellar")
    relocate_source(tmp_path / "s.cellar", str(tmp_path / "img.ome.zarr"))
    return tmp_path


def _store_rows(store: Path, where: str = "true"):
    return query.open(store).sql(f"SELECT * FROM objects WHERE {where} ORDER BY label_id").df()


def _same(a, b, col):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        np.testing.assert_array_equal(a.astype(float), b.astype(float), err_msg=col)  # NaN == NaN here
    else:
        assert a.tolist() == b.tolist(), col


def test_omero_h5_has_omeros_layout_and_the_stores_rows(case):
    out = case / "t.h5"
    r = run_cli("export", str(case / "s.cellar"), "--to", "omero-h5", str(out), "--image-id", "42",
                "--where", "area > 20")
    assert r.returncode == 0, r.stderr
    expected = _store_rows(case / "s.cellar", "area > 20")
    with tables.open_file(out) as h5:
        assert h5.title == "OMERO HDF Measurement Storage"
        t = h5.root.OME.Measurements
        kinds = [k.decode() for k in h5.root.OME.ColumnTypes.read()]
        descriptions = [d.decode() for d in h5.root.OME.ColumnDescriptions.read()]
        assert t.attrs["__version"] == "2" and isinstance(t.attrs["__initialized"], float)
        assert t.attrs["cellar_where"] == "(area > 20)"
        names = t.colnames
        assert names[0] == "Image" and kinds[0] == "::omero::grid::ImageColumn"
        assert (t.col("Image") == 42).all()
        by_name = dict(zip(names, kinds))
        assert by_name["label_id"] == "::omero::grid::LongColumn" and t.coldtypes["label_id"] == np.int64
        assert by_name["area_um2"] == "::omero::grid::DoubleColumn"
        assert by_name["image"] == "::omero::grid::StringColumn"
        assert descriptions[names.index("area_um2")].startswith("unit: micrometer^2; ")
        assert t.nrows == len(expected)
        data = t.read()
        order = np.argsort(data["label_id"])
        for col in expected.columns:
            values = data[col][order]
            if values.dtype.kind == "S":
                values = [v.decode() for v in values]
            _same(values, expected[col].to_numpy(), col)
        assert np.isnan(data["intensity_skewness__CD_8"]).all()  # non-finite values kept
        # numexpr conditions (OMERO's getWhereList) work on the column names
        hits = t.get_where_list("(area > 40) & (intensity_mean__DAPI > 0)")
        assert len(hits) == int(((expected.area > 40) & (expected.intensity_mean__DAPI > 0)).sum())


def test_omero_roi_column_and_identifier_safe_names(case):
    out = case / "roi.h5"
    r = run_cli("export", str(case / "s.cellar"), "--to", "omero-h5", str(out), "--roi-column", "touching_neighbors",
                "--columns", "label_id,area,touching_neighbors")
    assert r.returncode == 0, r.stderr
    with tables.open_file(out) as h5:
        t = h5.root.OME.Measurements
        assert t.colnames == ["label_id", "area", "Roi"]
        assert h5.root.OME.ColumnTypes.read()[2] == b"::omero::grid::RoiColumn"
    assert export_mod.omero_names(["a b", "__version", "ok", "a_b"]) == {
        "a b": "a_b", "__version": "version", "ok": "ok", "a_b": "a_b_2"}


def _omero_python() -> str:
    """The Python 3.10 with omero-py that runs OMERO's reader: CELLAR_OMERO_PYTHON, else the .venv-omero that
    scripts/test builds (waited for while its build runs). The test fails when that python does not work or none
    is set up, and skips only where scripts/test found no Python 3.10 to build one with (CELLAR_OMERO_SKIP says so)."""
    python = os.environ.get("CELLAR_OMERO_PYTHON")
    if not python and OMERO_VENV_PYTHON.exists():
        python = str(OMERO_VENV_PYTHON)
    if not python:
        if reason := os.environ.get("CELLAR_OMERO_SKIP"):
            pytest.skip(reason)
        pytest.fail("no Python with omero-py: run scripts/test, which builds .venv-omero (or set CELLAR_OMERO_PYTHON)",
                    pytrace=False)
    built_here = Path(python).parent.resolve() == OMERO_VENV_PYTHON.parent.resolve()
    if built_here:
        _wait_for_the_omero_build()
    try:
        probe = subprocess.run([python, "-c", "import omero.hdfstorageV2, tables"], capture_output=True, text=True,
                               timeout=120)
    except OSError as exc:
        pytest.fail(f"OMERO's python {python} does not run: {exc}", pytrace=False)
    if probe.returncode != 0:
        pytest.fail(f"OMERO's python {python} cannot import omero.hdfstorageV2 and tables: "
                    f"{(probe.stderr.strip().splitlines() or ['no output'])[-1]}"
                    + (f" (scripts/test's build log: {OMERO_LOG})" if built_here else ""), pytrace=False)
    return python


def _wait_for_the_omero_build(timeout: float = 1800) -> None:
    """Wait while scripts/test builds .venv-omero in the background (the build holds an exclusive lock)."""
    if not OMERO_LOCK.exists():
        return
    deadline = time.monotonic() + timeout
    with open(OMERO_LOCK) as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the build of .venv-omero has not finished after {timeout / 60:.0f} minutes (log: "
                                f"{OMERO_LOG})", pytrace=False)
                time.sleep(2)


@pytest.mark.omero
def test_omero_reads_the_export_with_its_own_storage_class(case):
    python = _omero_python()
    out = case / "o.h5"
    r = run_cli("export", str(case / "s.cellar"), "--to", "omero-h5", str(out), "--image-id", "7")
    assert r.returncode == 0, r.stderr
    expected = _store_rows(case / "s.cellar")
    res = subprocess.run([python, str(OMERO_READ), str(out), "(area > 40)"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"rows {len(expected)} cols {len(expected.columns) + 1}"
    assert "  Image ImageColumnI 'OMERO image id'" in lines  # OMERO's implementation classes end in I
    assert any(ln.startswith("  area_um2 DoubleColumnI 'unit: micrometer^2") for ln in lines)
    assert any(ln.startswith("  label_id LongColumnI ") for ln in lines)
    where = next(ln for ln in lines if ln.startswith("where "))
    assert where.startswith(f"where {int((expected.area > 40).sum())} rows")


def test_csv_and_parquet_round_trip_with_units(case):
    expected = _store_rows(case / "s.cellar")
    for fmt in ("csv", "parquet"):
        out = case / f"t.{fmt}"
        r = run_cli("export", str(case / "s.cellar"), "--to", fmt, str(out))
        assert r.returncode == 0, r.stderr
        reader = f"read_csv('{out}', comment='#', header=true)" if fmt == "csv" else f"read_parquet('{out}')"
        got = duckdb.sql(f"SELECT * FROM {reader} ORDER BY label_id").df()
        assert list(got.columns) == list(expected.columns)
        for col in expected.columns:
            _same(got[col].to_numpy(), expected[col].to_numpy(), col)
    head = (case / "t.csv").read_text().splitlines()[:2]
    assert head[0].startswith("# cellar export: ") and "area_um2=micrometer^2" in head[1]
    assert pq.read_schema(case / "t.parquet").field("area_um2").metadata[b"unit"] == b"micrometer^2"


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_anndata_for_spatialdata(case, suffix):
    import anndata

    out = case / f"t{suffix}"
    info = query.open(case / "s.cellar").where("area > 20").export("anndata", str(out))
    a = anndata.read_h5ad(out) if suffix == ".h5ad" else anndata.read_zarr(out)
    expected = _store_rows(case / "s.cellar", "area > 20")
    assert a.n_obs == len(expected) == info["rows"]
    order = np.argsort(a.obs["instance_id"].to_numpy())
    np.testing.assert_array_equal(a.obs["instance_id"].to_numpy()[order], expected.label_id.to_numpy().astype(np.int64))
    j = list(a.var_names).index("area_um2")
    np.testing.assert_array_equal(a.X[order, j], expected.area_um2.to_numpy())
    assert a.var.loc["area_um2", "unit"] == "micrometer^2"
    np.testing.assert_array_equal(a.obsm["spatial"][order], expected[["centroid_x_um", "centroid_y_um"]].to_numpy())
    assert dict(a.uns["spatialdata_attrs"]) == {"region": "nuclei", "region_key": "region", "instance_key": "instance_id"}
    assert set(a.obs["region"]) == {"nuclei"}
    r = run_cli("export", str(case / "s.cellar"), "--to", "anndata", str(case / f"cli{suffix}"))
    lines = r.stderr.splitlines()  # cellar's one line, no library's warnings
    n_all = len(_store_rows(case / "s.cellar"))
    assert r.returncode == 0 and lines == [f"exported {n_all} rows x {a.n_vars} columns as anndata to {case / f'cli{suffix}'}"], lines


def test_ngff_properties_are_written_and_bounded(case):
    r = run_cli("export", str(case / "s.cellar"), "--to", "ngff-properties", "--columns", "area,eccentricity")
    assert r.returncode == 0, r.stderr
    props = ngff.open_image(str(case / "img.ome.zarr")).label("nuclei").image_label["properties"]
    expected = _store_rows(case / "s.cellar")
    assert [p["label-value"] for p in props] == expected.label_id.tolist()
    assert [p["area"] for p in props] == expected.area.tolist()
    r = run_cli("export", str(case / "s.cellar"), "--to", "ngff-properties", "--max-cells", "10")
    assert r.returncode == 2 and "more than --max-cells 10" in r.stderr


def test_bad_exports_fail_cleanly(case, monkeypatch):
    store = str(case / "s.cellar")
    (case / "exists.csv").write_text("x")
    for args, fragment in [
        (("--to", "csv", str(case / "exists.csv")), "exists; pass --overwrite"),
        (("--to", "csv", str(case / "x.csv"), "--columns", "aera"), "unknown column 'aera' (did you mean: area"),
        (("--to", "xlsx", str(case / "x.xlsx")), "--to xlsx: unknown format (expected one of omero-h5, csv"),
        (("--to", "anndata", str(case / "x.csv")), "ends in .h5ad or .zarr"),
        (("--to", "csv"), "--to csv needs an OUTPUT file"),
    ]:
        r = run_cli("export", store, *args)
        assert r.returncode == 2 and fragment in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    assert (case / "exists.csv").read_text() == "x" and not (case / "x.csv").exists()
    # long text: an annotation with a 40-byte value against --max-string 16
    _, df = read_table(case / "s.cellar")
    (case / "notes.csv").write_text(f"label_id,note\n{df.label_id[0]},{'x' * 40}\n")
    assert run_cli("annotate", store, "--from", str(case / "notes.csv")).returncode == 0
    r = run_cli("export", store, "--to", "omero-h5", str(case / "n.h5"), "--max-string", "16")
    assert r.returncode == 2 and "column 'note' holds text of 40 bytes, longer than --max-string 16" in r.stderr
    assert not (case / "n.h5").exists()

    # a write that fails midway (disk full) leaves nothing at OUTPUT and no temporary files
    def failing(q):
        real = q.relation().arrow(batch_size=8)

        def batches():
            for batch in real:
                yield batch
                raise OSError(28, "No space left on device")

        return pa.RecordBatchReader.from_batches(real.schema, batches())

    class Full:  # a file on a disk that fills after 2,000 bytes
        def __init__(self, *args):
            self.file, self.written = open(*args), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.written += len(data)
            if self.written > 2000:
                raise OSError(28, "No space left on device")
            return self.file.write(data)

    monkeypatch.setattr(export_mod, "open", Full, raising=False)  # the CSV's rows: polars streams them
    with pytest.raises(UsageError, match="cannot write \\(No space left on device\\)"):
        query.open(store).export("csv", str(case / "full.csv"))
    monkeypatch.setattr(export_mod, "_reader", failing)  # the Parquet's: DuckDB's batches
    with pytest.raises(UsageError, match="cannot write \\(No space left on device\\)"):
        query.open(store).export("parquet", str(case / "full.parquet"))
    assert not (case / "full.csv").exists() and not (case / "full.parquet").exists()
    assert not [p for p in case.iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(QueryError):
        query.open(store).where("nope > 1").export("csv", str(case / "q.csv"))


def test_omero_widens_annotation_types(case):
    store = case / "s.cellar"
    _, df = read_table(store)
    ids = df.label_id.to_numpy()[:5]
    rows = "".join(f"{i},{'tumour' if k % 2 else 'ok'},{k % 2 == 0},{k * 0.5}\n" for k, i in enumerate(ids))
    (case / "a.csv").write_text("label_id,klass,reviewed,score\n" + rows)
    assert run_cli("annotate", str(store), "--from", str(case / "a.csv")).returncode == 0
    r = run_cli("export", str(store), "--to", "omero-h5", str(case / "a.h5"), "--where", "klass IS NOT NULL",
                "--columns", "label_id,klass,reviewed,score")
    assert r.returncode == 0, r.stderr
    with tables.open_file(case / "a.h5") as h5:
        t = h5.root.OME.Measurements
        kinds = [k.decode().split("::")[-1] for k in h5.root.OME.ColumnTypes.read()]
        assert kinds == ["LongColumn", "StringColumn", "BoolColumn", "DoubleColumn"]
        assert t.coldtypes["klass"] == np.dtype("S6")  # the longest value, 'tumour'
        data = np.sort(t.read(), order="label_id")
    order = np.argsort(ids)
    assert data["label_id"].tolist() == ids[order].tolist()
    assert [v.decode() for v in data["klass"]] == [("tumour" if k % 2 else "ok") for k in order]
    assert data["reviewed"].tolist() == [k % 2 == 0 for k in order]
    assert data["score"].tolist() == [k * 0.5 for k in order]
