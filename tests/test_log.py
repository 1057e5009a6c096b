"""The commit log's snapshot against a model: any sequence of adds, replacements, annotations and removals,
with checkpoints anywhere, reads back as an ordered dict of tables would hold it, from the writer's snapshot
and from a reader's (which starts at the last checkpoint and keeps its tables in the checkpoint's columns)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellar.schemas import log

IMAGES = [f"i{k}" for k in range(6)]
LABELS = ["nuclei", "cells"]
COLUMN_LISTS = ["a" * 32, "b" * 32, "c" * 32]


def _store(path: Path) -> Path:
    log.place_store(log.new_store(path, "2026-01-01"), path)
    return path


def _entry(image: str, label_image: str, n: int, columns_id: str) -> dict:
    return {"image": image, "label_image": label_image, "dir": f"objects/image={image}/label_image={label_image}",
            "files": [f"part-{n}.parquet"], "n_objects": n, "columns_id": columns_id, "created": "2026-01-01"}


def _record(version: int) -> dict:
    return {"version": version, "dir": "annotations/x", "files": [f"v{version}.parquet"],
            "columns": [{"name": "cls", "dtype": "string"}], "source": "test", "created": "2026-01-01"}


KEYS = st.tuples(st.sampled_from(IMAGES), st.sampled_from(LABELS))
STEPS = st.lists(st.one_of(
    st.tuples(st.just("add"), KEYS, st.integers(0, 50), st.sampled_from(COLUMN_LISTS)),
    st.tuples(st.just("annotate"), KEYS),
    st.tuples(st.just("remove"), KEYS),
), min_size=1, max_size=40)


def _actions(step, model: dict) -> list[dict] | None:
    kind, key = step[0], step[1]
    if kind == "add":
        return [{"add": _entry(*key, step[2], step[3])}]
    if key not in model:
        return None
    if kind == "annotate":
        record = _record(len(model[key].get("annotations", [])) + 1)
        return [{"annotate": {"image": key[0], "label_image": key[1], "record": record}}]
    return [{"remove": {"image": key[0], "label_image": key[1]}}]


def _apply_to_model(model: dict, actions: list[dict]) -> None:
    for action in actions:
        (kind, value), = action.items()
        key = (value["image"], value["label_image"])
        if kind == "add":
            model.pop(key, None)
            model[key] = json.loads(json.dumps(value))
        elif kind == "annotate":
            model[key].setdefault("annotations", []).append(value["record"])
        else:
            del model[key]


def _agrees(snap: log.Snapshot, model: dict) -> None:
    keys = list(model)
    assert snap.keys == keys and len(snap) == len(keys)
    assert [(e["image"], e["label_image"]) for e in snap.entries()] == keys
    assert snap.columns_id_list() == [model[k]["columns_id"] for k in keys]
    assert snap.distinct_columns_ids() == list(dict.fromkeys(model[k]["columns_id"] for k in keys))
    assert snap.total_objects == sum(model[k]["n_objects"] for k in keys)
    assert snap.annotated == [k for k in keys if model[k].get("annotations")]
    for images in ({"i0"}, {"i1", "i3"}, set(IMAGES), set()):
        assert snap.keys_of(images) == [k for k in keys if k[0] in images]
    for key in [(i, lab) for i in IMAGES for lab in LABELS]:
        assert (key in snap) == (key in model)
        if key in model:
            assert snap.n_objects(*key) == model[key]["n_objects"]
            assert snap.columns_id(*key) == model[key]["columns_id"]
            assert snap.annotations(*key) == model[key].get("annotations", [])
            assert snap.entry(*key) == model[key]
        else:
            assert snap.entry(*key) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS, every=st.integers(1, 4))
def test_any_history_reads_back_as_the_model_holds_it(tmp_path_factory, steps, every):
    store = _store(tmp_path_factory.mktemp("log") / "s.cellar")
    model: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(log, "CHECKPOINT_EVERY", every)
        patch.setattr(log, "_SEARCHES", 2)  # both ways of finding a table: searching and the index
        for step in steps:
            actions = _actions(step, model)
            if actions is None:
                continue
            writer = log.commit(store, "test", lambda snap, a=actions: a)
            _apply_to_model(model, actions)
            _agrees(writer, model)
        _agrees(log.snapshot(store), model)


def test_a_checkpoint_without_its_metadata_still_lists_the_column_lists(tmp_path, monkeypatch):
    """The column-list ids come from the checkpoint's metadata; a checkpoint without it (or with it damaged)
    gives them from the column."""
    monkeypatch.setattr(log, "CHECKPOINT_EVERY", 3)
    store = _store(tmp_path / "s.cellar")
    for k, columns_id in enumerate(["b" * 32, "a" * 32, "b" * 32]):
        log.commit(store, "test", lambda snap, e=_entry(f"i{k}", "nuclei", k, columns_id): [{"add": e}])
    assert log.snapshot(store).distinct_columns_ids() == ["b" * 32, "a" * 32]
    path = log.checkpoint_path(store, 3)
    for metadata in ({}, {log.DISTINCT_KEY: b"not json"}, {log.DISTINCT_KEY: b"[1, 2]"}):
        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata(metadata), path)
        assert log.snapshot(store).distinct_columns_ids() == ["b" * 32, "a" * 32]


def test_opening_a_large_store_reads_no_entry(tmp_path, monkeypatch):
    """Opening a store and finding one image's tables reads the checkpoint's table list, not its entries."""
    monkeypatch.setattr(log, "CHECKPOINT_EVERY", 1000)
    store = _store(tmp_path / "s.cellar")
    actions = [{"add": _entry(f"i{k:04d}", "nuclei", k, "a" * 32)} for k in range(1000)]
    log.commit(store, "test", lambda snap: actions)
    assert log.checkpoint_path(store, 1).exists() is False  # one commit: no checkpoint yet
    log.write_checkpoint(log.snapshot(store))
    snap = log.snapshot(store)
    assert snap._base is not None and not snap._parsed
    assert snap.keys_of({"i0500"}) == [("i0500", "nuclei")] and snap.total_objects == sum(range(1000))
    assert not snap._parsed and snap._base.texts.groups == {}
    assert snap.entry("i0500", "nuclei")["n_objects"] == 500
    assert list(snap._base.texts.groups) == [500 // log.CHECKPOINT_ROW_GROUP]
