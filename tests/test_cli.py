"""The `cellar` command as a user types it: happy paths, and every bad input as one line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from cellar.measure import features as registry
from cellar.ngff.write import write_image
from helpers import intensities, nuclei_like, read_table, run_cli


def _good(path: Path, version: str = "0.5", labels=None, **kw) -> Path:
    labels = nuclei_like((48, 64), 15, seed=31) if labels is None else labels
    return write_image(path, intensities((48, 64), 2, seed=32), "cyx", chunks=(1, 16, 16), labels={"nuclei": labels},
                       channel_names=["DAPI", "CD8"], scale={"y": 0.5, "x": 0.5}, version=version, n_levels=2, **kw)


def _assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cellar: error: ") and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    image = _good(tmp / "img.ome.zarr")
    proc = run_cli("measure", str(image), "--labels", "nuclei", "--out", str(tmp / "img.cellar"), "--workers", "2",
                   "--region-pixels", "0")
    assert proc.returncode == 0, proc.stderr
    assert "measured 15 objects of img/labels/nuclei (12 regions)" in proc.stdout
    return tmp, image, tmp / "img.cellar"


def test_measure_then_sql_prints_a_readable_table(measured):
    _, _, store = measured
    proc = run_cli("sql", str(store), "SELECT label_id, area, round(intensity_mean__CD8, 1) AS cd8 FROM objects "
                   "ORDER BY area DESC LIMIT 3")
    assert proc.returncode == 0, proc.stderr
    _, df = read_table(store)
    top = df.sort_values("area", ascending=False).head(3)
    assert "label_id" in proc.stdout and "cd8" in proc.stdout
    for value in top.label_id:
        assert f" {value} " in proc.stdout


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_sql_writes_csv_json_and_parquet_files(measured, fmt):
    tmp, _, store = measured
    out = tmp / f"result.{fmt}"
    sql = "SELECT label_id, area_um2 FROM objects WHERE area > 20 ORDER BY label_id"
    proc = run_cli("sql", str(store), sql, "--format", fmt, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    _, df = read_table(store)
    expected = df[df.area > 20].sort_values("label_id").label_id.tolist()
    if fmt == "csv":
        got = [int(line.split(",")[0]) for line in out.read_text().splitlines()[1:]]
    elif fmt == "json":
        got = [row["label_id"] for row in json.loads(out.read_text())]
    else:
        got = pq.read_table(out).column("label_id").to_pylist()
    assert got == expected
    again = run_cli("sql", str(store), sql, "--format", fmt, "--output", str(out))
    _assert_one_line_error(again, "exists; pass --overwrite")


def test_sql_prints_csv_to_stdout(measured):
    _, _, store = measured
    proc = run_cli("sql", str(store), "SELECT label_id FROM objects ORDER BY label_id LIMIT 2", "--format", "csv")
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == '"label_id"'
    assert len(proc.stdout.splitlines()) == 3


def test_info_describes_the_store(measured):
    _, image, store = measured
    proc = run_cli("info", str(store), "--columns")
    assert proc.returncode == 0, proc.stderr
    assert "image=img label_image=nuclei: 15 objects" in proc.stdout
    assert str(image.resolve()) in proc.stdout and "DAPI, CD8" in proc.stdout and "micrometer^2" in proc.stdout


def test_measure_help_lists_every_feature_group_of_the_registry():
    proc = run_cli("measure", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # as one line, whatever argparse's wrapping
    options = text[text.index("-h, --help"):]  # not the usage line
    features = options[options.index("--features FEATURES"):options.index("--radius RADIUS")]
    assert f"groups ({', '.join(registry.GROUPS)})" in features and "texture" in features
    assert f"(default: {','.join(registry.DEFAULT_GROUPS)};" in features


def test_building_the_parser_does_not_load_the_registry():
    """Only `cellar measure --help` reads the registry: importing it loads the compiled kernels (about a second),
    which `cellar sql` and the other commands do not need."""
    code = ("import sys; from cellar.cli import build_parser; "
            "build_parser().parse_args(['measure', 'img', '--labels', 'n', '--out', 'o', '--features', 'all']); "
            "print(sorted(m for m in ('numba', 'cellar.measure') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


GC_AFTER = ("import gc, sys; from cellar.cli import main; {call}; "
            "print(gc.isenabled(), gc.get_freeze_count() > 0, 'cellar.measure.run' in sys.modules)")


def test_a_command_run_as_its_process_freezes_what_start_up_made_and_collects_again(tmp_path):
    """`cellar measure` (main() reading the process's command line) collects no garbage while its modules load,
    then freezes them and collects again; main(argv) called from Python leaves the collector as it was."""
    labels = nuclei_like((30, 30), 4, seed=1)
    image = write_image(tmp_path / "img.ome.zarr", intensities((30, 30), 1, seed=2), "cyx", labels={"n": labels})
    args = ["measure", str(image), "--labels", "n", "--out", str(tmp_path / "s.cellar"), "--quiet"]
    own = f"sys.argv = ['cellar', *{args!r}]; main()"
    called = f"main({[*args[:-2], str(tmp_path / 't.cellar'), '--quiet']!r})"
    for call, want in ((own, "True True True"), (called, "True False True")):
        proc = subprocess.run([sys.executable, "-c", GC_AFTER.format(call=call)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and proc.stdout.strip() == want, proc.stdout + proc.stderr


def test_demo_runs_with_no_arguments(tmp_path):
    proc = run_cli("demo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "measured" in proc.stdout and "nuclei" in proc.stdout
    assert proc.stdout.count("┌") == 3  # three query results
    assert (tmp_path / "cellar-demo" / "ihc.cellar" / "cellar.json").exists()
    entry, df = read_table(tmp_path / "cellar-demo" / "ihc.cellar")
    labels = zarr.open_array(str(tmp_path / "cellar-demo" / "ihc.ome.zarr" / "labels" / "nuclei" / "0"), mode="r")[...]
    present = np.unique(labels)
    assert df.label_id.tolist() == present[present > 0].tolist()  # one row per nucleus the demo segmented
    assert len(df) > 100 and entry["source"]["ngff_version"] == "0.5"
    assert run_cli("demo", cwd=tmp_path).returncode == 0  # re-running rebuilds its own directory


# --- bad input: each is one line on stderr, exit status 2, and nothing written -------------------------


def _not_ngff(tmp: Path) -> Path:
    g = zarr.open_group(str(tmp / "plain.zarr"), mode="w")
    g.create_array("data", shape=(4, 4), dtype="uint8")
    return tmp / "plain.zarr"


def _old_version(tmp: Path) -> Path:
    p = _good(tmp / "old.zarr", version="0.4")
    root = zarr.open_group(str(p), mode="r+")
    ms = root.attrs["multiscales"]
    ms[0]["version"] = "0.3"
    root.attrs["multiscales"] = ms
    return p


def _no_labels(tmp: Path) -> Path:
    return write_image(tmp / "nolab.zarr", np.zeros((1, 8, 8), np.uint8), "cyx")


def _float_labels(tmp: Path) -> Path:
    return _good(tmp / "float.zarr", labels=nuclei_like((48, 64), 15, seed=31).astype(np.float32))


def _negative_labels(tmp: Path) -> Path:
    lab = nuclei_like((48, 64), 15, seed=31).astype(np.int32)
    lab[40, 50] = -4
    return _good(tmp / "neg.zarr", labels=lab)


def _shape_mismatch(tmp: Path) -> Path:
    p = _good(tmp / "mismatch.zarr")
    root = zarr.open_group(str(p), mode="r+")
    del root["labels/nuclei/0"]
    root["labels/nuclei"].create_array("0", shape=(48, 60), dtype="uint32")
    return p


BAD_MEASURE = [
    ("missing path", lambda t: t / "nope.zarr", [], ["nope.zarr: no such file or directory"]),
    ("not ngff", _not_ngff, [], ["not an OME-NGFF image (no 'multiscales'"]),
    ("old version", _old_version, [], ["NGFF version 0.3 is not supported (cellar reads 0.4 and 0.5)"]),
    ("no labels", _no_labels, [], ["no 'labels' group"]),
    ("unknown label", lambda t: _good(t / "u.zarr"), ["--labels", "cells"], ["no label image 'cells'", "it has: nuclei"]),
    ("float labels", _float_labels, [], ["labels/nuclei/0/zarr.json: dtype float32, expected an integer dtype"]),
    ("negative labels", _negative_labels, [], ["negative label value -4", "label values must be >= 0"]),
    ("shape mismatch", _shape_mismatch, [], ["spatial shape (48, 60) at level 0, but the image (0) has (48, 64)"]),
    ("level out of range", lambda t: _good(t / "l.zarr"), ["--level", "2"], ["--level 2 out of range", "valid: 0..1"]),
    ("unknown channel", lambda t: _good(t / "c.zarr"), ["--channels", "DAPI,CD4"], ["no channel 'CD4' (channels: DAPI, CD8)"]),
]


@pytest.mark.parametrize("make, extra, fragments", [b[1:] for b in BAD_MEASURE], ids=[b[0] for b in BAD_MEASURE])
def test_bad_measure_input_is_one_line_and_writes_nothing(tmp_path, make, extra, fragments):
    image = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["measure", str(image), "--out", str(tmp_path / "out.cellar"), "--workers", "1"]
    if "--labels" not in extra:
        args += ["--labels", "nuclei"]
    _assert_one_line_error(run_cli(*args, *extra), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_output_that_exists_and_is_not_a_store_is_refused(tmp_path, kind):
    image = _good(tmp_path / "img.zarr")
    out = tmp_path / "taken"
    if kind == "directory":
        out.mkdir()
        (out / "data.txt").write_text("keep me")
    else:
        out.write_text("keep me")
    proc = run_cli("measure", str(image), "--labels", "nuclei", "--out", str(out), "--workers", "1")
    _assert_one_line_error(proc, str(out), "not a cellar store; refusing")
    assert (out / "data.txt" if kind == "directory" else out).read_text() == "keep me"


@pytest.mark.parametrize("sql, fragment", [
    ("SELEKT * FROM objects", 'Parser Error: syntax error at or near "SELEKT"'),
    ("SELECT aera FROM objects", "unknown column 'aera' (did you mean: area"),
])
def test_bad_sql_is_duckdbs_message_on_one_line(measured, sql, fragment):
    _, _, store = measured
    _assert_one_line_error(run_cli("sql", str(store), sql), fragment)


def test_sql_on_a_path_that_is_not_a_store(tmp_path):
    _assert_one_line_error(run_cli("sql", str(tmp_path), "SELECT 1"), "not a cellar store (no cellar.json)")
