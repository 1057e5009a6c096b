"""Damaged files on disk: every file of a small image and of a small store, damaged in each way that applies to
its kind, under every command that reads or writes it.

The files are found on disk and classified by what they hold (Zarr metadata or a chunk; JSON, Parquet, Arrow
or .npy in a store), not listed by name, so that a change of the store's layout stays covered. A run must end
with exit status 2 and one line `cellar: error: ...` naming the damaged file (its path inside the image or the
store), or with exit status 0 and the output the undamaged files give (a command that does not read the file).
A write into a damaged store either refuses, every file left byte-identical, or succeeds, the damaged file left
as it was (unless it is a derived copy a write replaces: the session cache, schema.json) and the store's tables
readable as before. The Python API and the viewer's session raise CellarErrors naming the file. Most runs call
`cellar.cli.main` in this process; `test_the_installed_command_*` run the command as a user does.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import shutil
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellar import query
from cellar.cli import main
from cellar.ngff.integrity import METADATA_FILES
from cellar.ngff.write import write_image
from cellar.schemas import log
from cellar.schemas import store as layout
from cellar.schemas.errors import CellarError, StoreError
from helpers import intensities, nuclei_like, run_cli
from cellar.viewer.session import Session

GARBAGE = b"\x00not what this file should hold\xff" * 3
PREFIX = "cellar: error: "


# -- the data: one image (NGFF 0.4 and 0.5) and one store, built once ---------------------------------------
@dataclass
class Data:
    images: dict[str, Path]  # NGFF version -> image
    store: Path  # two tables, an annotation version, a session cache with its row-major copy
    plain: Path  # the same two tables without annotations or cache (queries run on polars)
    classes: Path  # the annotation source
    image: str  # the image's name in the store


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    root = tmp_path_factory.mktemp("damaged")
    labels = {"nuclei": nuclei_like((48, 48), 8, seed=1), "cells": nuclei_like((48, 48), 6, seed=3)}
    images = {v: write_image(root / f"img{v}.ome.zarr", intensities((48, 48), 2, seed=2), "cyx", chunks=(1, 24, 24),
                             labels=labels, channel_names=["DAPI", "CD8"], version=v) for v in ("0.4", "0.5")}
    store, plain = root / "s.cellar", root / "plain.cellar"
    for labels in ("nuclei", "cells"):
        assert main(["measure", str(images["0.5"]), "--labels", labels, "--out", str(store), "--workers", "1",
                     "--quiet"]) == 0
    shutil.copytree(store, plain)
    ids = query.open(store).where("label_image = 'nuclei'").label_ids()
    classes = root / "classes.csv"
    classes.write_text("label_id,kind\n" + "".join(f"{i},{'round' if i % 2 else 'long'}\n" for i in ids))
    assert main(["annotate", str(store), "--from", str(classes), "--labels", "nuclei"]) == 0
    assert main(["cache", str(store), "--rows"]) == 0
    return Data(images, store, plain, classes, query.open(store).tables[0][1]["image"])


# -- running commands ------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_parser(monkeypatch):
    """`main` builds its argument parser once here, not per call: building it costs 30 ms, most of these runs
    less (parsing does not change the parser)."""
    import cellar.cli

    monkeypatch.setattr(cellar.cli, "build_parser", functools.cache(cellar.cli.build_parser))


@dataclass
class Run:
    code: int | str  # the exit status, or the exception that escaped
    out: str = ""
    err: str = ""
    result: object = None  # what an API call returned, or an output file's content


def _cli(capsys, argv: list[str], output: Path | None = None) -> Run:
    """`cellar ARGV` in this process: an exception escaping `main` (a CellarError too) is a failure."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except Exception as exc:  # noqa: BLE001 - any exception is the failure this test reports
        code = f"{type(exc).__name__}: {exc}"
    out, err = capsys.readouterr()
    return Run(code, out, err, _content(output) if output is not None and code == 0 else None)


def _content(path: Path) -> object:
    """An output file's content, comparable between runs (rows in order, without the export's time stamp)."""
    if path.suffix == ".csv":
        return sorted(line for line in path.read_text().splitlines() if not line.startswith("#"))
    if path.suffix == ".h5":
        import tables

        with tables.open_file(path) as h5:
            return sorted(h5.root.OME.Measurements.read().tolist())
    return path.stat().st_size > 0


def _api(call: Callable[[], object]) -> Run:
    """A Python API call: a CellarError is the clean failure (its message the line), anything else a bug."""
    try:
        return Run(0, result=call())
    except CellarError as exc:
        return Run(2, err=f"{PREFIX}{exc}\n")
    except Exception as exc:  # noqa: BLE001
        return Run(f"{type(exc).__name__}: {exc}")


def _rows(table: pa.Table) -> list:
    keys = [k for k in ("image", "label_image", "label_id") if k in table.column_names]
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


def _session(store: Path) -> object:
    session = Session(None, store, labels="nuclei")
    info = session.info()
    info["table"].pop("store")
    return _rows(session.table), json.dumps(info, sort_keys=True, default=str)


def reads(store: Path, out: Path) -> dict[str, tuple[list[str], Path | None] | Callable[[], object]]:
    """Every command that reads a store (argv and output file), the viewer's session and the Python API."""
    s = str(store)
    return {
        "sql": (["sql", s, "SELECT * FROM objects ORDER BY label_image, label_id", "--format", "csv"], None),
        "info": (["info", s], None),
        "info --columns": (["info", s, "--columns"], None),
        "filter": (["filter", s, "--where", "area > 20", "--labels", "nuclei"], None),
        "export csv": (["export", s, "--to", "csv", out / "out.csv", "--overwrite"], out / "out.csv"),
        "export omero-h5": (["export", s, "--to", "omero-h5", out / "out.h5", "--overwrite"], out / "out.h5"),
        "hist": (["hist", s, "area", "--where", "area > 20", "--out", out / "hist.png", "--overwrite"],
                 out / "hist.png"),
        "cache --status": (["cache", s, "--status"], None),
        "viewer session": lambda: _session(store),
        "query.open": lambda: _rows(query.open(store).to_arrow()),
    }


def writes(data: Data, store: Path) -> dict[str, list[str]]:
    """Every command that writes into a store."""
    return {
        "measure": ["measure", data.images["0.4"], "--labels", "nuclei", "--out", store, "--image-name", "added",
                    "--workers", "1", "--quiet"],
        "annotate": ["annotate", store, "--from", data.classes, "--image", data.image, "--labels", "nuclei"],
        "cache": ["cache", store, "--rows"],
    }


def _run_read(capsys, spec) -> Run:
    if callable(spec):
        return _api(spec)
    argv, output = spec
    return _cli(capsys, argv, output)


def _normal(run: Run, case: Path) -> tuple:
    """What a successful run printed and made, with the case's directory written as <case> (and NaN equal to
    NaN)."""
    made = json.dumps(run.result, sort_keys=True, default=repr)
    return run.code, run.out.replace(str(case), "<case>"), run.err.replace(str(case), "<case>"), made


def _clean_error(run: Run, names: str) -> str | None:
    """None if `run` failed with one line `cellar: error: ...` that contains `names`, else what is wrong."""
    lines = run.err.strip().splitlines()
    if run.code != 2 or "Traceback" in run.err or len(lines) != 1 or not lines[0].startswith(PREFIX):
        return f"exit {run.code!r}, stderr {run.err.strip()[-400:]!r}"
    if names not in lines[0]:
        return f"the line does not name {names}: {lines[0]}"
    return None


def _verdict(run: Run, names: str, reference: Run, case: Path, ref_case: Path) -> str | None:
    """None if `run` is a clean error naming the file, or a success equal to the undamaged data's `reference`."""
    if run.code == 0:
        same = _normal(run, case) == _normal(reference, ref_case)
        return None if same else "exit 0, but not what the undamaged data give"
    return _clean_error(run, names)


# -- files and damages -------------------------------------------------------------------------------------------
def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _store_kind(rel: str) -> str:
    """What a store file holds, from its name: json, parquet, arrow, npy."""
    return Path(rel).suffix.lstrip(".")


def _derived(rel: str) -> bool:
    """A file a write may replace or remove: the session cache and the column templates (copies), the log's
    pointers (hints a writer rewrites) and its column lists (named by the hash of their content, so a writer
    that needs one writes it whole again)."""
    top = rel.split("/")[0]
    return (rel == layout.SCHEMA or top == layout.CACHE_DIR or rel.startswith(f"{log.LOG_DIR}/{log.COLUMNS_DIR}/")
            or rel in (f"{log.LOG_DIR}/{log.LATEST}", f"{log.LOG_DIR}/{log.LAST_CHECKPOINT}"))


Damage = Callable[[Path], None]
WHOLE_FILE = ("garbage", "truncated", "empty", "missing")


def _whole_file(path: Path) -> Iterator[tuple[str, Damage]]:
    data = path.read_bytes()
    yield "garbage", lambda p: p.write_bytes(GARBAGE)
    yield "truncated", lambda p: p.write_bytes(data[: len(data) // 2])
    yield "empty", lambda p: p.write_bytes(b"")
    yield "missing", lambda p: p.unlink()


def _retyped(value: object) -> object:
    return 7 if isinstance(value, (str, list, dict)) else "x"


def _json_docs(doc: object, deep: bool) -> Iterator[tuple[str, str | None, object]]:
    """(name, key, document) of a JSON document with wrong types: not an object, and each key of each object
    (`deep`: also inside objects and lists, once per key path) with a value of another type, then missing."""
    yield "a list, not an object", None, [doc]
    seen = set()

    def keys(node: object, path: tuple) -> Iterator[tuple]:
        if isinstance(node, dict):
            for key, value in node.items():
                pattern = tuple(p for p in (*path, key) if not isinstance(p, int))
                if pattern not in seen:
                    seen.add(pattern)
                    yield (*path, key)
                if deep:
                    yield from keys(value, (*path, key))
        elif isinstance(node, list) and deep:
            for i, item in enumerate(node):
                yield from keys(item, (*path, i))

    for path in list(keys(doc, ())):
        name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        for how, change in (("of another type", lambda n, k: n.__setitem__(k, _retyped(n[k]))),
                            ("missing", lambda n, k: n.__delitem__(k))):
            mutated = copy.deepcopy(doc)
            node = mutated
            for p in path[:-1]:
                node = node[p]
            change(node, path[-1])
            yield f"{name} {how}", path[-1], mutated


def _write_json(doc: object) -> Damage:
    return lambda p: p.write_text(json.dumps(doc))


def _parquet_damages(path: Path) -> Iterator[tuple[str, Damage]]:
    yield from _whole_file(path)
    tail = path.read_bytes()[-8:]
    footer = int.from_bytes(tail[:4], "little")

    def garble_footer(p: Path) -> None:  # Parquet's magic bytes stay; the footer's first half is noise
        data = bytearray(p.read_bytes())
        start = len(data) - 8 - footer
        data[start:start + footer // 2] = b"\xff" * (footer // 2)
        p.write_bytes(bytes(data))

    def garble_pages(p: Path) -> None:  # the footer stays whole; the middle half of the data is noise
        data = bytearray(p.read_bytes())
        end = len(data) - 8 - footer
        data[4 + (end - 4) // 4:4 + 3 * (end - 4) // 4] = b"\xa5" * ((end - 4) // 2)
        p.write_bytes(bytes(data))

    yield "footer damaged", garble_footer
    yield "pages damaged", garble_pages
    yield "a Parquet file of another table", lambda p: pq.write_table(
        pa.table({"label_id": pa.array([1, 2], pa.uint64()), "x": [0.5, 1.5]}), p)


def _is_commit(rel: str) -> bool:
    return rel.startswith(f"{log.LOG_DIR}/") and Path(rel).name[0].isdigit() and rel.endswith(".json")


def store_damages(store: Path, rel: str, structure: bool) -> Iterator[tuple[str, Damage]]:
    """The damages that apply to a store file; `structure`: also JSON of the wrong types (the commits' are
    in `test_a_damaged_commit_is_one_line_naming_it_and_the_key`)."""
    path = store / rel
    kind = _store_kind(rel)
    if kind == "parquet":
        yield from _parquet_damages(path)
        return
    yield from _whole_file(path)
    if kind == "json" and structure:
        for name, _, doc in _json_docs(json.loads(path.read_text()), deep=False):
            yield name, _write_json(doc)


def _hashes(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in _files(root)}


def _copy(source: Path, case: Path) -> Path:
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    return Path(shutil.copytree(source, case / source.name))


def _tables(store: Path) -> dict[tuple[str, str], Run]:
    """Each table the store lists, as its Parquet files give it (the session cache is a copy): its rows, or
    the clean error reading it gives."""
    opened = _api(lambda: query.open(store, cache=False))
    if opened.code != 0:
        return {}
    objs = opened.result

    def rows(image: str, label_image: str) -> list:
        return objs.fetch(f"SELECT label_id, area FROM objects WHERE image = '{image}' AND label_image = "
                          f"'{label_image}' ORDER BY label_id")

    names = objs.snapshots[0].keys
    return {name: _api(functools.partial(rows, *name)) for name in names}


def _write_problem(capsys, argv: list, store: Path, rel: str, twin: Callable[[], Path]) -> str | None:
    """None if a write into the damaged store refused (one line naming `rel`, every file byte-identical), or
    succeeded leaving the damaged file as it was (unless derived) and every table that read before it reading
    the same rows (a write checks the files' footers, not every page). `twin()` makes another copy of the
    damaged store, to read the tables as they were."""
    before = _hashes(store)
    run = _cli(capsys, argv)
    after = _hashes(store)
    if run.code != 0:
        problem = _clean_error(run, rel)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        return problem or (f"refused, but changed {changed}" if changed else None)
    if not _derived(rel) and after.get(rel) != before.get(rel):
        return "succeeded, and changed the damaged file"
    now = _tables(store)
    for name, was in _tables(twin()).items():
        if name not in now or isinstance(now[name].code, str) or (was.code == 0 and now[name].result != was.result):
            return f"succeeded, but table {name} does not read as before: {now.get(name)}, before {was}"
    return None


def _references(capsys, data: Data, case: Path) -> dict[str, Run]:
    """The runs of every read on the undamaged store, in `case`."""
    store = _copy(data.store, case)
    return {name: _run_read(capsys, spec) for name, spec in reads(store, case).items()}


def _check_store_file(capsys, data: Data, tmp_path: Path, rel: str, refs: dict[str, Run]) -> list[str]:
    """Every damage of the store file `rel` under every read and write; the problems found."""
    problems = []
    ref_case, case = tmp_path / "ref", tmp_path / "case"
    read_inside = True
    for name, damage in store_damages(data.store, rel, structure=not _is_commit(rel)):
        if not read_inside and name not in WHOLE_FILE:
            continue  # no read looks inside this file (garbage did not matter): wrong JSON types cannot either
        store = _copy(data.store, case)
        damage(store / rel)
        before = _hashes(store)

        def twin(damage=damage) -> Path:
            copy = _copy(data.store, tmp_path / "twin")
            damage(copy / rel)
            return copy

        runs = {}
        for command, spec in reads(store, case).items():
            if command == "hist" and name not in WHOLE_FILE:
                continue  # it reads the store as `filter` does; drawing costs 0.3 s a run
            if not read_inside and name in ("truncated", "empty"):
                break  # no read looks inside this file (garbage did not matter): other content cannot either
            runs[command] = run = _run_read(capsys, spec)
            problem = _verdict(run, rel, refs[command], case, ref_case)
            if problem:
                problems.append(f"{rel}, {name}: {command}: {problem}")
        if runs and runs["sql"].code == runs["query.open"].code == 2 and runs["sql"].err != runs["query.open"].err:
            problems.append(f"{rel}, {name}: the Python API's message is not the command's: "
                            f"{runs['query.open'].err!r}, {runs['sql'].err!r}")
        if _hashes(store) != before:
            problems.append(f"{rel}, {name}: the reads changed the store")
        read_inside = read_inside and not (name == "garbage" and all(run.code == 0 for run in runs.values()))
        for command, argv in writes(data, store).items():
            if _hashes(store) != before:  # the previous write succeeded: a fresh damaged copy
                store = _copy(data.store, case)
                damage(store / rel)
            problem = _write_problem(capsys, argv, store, rel, twin)
            if problem:
                problems.append(f"{rel}, {name}: {command}: {problem}")
    return problems


@pytest.mark.parametrize("kind", ["json", "parquet", "arrow", "npy"])
def test_a_damaged_store_file_is_one_line_naming_it_for_every_command(data, tmp_path, capsys, kind):
    """Each file of the store of this kind (found on disk), each damage, every read and write."""
    refs = _references(capsys, data, tmp_path / "ref")
    assert all(run.code == 0 for run in refs.values()), {k: r for k, r in refs.items() if r.code != 0}
    files = [rel for rel in _files(data.store) if _store_kind(rel) == kind]
    assert files
    problems = [p for rel in files for p in _check_store_file(capsys, data, tmp_path, rel, refs)]
    assert not problems, "\n".join(problems)


def _commit_problem(doc: object, version: int, store: Path) -> str | None:
    """What reading this commit as commit `version` of the store says is wrong with it, or None."""
    snap = log.Snapshot(store, version - 1, {})
    for k in range(1, version):  # the commits before it: the tables it may annotate
        snap.apply(json.loads(log.commit_path(store, k).read_text())["actions"], Path("-"))
    try:
        commit = log._parse_commit(json.dumps(doc).encode(), Path("commit"), version)
        snap.apply(commit["actions"], Path("commit"))
    except StoreError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("version", [1, 3], ids=["a table added", "an annotation version"])
def test_a_damaged_commit_is_one_line_naming_it_and_the_key(data, tmp_path, capsys, version):
    """A commit with each key of each object in it (the table entry, its source, settings, channels, the
    annotation record) of another type, or missing where the format needs it: every command refuses with one
    line naming the commit file and the key, and changes nothing. The keys the format lets a table go without
    (the provenance `measure` adds; `store_write.write_table` alone does not) are all removed at once: every
    command then still works (the viewer asks for the image, whose URL was in the provenance)."""
    store = _copy(data.store, tmp_path / "case")
    rel = log.commit_path(Path(""), version).as_posix()
    commit = store / rel
    good = commit.read_bytes()
    doc = json.loads(good)
    refs = reads(store, tmp_path / "case")
    light = {k: refs[k] for k in ("sql", "info --columns", "viewer session", "query.open")}
    problems, optional = [], []
    for name, key, mutated in _json_docs(doc, deep=True):
        if _commit_problem(mutated, version, data.store) is None:
            if not name.endswith(" missing"):
                problems.append(f"{name}: accepted")
            optional.append(name.removesuffix(" missing"))
            continue
        commit.write_text(json.dumps(mutated))
        before = _hashes(store)
        for command, spec in light.items():
            run = _run_read(capsys, spec)
            problem = _clean_error(run, rel)
            if problem is None and key is not None and key not in run.err and key.replace("_", " ") not in run.err:
                problem = f"the line does not name the key {key}: {run.err.strip()}"
            if problem:
                problems.append(f"{name}: {command}: {problem}")
        def twin(mutated=mutated) -> Path:
            copy = _copy(data.store, tmp_path / "twin")
            (copy / rel).write_text(json.dumps(mutated))
            return copy

        for command, argv in writes(data, store).items():
            problem = _write_problem(capsys, argv, store, rel, twin)
            if problem:
                problems.append(f"{name}: {command}: {problem}")
        if _hashes(store) != before:
            store = _copy(data.store, tmp_path / "case")
        commit.write_bytes(good)
    assert not problems, "\n".join(problems)
    if version > 1:
        return
    assert optional, "the format has keys a table may go without"
    lean = copy.deepcopy(doc)
    for path in sorted(optional, key=len, reverse=True):
        node, *parts = lean, *path.replace("[", ".[").split(".")
        for part in parts[:-1]:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        node.pop(parts[-1], None)
    assert _commit_problem(lean, version, data.store) is None
    commit.write_text(json.dumps(lean))
    for command, spec in refs.items():
        run = _run_read(capsys, spec)
        if command == "viewer session":  # without the source's URL it needs the image's path
            assert run.code == 0 or _clean_error(run, "give the image's path") is None, run
        else:
            assert run.code == 0, (command, run)
    for command, argv in writes(data, store).items():
        run = _cli(capsys, argv)
        assert run.code == 0, (command, run)


# -- images ---------------------------------------------------------------------------------------------------
def _array_dirs(image: Path) -> list[Path]:
    """The image's arrays: folders whose metadata says they are one."""
    arrays = [p.parent for p in image.rglob(".zarray")]
    arrays += [p.parent for p in image.rglob("zarr.json") if json.loads(p.read_text()).get("node_type") == "array"]
    return sorted(arrays)


def _nonsense(name: str) -> Iterator[tuple[str, Callable[[dict], None]]]:
    """Array metadata that parses but makes no sense: a data type and a codec that do not exist, a negative
    shape (Zarr v2's .zarray or v3's zarr.json)."""
    v2 = name == ".zarray"
    yield "a data type that does not exist", lambda d: d.update({"dtype" if v2 else "data_type": "<x9"})
    yield "a negative shape", lambda d: d["shape"].__setitem__(0, -d["shape"][0])
    yield "a codec that does not exist", (lambda d: d.update(compressor={"id": "no-such-codec"})) if v2 else (
        lambda d: d["codecs"].append({"name": "no-such-codec"}))


def image_damages(image: Path) -> Iterator[tuple[str, str, Damage]]:
    """(file, damage, apply) for the image's metadata files (each) and one chunk of each array."""
    arrays = _array_dirs(image)
    chunks = {max(p for p in a.rglob("*") if p.is_file() and p.name not in METADATA_FILES) for a in arrays}
    for path in sorted(p for p in image.rglob("*") if p.is_file()):
        rel = path.relative_to(image).as_posix()
        if path in chunks:
            for name, damage in _whole_file(path):
                if name != "missing":  # a missing chunk is the fill value (test_hostile)
                    yield rel, name, damage
        if path.name not in METADATA_FILES:
            continue
        for name, damage in _whole_file(path):
            yield rel, name, damage
        doc = json.loads(path.read_text())
        for name, _, mutated in _json_docs(doc, deep=False):
            if not name.endswith(" missing"):  # a missing key is often legitimate (attributes, separators)
                yield rel, name, _write_json(mutated)
        if path.parent in arrays and path.name in (".zarray", "zarr.json"):
            for name, change in _nonsense(path.name):
                mutated = copy.deepcopy(doc)
                change(mutated)
                yield rel, name, _write_json(mutated)


def _measured(capsys, image: Path, out: Path) -> Run:
    run = _cli(capsys, ["measure", image, "--labels", "nuclei", "--out", out, "--workers", "1", "--quiet"])
    if run.code == 0:
        (part,) = out.rglob("*.parquet")
        run.result = _rows(pq.read_table(part).replace_schema_metadata(None))
    return run


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_damaged_image_file_is_one_line_naming_it(data, tmp_path, capsys, version):
    """Each metadata file of the image (the image group, the labels group, the label images, the arrays) and
    a chunk of each array, damaged: `cellar measure` fails with one line naming the file, or (a file of
    the other label image, say) measures what the undamaged image gives."""
    source = data.images[version]
    reference = _measured(capsys, source, tmp_path / "ref.cellar")
    assert reference.code == 0, reference
    problems, count = [], 0
    for rel, name, damage in image_damages(source):
        image = _copy(source, tmp_path / "case")
        damage(image / rel)
        run = _measured(capsys, image, tmp_path / "case" / "out.cellar")
        problem = _verdict(run, rel, reference, tmp_path / "case", tmp_path)
        if problem:
            problems.append(f"{rel}, {name}: {problem}")
        count += 1
    assert count > 60 and not problems, "\n".join(problems)


# -- the polars path, repairs -------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["footer damaged", "pages damaged", "a Parquet file of another table"])
def test_queries_on_polars_name_a_damaged_parquet_file(data, tmp_path, capsys, damage):
    """Plain queries on a store without annotations or cache run on polars' Parquet scan: a file whose footer
    or pages do not parse, or that holds another table's columns, is named there too (in DuckDB's SQL as
    well); a query that reads none of the damaged pages answers as the undamaged file does."""
    rel = next(r for r in _files(data.plain) if r.endswith(".parquet"))
    labels = "cells" if "label_image=cells" in rel else "nuclei"

    def runs(store: Path) -> list[Run]:
        return [_api(lambda: query.open(store).where(f"label_image = '{labels}' AND area > 20").label_ids().tolist()),
                _api(lambda: _rows(query.open(store).to_arrow())),
                _cli(capsys, ["filter", store, "--where", "area > 20", "--labels", labels]),
                _cli(capsys, ["sql", store, "SELECT * FROM objects ORDER BY label_image, label_id", "--format", "csv"])]

    references = runs(_copy(data.plain, tmp_path / "ref"))
    store = _copy(data.plain, tmp_path / "case")
    dict(_parquet_damages(store / rel))[damage](store / rel)
    assert query.open(store).polars_frame is not None
    for run, reference in zip(runs(store), references):
        assert _verdict(run, rel, reference, tmp_path / "case", tmp_path / "ref") is None, run
    assert any(run.code == 2 for run in runs(store))


def test_the_damaged_cache_is_rebuilt_or_dropped_and_a_damaged_table_measured_again(data, tmp_path, capsys):
    """What the errors say to do works: `cellar cache --rebuild` replaces a damaged cache file and `--drop`
    removes the cache; `cellar measure --overwrite` replaces the damaged table's file."""
    def answers(store: Path) -> list:
        return query.open(store).sql("SELECT label_image, label_id, area, kind FROM objects ORDER BY ALL").fetchall()

    expected = answers(data.store)
    for flags in (["--rebuild", "--rows"], ["--drop"]):
        store = _copy(data.store, tmp_path / "case")
        (stats,) = (store / layout.CACHE_DIR).glob("stats-*")
        stats.write_bytes(GARBAGE)
        assert _clean_error(_cli(capsys, ["sql", store, "SELECT 1"]), stats.name) is None
        assert _cli(capsys, ["cache", store, *flags]).code == 0
        assert answers(store) == expected
        assert bool(query.open(store).mapped) == ("--rebuild" in flags)
    store = _copy(data.store, tmp_path / "case")
    part = next(p for p in store.rglob("*.parquet") if "label_image=cells" in str(p))
    part.write_bytes(part.read_bytes()[:1000])
    # the fresh session cache (a faithful copy) still answers; what reads the Parquet files names the damage
    assert _cli(capsys, ["sql", store, "SELECT count(*) FROM objects"]).code == 0
    assert _clean_error(_cli(capsys, ["cache", store, "--status"]), part.name) is None
    assert _clean_error(_api(lambda: query.open(store, cache=False).to_arrow()), part.name) is None
    measure = ["measure", data.images["0.5"], "--labels", "cells", "--out", store, "--workers", "1", "--quiet"]
    assert _clean_error(_cli(capsys, measure), part.name) is None  # the damaged table is not "kept" as it is
    run = _cli(capsys, [*measure, "--image-name", "other"])
    assert run.code == 0, run  # a new table goes in beside it: nothing of the damaged one is touched
    run = _cli(capsys, [*measure, "--overwrite"])
    assert run.code == 0, run  # and the damaged one may be measured again
    os.utime(part, (time.time() - 2 * 3600,) * 2)
    assert _cli(capsys, ["vacuum", store]).code == 0
    assert not part.exists()
    got = query.open(store, cache=False).sql("SELECT label_image, label_id, area, kind FROM objects WHERE image = "
                                             f"'{data.image}' ORDER BY ALL").fetchall()
    assert got == expected


# -- as a user runs it ----------------------------------------------------------------------------------------
def _one_line(proc: subprocess.CompletedProcess, names: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith(PREFIX) and names in lines[0], lines[0]


def test_the_installed_command_names_damaged_image_metadata(data, tmp_path):
    """Issue 14's first case: an OME-Zarr whose .zattrs (0.4) or zarr.json (0.5) is not valid JSON."""
    for version, meta in (("0.4", ".zattrs"), ("0.5", "zarr.json")):
        image = _copy(data.images[version], tmp_path / version)
        (image / meta).write_bytes((image / meta).read_bytes()[:40])
        _one_line(run_cli("measure", str(image), "--labels", "nuclei", "--out", str(tmp_path / "s.cellar")),
                  f"{image}/{meta}: not valid JSON")
        assert not (tmp_path / "s.cellar").exists()


def test_the_installed_command_names_a_truncated_parquet_file_and_writes_nothing(data, tmp_path):
    """Issue 14's second case (`cellar sql STORE "SELECT * FROM objects"` with a truncated part file), an
    annotation refused without a change, and `cellar view` refusing to serve the store."""
    store = _copy(data.plain, tmp_path / "case")  # no session cache: the queries read the Parquet files
    part = next(p for p in store.rglob("*.parquet") if p.parent.parent.parent.name == layout.OBJECTS_DIR
                and p.parent.name == "label_image=nuclei")  # the table annotated below
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 3])
    rel = part.relative_to(store).as_posix()
    _one_line(run_cli("sql", str(store), "SELECT * FROM objects"), f"{rel}: truncated or not a Parquet file")
    before = _hashes(store)
    _one_line(run_cli("annotate", str(store), "--from", str(data.classes), "--image", data.image, "--labels",
                      "nuclei"), rel)
    assert _hashes(store) == before
    exe = Path(sys.executable).with_name("cellar")
    view = subprocess.run([str(exe), "view", str(data.images["0.5"]), "--store", str(store), "--labels", "nuclei",
                           "--no-browser"], capture_output=True, text=True, timeout=120)
    _one_line(view, rel)
