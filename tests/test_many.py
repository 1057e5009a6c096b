"""Several images and HCS plates into one store, and resuming a run that was killed."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cellar import measure
from cellar import query
from cellar.schemas import log
from cellar.ngff.write import write_image, write_plate
from helpers import assert_matches_regionprops, feature_columns, intensities, nuclei_like, read_table, run_cli


def _plate(path: Path, version: str = "0.5") -> Path:
    wells = {w: [(intensities((48, 64), 2, seed=10 * i + k), {"nuclei": nuclei_like((48, 64), 12, seed=10 * i + k)})
                 for k in range(2)] for i, w in enumerate(("A/1", "A/2", "B/1"))}
    return write_plate(path, wells, "cyx", version=version, name="p1", chunks=(1, 24, 32),
                       channel_names=["DAPI", "CD8"], scale={"y": 0.5, "x": 0.5})


def _rows(store: Path) -> dict[str, list]:
    objs = query.open(store)
    df = objs.sql("SELECT * FROM objects ORDER BY image, label_image, label_id").df()
    return {c: df[c].tolist() for c in df.columns}


def test_several_images_go_into_one_store(tmp_path):
    paths = []
    for k in range(2):
        paths.append(write_image(tmp_path / f"im{k}.ome.zarr", intensities((50, 60), 1, seed=k), "cyx",
                                 labels={"nuclei": nuclei_like((50, 60), 10, seed=k)}, chunks=(1, 25, 30)))
    r = run_cli("measure", *map(str, paths), "--labels", "nuclei", "--out", str(tmp_path / "s.cellar"), "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "[1/2] measured" in r.stderr and "[2/2] measured" in r.stderr and "2 tables (2 measured now" in r.stdout
    for k, p in enumerate(paths):
        measure.measure(str(p), "nuclei", tmp_path / f"one{k}.cellar", workers=1)
        _, alone = read_table(tmp_path / f"one{k}.cellar")
        _, together = read_table(tmp_path / "s.cellar", image=f"im{k}")
        assert together.equals(alone)
    again = run_cli("measure", *map(str, paths), "--labels", "nuclei", "--out", str(tmp_path / "s.cellar"))
    assert again.returncode == 0 and "already in the store with the same settings, kept" in again.stderr


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_plate_is_measured_field_by_field_with_well_columns(tmp_path, version):
    plate = _plate(tmp_path / "plate.zarr", version)
    r = run_cli("measure", str(plate), "--labels", "nuclei", "--out", str(tmp_path / "s.cellar"), "--workers", "1")
    assert r.returncode == 0, r.stderr
    objs = query.open(tmp_path / "s.cellar")
    per = objs.sql('SELECT image, well, row, "column", field, plate, count(*) AS n FROM objects '
                   "GROUP BY ALL ORDER BY image").fetchall()
    assert [p[:6] for p in per] == [
        ("p1_A1_0", "A/1", "A", "1", 0, "p1"), ("p1_A1_1", "A/1", "A", "1", 1, "p1"),
        ("p1_A2_0", "A/2", "A", "2", 0, "p1"), ("p1_A2_1", "A/2", "A", "2", 1, "p1"),
        ("p1_B1_0", "B/1", "B", "1", 0, "p1"), ("p1_B1_1", "B/1", "B", "1", 1, "p1")]
    field = str(plate / "B" / "1" / "1")
    measure.measure(field, "nuclei", tmp_path / "f.cellar", workers=1)
    _, alone = read_table(tmp_path / "f.cellar")
    _, inplate = read_table(tmp_path / "s.cellar", image="p1_B1_1")
    assert inplate[alone.columns].equals(alone)
    assert inplate.well.unique().tolist() == ["B/1"]
    units = dict(objs.sql("SELECT name, description FROM columns WHERE name IN ('well', 'field')").fetchall())
    assert units["well"].startswith("Well path")


def test_a_killed_run_resumes_to_the_same_store(tmp_path):
    """SIGKILL `cellar measure PLATE` at random moments, start it again each time, and compare the finished
    store with an uninterrupted run: no duplicate and no missing rows. Between attempts, a reader sees only
    complete tables."""
    plate = _plate(tmp_path / "plate.zarr")
    args = [str(plate), "--labels", "nuclei", "--workers", "1", "--quiet"]
    t0 = time.perf_counter()
    assert run_cli("measure", *args, "--out", str(tmp_path / "whole.cellar")).returncode == 0
    whole_run = time.perf_counter() - t0  # kill moments are drawn from the span of a whole run on this machine
    store = tmp_path / "killed.cellar"
    exe = Path(sys.executable).with_name("cellar")
    rng = random.Random(7)
    kills = 0
    for attempt in range(8):
        proc = subprocess.Popen([str(exe), "measure", *args, "--out", str(store)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:  # the last attempt runs to the end
            proc.wait(timeout=rng.uniform(0.1, 0.9) * whole_run if attempt < 7 else 600)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            if store.exists():  # what a reader sees now: complete tables only
                snap = log.snapshot(store)
                counts = dict(query.open(store).sql("SELECT image, count(*) FROM objects GROUP BY image").fetchall())
                assert counts == {e["image"]: e["n_objects"] for e in snap.entries() if e["n_objects"]}
            continue
        assert proc.returncode == 0, proc.stderr.read()
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 1, kills
    print(f"killed {kills} times, finished on attempt {attempt + 1}")
    assert _rows(store) == _rows(tmp_path / "whole.cellar")
    # What the killed runs left (files no commit lists, a first write's staging folder) is invisible, and a
    # vacuum that keeps nothing for readers at work removes it
    r = run_cli("vacuum", str(store), "--retain-hours", "0")
    assert r.returncode == 0, r.stderr
    listed = {f"{e['dir']}/{name}" for e in log.snapshot(store).entries() for name in e["files"]}
    assert {p.relative_to(store).as_posix() for p in (store / "objects").rglob("*") if p.is_file()} == listed
    assert not list(tmp_path.glob(".tmp*")) and not list(store.rglob(".tmp*"))



def test_progress_lines_when_not_on_a_terminal(monkeypatch):
    """Without a terminal, progress goes to plain log lines, at most one every 2 s; short runs print none."""
    import cellar.measure.run as run

    clock = iter([0.0] + [0.9 * k for k in range(1, 11)])  # the start, then one reading per region
    monkeypatch.setattr(run.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    with run._progress(10, None, lines.append, "img/labels/nuclei") as tick:
        for _ in range(10):
            tick(7)
    assert lines[0].startswith("measuring img/labels/nuclei: 3/10 regions, 21 objects")
    assert lines[-1].startswith("measuring img/labels/nuclei: 10/10 regions, 70 objects") and "ETA 0.0 s" in lines[-1]
    assert [ln.split(": ")[1].split(" ")[0] for ln in lines] == ["3/10", "6/10", "9/10", "10/10"]
    quick: list[str] = []
    monkeypatch.setattr(run.time, "perf_counter", lambda: 0.0)
    with run._progress(10, None, quick.append, "x") as tick:
        for _ in range(10):
            tick(1)
    assert quick == []
    with run._progress(10, False, quick.append, "x") as tick:  # --quiet
        tick(1)
    assert quick == []


def test_a_dask_local_cluster_gives_the_same_table(tmp_path):
    """The table measured on a dask LocalCluster equals scikit-image's regionprops (every column), and the
    process pool's table."""
    labels = nuclei_like((120, 150), 60, seed=71)
    chans = intensities((120, 150), 2, seed=72)
    image = write_image(tmp_path / "img.zarr", chans, "cyx", chunks=(1, 40, 50), labels={"nuclei": labels})
    measure.measure(str(image), "nuclei", tmp_path / "pool.cellar", workers=2, region_pixels=0, halo=6)
    measure.measure(str(image), "nuclei", tmp_path / "dask.cellar", workers=2, region_pixels=0, halo=6,
                    scheduler="local")
    compared = assert_matches_regionprops(tmp_path / "dask.cellar", labels, chans)
    assert compared == feature_columns("yx", (1.0, 1.0), ["c0", "c1"])  # every column of the default features
    _, pool = read_table(tmp_path / "pool.cellar")
    _, dask = read_table(tmp_path / "dask.cellar")
    assert list(pool.columns) == list(dask.columns) and len(dask) == len(np.unique(labels)) - 1
    for col in pool.columns:  # float sums may merge in another order: equal to rounding
        np.testing.assert_allclose(dask[col].to_numpy(np.float64), pool[col].to_numpy(np.float64), rtol=1e-12,
                                   err_msg=col)
    r = run_cli("measure", str(image), "--labels", "nuclei", "--out", str(tmp_path / "x.cellar"),
                "--scheduler", "tcp://127.0.0.1:9")
    assert r.returncode == 2 and "--scheduler tcp://127.0.0.1:9: cannot connect" in r.stderr, r.stderr


def test_every_timepoint_as_a_table(tmp_path):
    t_labels = np.stack([nuclei_like((40, 50), 8, seed=80 + t) for t in range(3)])  # (t, y, x)
    data = np.stack([intensities((40, 50), 1, seed=90 + t) for t in range(3)])  # (t, c, y, x)
    image = write_image(tmp_path / "movie.zarr", data, "tcyx", chunks=(1, 1, 20, 25), labels={"nuclei": t_labels})
    r = run_cli("measure", str(image), "--labels", "nuclei", "--out", str(tmp_path / "s.cellar"),
                "--timepoint", "all", "--workers", "1")
    assert r.returncode == 0, r.stderr
    for t in range(3):
        measure.measure(str(image), "nuclei", tmp_path / f"t{t}.cellar", timepoint=t, workers=1)
        _, alone = read_table(tmp_path / f"t{t}.cellar")
        _, part = read_table(tmp_path / "s.cellar", image=f"movie_t{t}")
        assert (part.timepoint == t).all() and part[alone.columns].equals(alone)


def test_the_progress_bar_goes_to_standard_error(monkeypatch, capsys):
    """stdout carries results (`cellar sql ... --format csv > out.csv`): the bar is drawn on stderr, the stream
    whose being a terminal decided that a bar is shown."""
    from cellar.measure import run

    monkeypatch.setenv("FORCE_COLOR", "1")  # rich draws as on a terminal
    with run._progress(4, True, None, "img/labels/nuclei") as tick:
        for _ in range(4):
            tick(3)
    out, err = capsys.readouterr()
    assert out == "" and "measuring img/labels/nuclei" in err


def test_dask_dataframe_on_a_local_cluster_reads_the_store_as_cellar_does(tmp_path):
    """A cohort store read, unmodified, by dask.dataframe on a dask.distributed LocalCluster: the snapshot's
    files (`Objects.data_files`, `cellar info --files`) with their Hive keys give cellar's group-by. A table
    measured again leaves its replaced file in place until `cellar vacuum`: a glob would count it twice."""
    from dask import dataframe as dd
    from distributed import Client, LocalCluster

    store = tmp_path / "s.cellar"
    for k in range(3):
        image = write_image(tmp_path / f"im{k}.zarr", intensities((60, 80), 2, seed=k), "cyx", chunks=(1, 30, 40),
                            labels={"nuclei": nuclei_like((60, 80), 15, seed=k),
                                    "cells": nuclei_like((60, 80), 9, radius=9.0, seed=k + 9)})
        for label_image in ("nuclei", "cells"):
            measure.measure(str(image), label_image, store, workers=1)
    measure.measure(str(image), "cells", store, workers=1, halo=7, overwrite=True)  # replaces im2/cells' file
    objs = query.open(store)
    files = objs.data_files()
    assert len(files) == 6 and len(list((store / "objects").glob("*/*/*.parquet"))) == 7
    r = run_cli("info", str(store), "--files")
    assert r.returncode == 0 and r.stdout.split() == files, r.stderr
    expected = objs.sql("SELECT image, label_image, count(*) AS n, avg(area) AS area, "
                        "sum(intensity_mean__c1) AS c1 FROM objects GROUP BY ALL ORDER BY ALL").fetchall()

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster):
        frame = dd.read_parquet(files, dataset={"partitioning": {"flavor": "hive"},
                                                "partition_base_dir": str((store / "objects").resolve())})
        got = (frame.groupby(["image", "label_image"], observed=True)
               .agg(n=("area", "count"), area=("area", "mean"), c1=("intensity_mean__c1", "sum")).compute())
    got = got.reset_index().astype({"image": str, "label_image": str}).sort_values(["image", "label_image"])
    assert [(i, l, n) for i, l, n, *_ in expected] == list(zip(got.image, got.label_image, got.n))
    np.testing.assert_allclose(got.area, [row[3] for row in expected], rtol=1e-12)
    np.testing.assert_allclose(got.c1, [row[4] for row in expected], rtol=1e-12)
