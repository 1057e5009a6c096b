"""`cellar view` under concurrent use: many clients change the filter and colouring at once, each then asking
for what a page asks for (histogram, a sorted table page, an overlay tile, the object at a pixel), as a page
does with its requests in flight together and a second tab or person does the same."""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cellar import measure
from cellar import query
from cellar.ngff.write import write_image
from helpers import intensities, nuclei_like
from cellar.viewer import session as session_mod
from cellar.viewer.server import running
from cellar.viewer.session import Session

CLIENTS = 16
CHANGES = 7  # per client: 112 filter changes in all, each followed by four requests


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("concurrent")
    image = write_image(tmp / "img.ome.zarr", intensities((300, 400), 2, seed=81), "cyx", chunks=(1, 64, 64),
                        labels={"nuclei": nuclei_like((300, 400), 120, seed=82)}, channel_names=["DAPI", "CD8"],
                        scale={"y": 0.5, "x": 0.5}, n_levels=3)
    measure.measure(str(image), "nuclei", tmp / "s.cellar", workers=1)
    return tmp / "s.cellar"


def _get(url: str, path: str, body: dict | None = None) -> tuple[int, bytes, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def _changes(seed: int, numeric: list[str]) -> list[dict]:
    """A client's filter changes: mixed conditions (plain, a function, NULL tests with BETWEEN), a random
    colouring column, then a random histogram column, sort column and pixel."""
    rng = random.Random(seed)
    out = []
    for _ in range(CHANGES):
        n = rng.randint(10, 80)
        where = rng.choice([f"area > {n}", f"sqrt(area) > {n / 10:g}",
                            f"{rng.choice(numeric)} IS NOT NULL AND area BETWEEN {n} AND {n + 40}"])
        out.append({"where": where, "by": rng.choice([*numeric, None]), "hist": rng.choice(numeric),
                    "sort": rng.choice(numeric), "x": rng.uniform(0, 400), "y": rng.uniform(0, 300)})
    return out


def test_concurrent_clients_get_every_answer_and_states_stay_valid(store, monkeypatch):
    # Room for a handful of states' arrays only, so that states are let go and made again while in use.
    monkeypatch.setattr(session_mod, "STATE_BYTES", 4_000)
    session = Session(None, store)
    numeric = [c["name"] for c in session.columns if c["numeric"]]
    plans = [_changes(k, numeric) for k in range(CLIENTS)]
    answers: list[tuple[str, int, str]] = []  # (request, status, content type) of every request
    tokens: dict[str, str] = {}  # token -> its filter
    tiles: dict[str, bytes] = {}  # token -> the overlay tile first served for it
    lock = threading.Lock()

    def client(url: str, plan: list[dict]) -> None:
        for change in plan:
            status, body, kind = _get(url, "/api/state", {"where": change["where"], "by": change["by"]})
            with lock:
                answers.append(("state", status, kind))
            if status != 200:
                continue
            token = json.loads(body)["token"]
            with lock:
                tokens[token] = change["where"]
                earlier = random.Random(token).choice(sorted(tokens))  # a state another client may have made
            for name, path in (("histogram", f"/api/histogram?token={token}&column={change['hist']}"),
                               ("rows", f"/api/rows?token={token}&sort={change['sort']}&desc=1"),
                               ("overlay", f"/tiles/overlay/{token}/outline/10/0/0.png"),
                               ("object", f"/api/object?token={token}&x={change['x']}&y={change['y']}"),
                               ("earlier overlay", f"/tiles/overlay/{earlier}/fill/10/0/0.png")):
                status, body, kind = _get(url, path)
                with lock:
                    answers.append((name, status, kind))
                    if name == "overlay" and status == 200:
                        tiles.setdefault(token, body)

    with running(session) as url:
        threads = [threading.Thread(target=client, args=(url, plan)) for plan in plans]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [a for a in answers if a[1] != 200]
        assert not failed, failed[:10]
        assert len(answers) == CLIENTS * CHANGES * 6
        # States were let go under the small budget, and every token given out was still answered; made
        # again, a state draws the same tile as when it was new.
        assert len(session._states) < len(tokens)
        for token, first in list(tiles.items())[:20]:
            status, again, _ = _get(url, f"/tiles/overlay/{token}/outline/10/0/0.png")
            assert status == 200 and again == first
    objs = query.open(store)
    for token, where in tokens.items():  # every state counts what the query API counts
        assert session.get_state(token).count == objs.where(where).count(), where


def test_a_token_the_server_did_not_make_is_a_json_404(store):
    session = Session(None, store)
    with running(session) as url:
        status, body, kind = _get(url, "/tiles/overlay/0123456789abcdef/outline/10/0/0.png")
        assert status == 404 and "json" in kind and "unknown view state" in json.loads(body)["error"]
        status, body, kind = _get(url, "/api/rows?token=0123456789abcdef")
        assert status == 404 and "apply the filter again" in json.loads(body)["error"]


def test_one_objects_answers_queries_from_many_threads_at_once(store):
    """DuckDB connections serve one thread at a time: each thread queries through a connection of its own."""
    objs = query.open(store, cache=True)
    conditions = [f"area > {n}" for n in range(10, 74, 4)]
    expected = {c: objs.where(c).count() for c in conditions}
    results: dict[str, list] = {c: [] for c in conditions}
    errors: list[BaseException] = []

    def work(condition: str) -> None:
        try:
            for _ in range(5):
                rel = objs.sql(f"SELECT count(*) FROM objects WHERE {condition}")
                results[condition].append(rel.fetchall()[0][0])
                channels = objs.sql("SELECT count(*) FROM channels WHERE channel = 'CD8'")  # made on first mention
                results[condition].append(channels.fetchall()[0][0])
        except BaseException as exc:  # noqa: BLE001 - reported below with the others
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in conditions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    for c in conditions:
        assert results[c][0::2] == [expected[c]] * 5 and results[c][1::2] == [len(objs)] * 5
