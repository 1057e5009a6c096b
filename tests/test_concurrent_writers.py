"""Many writers, one store: processes that measure and annotate into one store at once, a new one or an existing
one, some killed at random moments. Every write that reports success must be in the store, whole and readable;
every other one fails with one line; the store's log and its data files agree."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import measure
import query
from ngff.write import write_image
from schemas import log
from tests.conftest import intensities, nuclei_like

SHAPE = (48, 64)
N_LABELS = 12


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("writers")
    return write_image(tmp / "img.ome.zarr", intensities(SHAPE, 1, seed=91), "cyx", chunks=(1, 24, 32),
                       labels={"nuclei": nuclei_like(SHAPE, N_LABELS, seed=92)}, scale={"y": 0.5, "x": 0.5})


def _child(argv: list[str], err: str, start) -> None:
    """A writer process: waits for the others, then runs `cellar ARGV` (stderr into `err`)."""
    from cellar.cli import main

    with open(err, "w") as fh:
        os.dup2(fh.fileno(), 2)
        sys.stderr = os.fdopen(2, "w", closefd=False)
        start.wait()
        code = main(argv)
        sys.stderr.flush()
    os._exit(code)


def _run_all(jobs: list[list[str]], tmp: Path, kill_after: dict[int, float] | None = None) -> list[tuple[int, str]]:
    """Start every job as its own process at the same moment; SIGKILL the jobs in `kill_after` (index ->
    seconds after the start). Returns (exit code, stderr) per job (-9 for a killed one)."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(len(jobs) + 1)
    errs = [tmp / f"err-{k}-{time.monotonic_ns()}.txt" for k in range(len(jobs))]
    procs = [ctx.Process(target=_child, args=(argv, str(err), start)) for argv, err in zip(jobs, errs)]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.monotonic()
    for k, delay in sorted((kill_after or {}).items(), key=lambda kv: kv[1]):
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        os.kill(procs[k].pid, signal.SIGKILL)
    out = []
    for p, err in zip(procs, errs):
        p.join(120)
        assert p.exitcode is not None, "a writer hung"
        out.append((p.exitcode, err.read_text() if err.exists() else ""))
    return out


def _measure(image: Path, store: Path, name: str) -> list[str]:
    return ["measure", str(image), "--labels", "nuclei", "--out", str(store), "--image-name", name,
            "--workers", "1", "--quiet"]


def _check_store(store: Path) -> log.Snapshot:
    """The log and the data agree: every listed file exists and holds the table's rows; the views answer."""
    snap = log.snapshot(store)
    objs = query.open(store, cache=False)
    for entry in snap.entries():
        rows = sum(pq.ParquetFile(store / entry["dir"] / f).metadata.num_rows for f in entry["files"])
        assert rows == entry["n_objects"] == N_LABELS, entry["image"]
        for record in entry.get("annotations", []):
            files = [store / record["dir"] / f for f in record["files"]]
            assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == record["rows"]
    counts = dict(objs.sql("SELECT image, count(*) FROM objects GROUP BY image").fetchall())
    assert counts == {e["image"]: N_LABELS for e in snap.entries()}
    return snap


def _errors_are_one_line(results: list[tuple[int, str]]) -> None:
    for code, err in results:
        if code not in (0, -signal.SIGKILL):
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("cellar: error: "), (code, err)


@pytest.mark.parametrize("trial", range(3))
def test_writers_creating_one_new_store_all_land(image, tmp_path, trial):
    store = tmp_path / "new.cellar"
    names = [f"w{k}" for k in range(6)]
    results = _run_all([_measure(image, store, n) for n in names], tmp_path)
    assert [code for code, _ in results] == [0] * len(names), results
    snap = _check_store(store)
    assert sorted(k[0] for k in snap.keys) == names


@pytest.mark.parametrize("trial", range(3))
def test_measuring_and_annotating_into_an_existing_store_loses_nothing(image, tmp_path, trial):
    store = tmp_path / "s.cellar"
    measure.measure(str(image), "nuclei", store, image_name="base", workers=1, progress=False)
    ids = query.open(store).label_ids()
    jobs, versions = [], []
    for k in range(4):
        csv = tmp_path / f"classes-{k}.csv"
        csv.write_text("label_id,cls,score\n" + "".join(f"{i},c{k},{k + i / 1000}\n" for i in ids[: 3 + k]))
        jobs.append(["annotate", str(store), "--from", str(csv), "--key", "label_id", "--image", "base",
                     "--labels", "nuclei"])
        versions.append((f"c{k}", 3 + k))
    jobs += [_measure(image, store, f"m{k}") for k in range(4)]
    results = _run_all(jobs, tmp_path)
    assert [code for code, _ in results] == [0] * len(jobs), results
    snap = _check_store(store)
    assert sorted(k[0] for k in snap.keys) == ["base", "m0", "m1", "m2", "m3"]
    records = snap.entry("base", "nuclei")["annotations"]
    assert sorted(r["version"] for r in records) == [1, 2, 3, 4]  # each version once, none lost
    objs = query.open(store)
    got = sorted(objs.sql("SELECT any_value(cls), count(*) FROM annotations GROUP BY version").fetchall())
    assert got == sorted(versions)


def test_writers_killed_at_random_moments_leave_a_consistent_store_that_a_rerun_completes(image, tmp_path):
    rng = random.Random(7)
    store = tmp_path / "k.cellar"
    names = [f"k{k}" for k in range(8)]
    for _ in range(3):
        kills = {k: rng.uniform(0.0, 1.5) for k in rng.sample(range(len(names)), 4)}
        results = _run_all([_measure(image, store, n) for n in names], tmp_path, kills)
        _errors_are_one_line(results)
        done = {n for n, (code, _) in zip(names, results) if code == 0}
        if log.is_store(store):
            snap = _check_store(store)
            assert done <= {k[0] for k in snap.keys}  # every write reported as done is there
        else:
            assert not done
    final = _run_all([_measure(image, store, n) for n in names], tmp_path)  # a rerun completes the store
    assert [code for code, _ in final] == [0] * len(names), final
    assert sorted(k[0] for k in _check_store(store).keys) == names
    # the same table measured alone equals any of the survivors' (nothing half written, nothing mixed)
    measure.measure(str(image), "nuclei", tmp_path / "alone.cellar", image_name="k0", workers=1, progress=False)
    alone = query.open(tmp_path / "alone.cellar").order_by("label_id").to_arrow().drop_columns(["image"])
    for name in names:
        got = query.open(store).where(f"image = '{name}'").order_by("label_id").to_arrow().drop_columns(["image"])
        assert got.equals(alone), name


def test_a_checkpoint_compacts_the_log_and_readers_see_the_same_state(image, tmp_path, monkeypatch):
    monkeypatch.setattr(log, "CHECKPOINT_EVERY", 5)
    store = tmp_path / "c.cellar"
    for k in range(13):
        measure.measure(str(image), "nuclei", store, image_name=f"t{k:02d}", workers=1, progress=False)
    snap = log.snapshot(store)
    assert snap.version == 13 and len(snap) == 13
    names = sorted(p.name for p in (store / log.LOG_DIR).iterdir() if p.is_file())
    # checkpoints 5 and 10; commits after the one before the last checkpoint (6..13); the pointer
    assert [n for n in names if n.endswith(".checkpoint.parquet")] == [f"{v:020d}.checkpoint.parquet" for v in (5, 10)]
    assert [n for n in names if n.endswith(".json") and n[0].isdigit()] == [f"{v:020d}.json" for v in range(6, 14)]
    assert query.open(store).count() == 13 * N_LABELS
    assert np.array_equal(query.open(store).where("image = 't07'").label_ids(),
                          query.open(store).where("image = 't00'").label_ids())
