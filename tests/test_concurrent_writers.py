"""Many writers, one store: processes that measure and annotate into one store at once, a new one or an existing
one, some killed at random moments. Every write that reports success must be in the store, whole and readable;
every other one fails with one line; the store's log and its data files agree."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from cellar import measure
from cellar import query
from cellar.ngff.write import write_image
from cellar.schemas import log
from cellar.schemas.errors import StoreError
from helpers import intensities, nuclei_like, run_cli

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


def test_many_annotators_of_one_table_at_once_all_land(image, tmp_path):
    """Eight annotators of one table: each loses the race for a version number to the others in turn, moving its
    file into the next version's folder while others create and fill those folders (os.renames failed here:
    its makedirs raced another annotator's, and it removed an empty folder another was about to write into). A race:
    the old code failed this way in CI, under load, and passed here on an idle machine."""
    store = tmp_path / "a.cellar"
    measure.measure(str(image), "nuclei", store, image_name="base", workers=1, progress=False)
    ids = query.open(store).label_ids()
    for trial in range(2):
        jobs = []
        for k in range(8):
            csv = tmp_path / f"t{trial}-{k}.csv"
            csv.write_text("label_id,cls\n" + "".join(f"{i},t{trial}k{k}\n" for i in ids[: 2 + k]))
            jobs.append(["annotate", str(store), "--from", str(csv), "--image", "base", "--labels", "nuclei"])
        results = _run_all(jobs, tmp_path)
        assert [code for code, _ in results] == [0] * len(jobs), [err for _, err in results if err][:3]
    records = _check_store(store).entry("base", "nuclei")["annotations"]
    assert sorted(r["version"] for r in records) == list(range(1, 17))
    got = query.open(store).sql("SELECT version, count(*) FROM annotations GROUP BY version ORDER BY version").fetchall()
    assert len(got) == 16 and sorted(n for _, n in got) == sorted([2 + k for k in range(8)] * 2)


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
    monkeypatch.setattr(log, "LOG_KEPT", 5)
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


def test_annotations_survive_the_checkpoint_that_holds_them(image, tmp_path, monkeypatch):
    """A table annotated before a checkpoint keeps its versions after it, read from the checkpoint's text."""
    from cellar.cli import main

    monkeypatch.setattr(log, "CHECKPOINT_EVERY", 4)
    monkeypatch.setattr(log, "LOG_KEPT", 4)
    store = tmp_path / "c.cellar"
    measure.measure(str(image), "nuclei", store, image_name="a", workers=1, progress=False)
    ids = query.open(store).label_ids()
    csv = tmp_path / "cls.csv"
    csv.write_text("label_id,cls\n" + "".join(f"{i},t{i % 2}\n" for i in ids))
    assert main(["annotate", str(store), "--from", str(csv), "--key", "label_id"]) == 0  # version 2
    for k in range(7):  # checkpoints at 4 and 8, which removes commits 1..4
        measure.measure(str(image), "nuclei", store, image_name=f"b{k}", workers=1, progress=False)
    assert log.checkpoint_path(store, 4).exists() and not log.commit_path(store, 2).exists()
    got = query.open(store).where("image = 'a'").select("label_id", "cls").order_by("label_id").to_arrow()
    assert got.column("cls").to_pylist() == [f"t{i % 2}" for i in sorted(ids)]
    assert [r["version"] for r in log.snapshot(store).annotations("a", "nuclei")] == [1]


def _damaged_checkpoints():
    import pyarrow as pa

    def rewrite(change):
        def apply(path: Path) -> None:
            pq.write_table(change(pq.read_table(path)), path)
        return apply

    yield "garbage", lambda p: p.write_bytes(b"not a checkpoint" * 8)
    yield "truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    yield "no object counts", rewrite(lambda t: t.drop_columns(["n_objects"]))
    yield "a table twice", rewrite(lambda t: pa.concat_tables([t, t.slice(0, 1)]))
    yield "a negative object count", rewrite(lambda t: t.set_column(2, "n_objects", pa.array([5, -1, 5], pa.int64())))
    yield "a table without its label image", rewrite(
        lambda t: t.set_column(1, "label_image", pa.array([None, "nuclei", "nuclei"], pa.string())))
    yield "column lists: not text", rewrite(lambda t: t.set_column(3, "columns_id", pa.array([1, 2, 3])))
    yield "entries: garbage", lambda p: log.entries_path(p.parent.parent, 3).write_bytes(b"garbage" * 9)
    yield "entries: missing", lambda p: log.entries_path(p.parent.parent, 3).unlink()
    yield "entries: not text", lambda p: pq.write_table(pa.table({"entry": pa.array(range(4))}),
                                                        log.entries_path(p.parent.parent, 3))
    yield "entries: a row short", lambda p: rewrite(lambda t: t.slice(1))(log.entries_path(p.parent.parent, 3))
    yield "entries: not JSON", lambda p: pq.write_table(pa.table({"entry": ["{"] * 3}),
                                                        log.entries_path(p.parent.parent, 3))


@pytest.mark.parametrize("name, damage", list(_damaged_checkpoints()), ids=[n for n, _ in _damaged_checkpoints()])
def test_a_damaged_checkpoint_is_one_line_naming_it_and_no_write_goes_on(image, tmp_path, monkeypatch, name, damage):
    monkeypatch.setattr(log, "CHECKPOINT_EVERY", 3)
    store = tmp_path / "c.cellar"
    for k in range(4):
        measure.measure(str(image), "nuclei", store, image_name=f"t{k}", workers=1, progress=False)
    path = log.checkpoint_path(store, 3)
    damage(path)
    if name.startswith("entries"):
        path = log.entries_path(store, 3)
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    # `cellar sql` reads the log with DuckDB (`query.store.DuckColumns`), the API with polars (`PolarsColumns`),
    # `cellar measure` (a writer) with pyarrow (the default, `schemas.log.ArrowColumns`)
    r = run_cli("sql", str(store), "SELECT count(*) FROM objects WHERE image = 't0' AND area > 0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(path) in r.stderr, r.stderr
    with pytest.raises(StoreError) as raised:
        query.open(store).where("image = 't0' AND area > 0").count()
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    r = run_cli("measure", str(image), "--labels", "nuclei", "--out", str(store), "--image-name", "t9", "--quiet")
    if name == "entries: not JSON":  # entries are parsed when used: a new table needs none of them
        assert r.returncode == 0 and path.read_bytes() == before[path], r.stderr
        assert log.snapshot(store).entry("t9", "nuclei")["n_objects"] == N_LABELS
        return
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(path) in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("engine", ["duckdb", "polars", "polars-sliced"])
def test_the_log_read_by_the_query_engines_is_the_log_read_by_pyarrow(image, tmp_path, monkeypatch, engine):
    """`cellar sql` reads the checkpoints with DuckDB (`query.store.DuckColumns`), the query API with polars
    (`PolarsColumns`), the writers with pyarrow (`schemas.log.ArrowColumns`): the same columns, kinds, counts,
    entries and the same state, annotations included."""
    from cellar.query.store import DuckColumns, PolarsColumns  # noqa: I001

    reader = {"duckdb": DuckColumns, "polars": PolarsColumns, "polars-sliced": PolarsColumns}[engine]
    if engine == "polars-sliced":  # as polars reads a large checkpoint: a column or a slice at a time
        monkeypatch.setattr(PolarsColumns, "WHOLE_BYTES", 0)
    monkeypatch.setattr(log, "CHECKPOINT_EVERY", 3)
    monkeypatch.setattr(log, "CHECKPOINT_ROW_GROUP", 2)  # the entries in several row groups
    store = tmp_path / "c.cellar"
    for k in range(4):
        measure.measure(str(image), "nuclei", store, image_name=f"t{k}", workers=1, progress=False)
    from cellar.cli import main

    notes = tmp_path / "notes.csv"
    notes.write_text("label_id,cls\n" + "".join(f"{i},c{i % 3}\n" for i in query.open(store).where("image = 't1'").label_ids()[:5]))
    assert main(["annotate", str(store), "--from", str(notes), "--image", "t1", "--labels", "nuclei"]) == 0
    for k in range(4, 6):  # a checkpoint at 6 that holds the annotation
        measure.measure(str(image), "nuclei", store, image_name=f"t{k}", workers=1, progress=False)
    version = max(int(p.name[:20]) for p in (store / "log").glob("*.checkpoint.parquet"))
    for path in (log.checkpoint_path(store, version), log.entries_path(store, version)):
        arrow, other = log.ArrowColumns(path), reader(path)
        assert (other.names, other.kinds, other.num_rows) == (arrow.names, arrow.kinds, arrow.num_rows)
        assert other.read(other.names) == arrow.read(arrow.names)
        assert all(other.null_count(n) in (None, arrow.null_count(n)) for n in arrow.names)  # None: not known
        assert sum(other.group_rows) == arrow.num_rows
        groups = [other.read_group(g, other.names[0]) for g in range(len(other.group_rows))]
        assert list(map(len, groups)) == other.group_rows and sum(groups, []) == arrow.read(arrow.names[:1])[0]
    assert log.snapshot(store, reader).keys == log.snapshot(store).keys
    assert list(log.snapshot(store, reader).entries()) == list(log.snapshot(store).entries())
    sql = "SELECT image, label_id, cls FROM objects ORDER BY ALL"
    assert query.open(store, engine="duckdb").sql(sql).fetchall() == query.open(store).sql(sql).fetchall()
    assert any(row[2] for row in query.open(store, engine="duckdb").sql(sql).fetchall())


_ENGINES = ("duckdb", "numpy", "polars", "pyarrow")
_EXPORT = ["export", "{store}", "--image", "t1", "--labels", "nuclei", "--where", "label_id = 3", "--to", "csv", "{out}"]


@pytest.mark.parametrize("command, loaded, share", [
    # DuckDB alone: its log read by DuckDB, the store's modules load numpy and pyarrow on first use
    (["sql", "{store}", "SELECT label_id FROM objects WHERE image = 't1' ORDER BY label_id", "--output", "{out}"],
     ["duckdb"], None),
    # polars alone: the log read by polars, the ids written from a polars Series (`Query.label_id_series`)
    (["filter", "{store}", "--where", "area > 0", "--image", "t1", "--labels", "nuclei", "--output", "{out}"],
     ["polars"], None),
    # polars alone: it streams the rows into its CSV writer (the row files are opened without numpy to find that
    # they do not answer: one of 12 objects is more than ROW_FILE_SHARE)
    (_EXPORT, ["polars"], None),
    # whole rows from the row files (numpy, pyarrow), written by polars' CSV writer, where the query covers more
    # rows than a process without numpy and pyarrow loads them for (ROW_FILES_UNLOADED, here 0)
    (_EXPORT, ["numpy", "polars", "pyarrow"], 1.0),
], ids=["sql", "filter", "export", "export-row-files"])
def test_commands_load_only_the_engines_they_use(image, tmp_path, command, loaded, share):
    """A command loads the engines its work needs and no other (each costs 80-150 ms of a fresh process; the
    CLI's whole-process time is the benchmark's), and answers as the API does."""
    store = tmp_path / "c.cellar"
    for k in range(2):
        measure.measure(str(image), "nuclei", store, image_name=f"t{k}", workers=1, progress=False)
    log.write_checkpoint(log.snapshot(store))
    out = tmp_path / "out.csv"
    code = ("import sys; from cellar.cli import main; "
            + (f"from cellar.query import api, export; api.ROW_FILE_SHARE = {share}; export.ROW_FILES_UNLOADED = 0; "
               if share else "")
            + "code = main(sys.argv[1:]); "
            f"print(sorted(m for m in {_ENGINES!r} if type(sys.modules.get(m)).__name__ == 'module'))")
    args = [a.format(store=store, out=out) for a in command]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(loaded), (r.stdout, r.stderr)
    t1 = query.open(store).where("image = 't1'")
    if command[0] == "export":
        got = pl.read_csv(out, comment_prefix="#")
        want = pl.from_arrow(t1.where("label_id = 3").to_arrow())
        assert got.columns == want.columns and got.height == 1
        assert got.cast(dict(want.schema)).equals(want)
    else:
        ids = out.read_text().split()
        assert ids[ids[0] == "label_id":] == [str(i) for i in t1.label_ids()]


def test_the_api_reads_the_log_with_pyarrow_where_it_is_loaded_else_with_polars(image, tmp_path):
    """The readers agree (above): the API takes pyarrow's where the process has it (1 ms a checkpoint), else
    polars' (`cellar filter` loads no pyarrow), and loads neither engine for it."""
    store = tmp_path / "c.cellar"
    measure.measure(str(image), "nuclei", store, image_name="t0", workers=1, progress=False)
    log.write_checkpoint(log.snapshot(store))
    code = ("import sys; {pre}from cellar import query; objs = query.open(sys.argv[1]); "
            "print(objs.snapshots[0].reader.__name__, 'pyarrow' in sys.modules, objs.count())")
    for pre, want in (("", f"PolarsColumns False {N_LABELS}"), ("import pyarrow; ", f"ArrowColumns True {N_LABELS}")):
        r = subprocess.run([sys.executable, "-c", code.format(pre=pre), str(store)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == want, (r.stdout, r.stderr)
