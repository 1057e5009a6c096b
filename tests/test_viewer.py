"""`cellar view`: the server's API (tiles, view states, rows, objects), its read-only SQL sandbox, the command
line, and the page itself end to end in headless Chromium (Debian's `chromium`, driven by Playwright)."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from cellar import measure
from cellar import query
from cellar.ngff.write import write_image
from helpers import intensities, nuclei_like, read_table, run_cli
from cellar.viewer import tiles
from cellar.viewer.server import running
from cellar.viewer.session import Session

SHAPE = (300, 400)


def _make(tmp: Path, version: str = "0.5") -> tuple[Path, Path, np.ndarray, np.ndarray]:
    labels = nuclei_like(SHAPE, 120, seed=71)
    data = intensities(SHAPE, 2, seed=72)
    image = write_image(tmp / "img.ome.zarr", data, "cyx", chunks=(1, 64, 64), labels={"nuclei": labels},
                        channel_names=["DAPI", "CD8"], scale={"y": 0.5, "x": 0.5}, n_levels=3, version=version)
    measure.measure(str(image), "nuclei", tmp / "s.cellar", workers=1)
    return image, tmp / "s.cellar", labels, data


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    image, store, labels, data = _make(tmp_path_factory.mktemp("view"))
    return {"image": image, "store": store, "labels": labels, "data": data, "df": read_table(store)[1]}


@pytest.fixture(scope="module")
def session(case):
    return Session(None, case["store"])


@pytest.fixture(scope="module")
def url(session):
    with running(session) as address:
        yield address


def _request(url: str, path: str, body: dict | None = None, headers: dict | None = None, raw: bytes | None = None):
    """(status, parsed JSON or bytes) of a GET, or of a POST of `body` as JSON."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers={**hdrs, **(headers or {})},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, kind, content = resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        status, kind, content = exc.code, exc.headers.get("Content-Type", ""), exc.read()
    return status, (json.loads(content) if "json" in kind else content)


def _state(url: str, **body) -> dict:
    status, out = _request(url, "/api/state", body)
    assert status == 200, out
    return out


def _png(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


# -- the API -------------------------------------------------------------------------------------------------
def test_info_describes_the_image_channels_columns_and_tile_pyramids(url, case):
    status, info = _request(url, "/api/info")
    assert status == 200
    assert (info["image"]["width"], info["image"]["height"]) == (400, 300)
    assert [c["name"] for c in info["channels"]] == ["DAPI", "CD8"]
    assert info["table"]["objects"] == len(case["df"])
    columns = {c["name"]: c for c in info["columns"]}
    assert columns["area_um2"]["unit"] == "micrometer^2" and columns["area_um2"]["numeric"]
    assert not columns["image"]["numeric"]
    assert info["tiles"]["image"]["maxLevel"] == 9  # 2^9 = 512 >= 400
    assert info["tiles"]["overlay"]["maxLevel"] == 11 and info["tiles"]["overlay"]["width"] == 1600


@pytest.mark.parametrize("where", [
    "area > 60",
    "area_um2 BETWEEN 10 AND 20 AND intensity_mean__CD8 > 29000",
    "eccentricity < 0.7 OR touching_neighbors >= 2",
    "area > (SELECT avg(area) FROM objects)",
    "sqrt(area) > 8 AND label_id % 2 = 1",
])
def test_filter_counts_equal_the_query_api(url, case, where):
    expected = query.open(case["store"]).where(where).count()
    state = _state(url, where=where)
    assert state["count"] == expected and state["total"] == len(case["df"])
    assert 0 < expected < len(case["df"])


def test_a_session_over_the_mapped_cache_shows_what_the_parquet_files_show(case, session, tmp_path):
    import shutil

    from cellar.query import cachebuild

    store = tmp_path / "s.cellar"
    shutil.copytree(case["store"], store)
    cachebuild.build(store, rows=True)
    mapped = Session(None, store)
    assert mapped.objs.mapped
    df = case["df"]
    expected = {"area > 60": (df.area > 60).sum(),
                "sqrt(area) > 8 AND label_id % 2 = 1": ((np.sqrt(df.area) > 8) & (df.label_id % 2 == 1)).sum()}
    for where, n in expected.items():
        a, b = mapped.state(where=where, by="area"), session.state(where=where, by="area")
        assert a.count == b.count == n and np.array_equal(a.matched, b.matched)
        assert mapped.page(a, sort="area", descending=True)["rows"] == session.page(b, sort="area", descending=True)["rows"]
    ids = case["df"]["label_id"].to_numpy()
    assert mapped.object(int(ids[3]))["columns"] == session.object(int(ids[3]))["columns"]


REFUSED = {
    "COPY objects TO '{tmp}/stolen.csv'": "COPY statement",
    "COPY (SELECT 1) TO '{tmp}/stolen.csv'": "COPY statement",
    "ATTACH '{tmp}/other.duckdb'": "ATTACH statement",
    "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0": "file system operations are disabled",
    "EXISTS (SELECT * FROM read_parquet('{store}/objects/*/*/*.parquet'))": "file system operations are disabled",
    "(SELECT count(*) FROM read_text('{store}/manifest.json')) > 0": "file system operations are disabled",
    "(SELECT count(*) FROM glob('{tmp}/*')) > 0": "file system operations are disabled",
    "INSTALL httpfs": "LOAD statement",
    "LOAD httpfs": "LOAD statement",
    "CREATE TABLE t AS SELECT * FROM objects": "CREATE statement",
    "DROP VIEW objects": "DROP statement",
    "INSERT INTO objects SELECT * FROM objects": "INSERT statement",
    "SET enable_external_access = true": "SET statement",
    "PRAGMA enable_profiling": "PRAGMA statement",
    "area > 1; DROP TABLE objects": "';' separates statements",
    "area > 1; COPY objects TO '{tmp}/x.csv'": "';' separates statements",
}


@pytest.mark.parametrize("template", list(REFUSED))
def test_sql_that_writes_reads_files_or_is_not_one_condition_is_refused(url, case, tmp_path, template):
    where = template.format(tmp=tmp_path, store=case["store"])
    status, out = _request(url, "/api/state", {"where": where})
    assert status == 403, out
    assert out["error"].startswith("refused: ") and REFUSED[template] in out["error"], out
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_after_refusals_the_sandbox_is_still_locked_and_read_only(url, session):
    for where in ("SET lock_configuration = false", "RESET enable_external_access"):
        assert _request(url, "/api/state", {"where": where})[0] == 403
    state = _state(url, where="current_setting('enable_external_access') = false "
                              "AND current_setting('lock_configuration') = true")
    assert state["count"] == state["total"]  # every row: both settings hold
    assert session.sandbox.table.num_rows == state["total"]


@pytest.mark.parametrize("where, fragment", [
    ("aera > 60", "unknown column 'aera' (did you mean: area"),
    ("area >", "not a SQL condition"),
    ("area > 1) OR (1 = 1", "not a SQL condition"),
    ("area > 1) UNION SELECT * FROM objects WHERE (1 = 1", "not a SQL condition"),
    ("image + 1 > 0", "No function matches the given name and argument types '+(VARCHAR, INTEGER_LITERAL)'"),
    ("image::INTEGER > 0", "Conversion Error: Could not convert string 'img' to INT32"),
    ("SELECT * FROM objects WHERE area > 1", "not a whole SELECT statement"),
])
def test_conditions_that_do_not_parse_or_bind_are_400_with_the_reason(url, where, fragment):
    status, out = _request(url, "/api/state", {"where": where})
    assert status == 400 and fragment in out["error"] and len(out["error"]) <= 300, out


def test_a_slow_condition_is_stopped_at_the_time_limit(url, session, case):
    old = session.sandbox.timeout_s
    session.sandbox.timeout_s = 0.3
    try:
        status, out = _request(url, "/api/state", {"where": "(SELECT count(*) FROM range(100000000000)) > 0"})
    finally:
        session.sandbox.timeout_s = old
    assert status == 400 and "stopped after 0.3 s" in out["error"], out
    assert _state(url, where="area > 60")["count"] == (case["df"].area > 60).sum()  # the next query runs


def test_rows_are_paged_sorted_and_limited(url, case):
    df = case["df"]
    state = _state(url, where="area > 60")
    status, page = _request(url, f"/api/rows?token={state['token']}&limit=7&offset=3&sort=area_um2&desc=1")
    assert status == 200 and page["total"] == state["count"]
    expected = df[df.area > 60].sort_values(["area_um2", "label_id"], ascending=[False, True]).iloc[3:10]
    ids = [row[page["columns"].index("label_id")] for row in page["rows"]]
    assert ids == expected.label_id.tolist()
    assert "__row" not in page["columns"]
    view = page["views"][0]
    first = expected.iloc[0]
    assert view["x"] == pytest.approx(first.centroid_x + 0.5) and view["box"]["y1"] == first.bbox_max_y
    status, out = _request(url, f"/api/rows?token={state['token']}&limit=501")
    assert status == 400 and "row limit" in out["error"]
    status, out = _request(url, f"/api/rows?token={state['token']}&sort=aera")
    assert status == 400 and "did you mean: area" in out["error"]
    assert _request(url, "/api/rows?token=0123456789abcdef")[0] == 404


def test_histogram_counts_every_object_and_the_matching_ones(url, case):
    df = case["df"]
    state = _state(url, where="area > 60")
    status, h = _request(url, f"/api/histogram?token={state['token']}&column=intensity_mean__CD8&bins=20")
    assert status == 200
    edges = np.asarray(h["edges"])
    v = df.intensity_mean__CD8.to_numpy()
    np.testing.assert_array_equal(h["all"], np.histogram(v, edges)[0])
    np.testing.assert_array_equal(h["matched"], np.histogram(v[df.area > 60], edges)[0])
    assert h["matched_range"] == [v[df.area > 60].min(), v[df.area > 60].max()]
    assert _request(url, f"/api/histogram?token={state['token']}&column=image")[0] == 400


def test_object_at_a_pixel_has_its_row_with_units(url, case):
    labels, df = case["labels"], case["df"]
    row = df.sort_values("area").iloc[len(df) // 2]
    label_id = int(row.label_id)
    ys, xs = np.nonzero(labels == label_id)
    state = _state(url, where=f"label_id <> {label_id}")
    status, obj = _request(url, f"/api/object?token={state['token']}&x={xs[0] + 0.5}&y={ys[0] + 0.5}")
    assert status == 200 and obj["found"] and obj["label_id"] == str(label_id)
    assert obj["matches"] is False
    columns = {c["name"]: c for c in obj["columns"]}
    assert set(columns) == {*df.columns, "image", "label_image"}
    assert columns["area"]["value"] == row.area and columns["area_um2"]["unit"] == "micrometer^2"
    assert columns["intensity_mean__CD8"]["value"] == pytest.approx(row.intensity_mean__CD8)
    background = np.argwhere(labels == 0)[0]
    _, empty = _request(url, f"/api/object?x={background[1] + 0.5}&y={background[0] + 0.5}")
    assert empty == {"label_id": None, "found": False}
    _, by_id = _request(url, f"/api/object?id={label_id}")
    assert by_id["label_id"] == str(label_id) and by_id["matches"] is None


def _composed(values: np.ndarray, rgb, lo, hi) -> np.ndarray:
    t = np.clip((values.astype(np.float32) - np.float32(lo)) * np.float32(1 / (hi - lo)), 0, 1)
    return np.clip(t[..., None] * np.asarray(rgb, np.float32), 0, 255).astype(np.uint8)


def test_image_tiles_compose_the_chosen_channels_from_the_right_level(url, case):
    data = case["data"]
    spec = "1:00ff00:1000:50000"
    status, content = _request(url, f"/tiles/image/9/1/0.png?c={spec}")  # full resolution, x 256..400
    assert status == 200
    tile = _png(content)
    assert tile.shape == (256, 144, 3)
    np.testing.assert_allclose(tile, _composed(data[1, :256, 256:400], (0, 255, 0), 1000, 50000), atol=1)
    # one level down: 2 image pixels per tile pixel, read from pyramid level 1 (data[::2, ::2])
    status, content = _request(url, f"/tiles/image/8/0/0.png?c=0:ff0000:0:60000,{spec}")
    tile = _png(content)
    assert tile.shape == (150, 200, 3)
    half = data[:, ::2, ::2]
    expected = _composed(half[0], (255, 0, 0), 0, 60000).astype(int) + _composed(half[1], (0, 255, 0), 1000, 50000)
    np.testing.assert_allclose(tile, np.clip(expected, 0, 255), atol=1)


@pytest.mark.parametrize("path, status", [
    ("/tiles/image/10/0/0.png", 404),      # no such level
    ("/tiles/image/2/0/0.png", 404),       # below the served levels
    ("/tiles/image/9/2/0.png", 404),       # right of the image
    ("/tiles/image/9/0/2.png", 404),       # below the image
    ("/tiles/image/9/-1/0.png", 404),
    ("/tiles/image/9/0/0.png?z=1", 404),   # a 2D image has one plane
    ("/tiles/image/9/0/0.png?c=2:ff0000:0:1", 400),
    ("/tiles/image/9/0/0.png?c=0:red:0:1", 400),
    ("/tiles/image/9/0/0.png?c=0:ff0000:0:nan", 400),
    ("/tiles/overlay/0123456789abcdef/outline/11/0/0.png", 404),
])
def test_tiles_outside_the_image_or_pyramid_are_4xx(url, path, status):
    got, out = _request(url, path)
    assert got == status, out
    assert isinstance(out, dict) and out["error"]


def test_overlay_tiles_outline_or_fill_only_the_matching_objects(url, case):
    labels, df = case["labels"], case["df"]
    T = tiles.OVERLAY_TILE  # tile (0, 0) of overlay level 9: image pixels [0, T) x [0, T)
    where = "area > 60"
    matched = set(df[df.area > 60].label_id.tolist())
    state = _state(url, where=where)
    for style in ("outline", "fill", "both", "wrong"):
        status, content = _request(url, f"/tiles/overlay/{state['token']}/{style}/9/0/0.png")
        if style == "wrong":
            assert status == 400
            continue
        assert status == 200  # overlay level 9 = full resolution (4 tile pixels per image pixel at level 11)
        tile = _png(content)
        assert tile.shape == (min(T, 300), min(T, 400), 4)
        lab = labels[:T, :T]
        inside = np.isin(lab, list(matched))
        edge = tiles.edges(np.pad(labels, 1)[:T + 2, :T + 2])
        if style == "outline":
            np.testing.assert_array_equal(tile[..., 3] > 0, edge & inside)
        elif style == "fill":
            np.testing.assert_array_equal(tile[..., 3] > 0, inside)
        else:
            assert np.all(tile[..., 3][edge & inside] == 255) and np.all(tile[..., 3][~inside] == 0)
    grey = _state(url, where=where, others="grey")
    tile = _png(_request(url, f"/tiles/overlay/{grey['token']}/fill/9/0/0.png")[1])
    others = (labels[:T, :T] > 0) & ~np.isin(labels[:T, :T], list(matched))
    assert np.all(tile[others][:, :3] == 128) and np.all(tile[others][:, 3] > 0)


def test_overlay_colours_follow_the_column_colormap_and_range(url, case):
    labels, df = case["labels"], case["df"]
    T = tiles.OVERLAY_TILE
    state = _state(url, by="area_um2", cmap="magma", range=[10, 40])
    assert state["legend"]["range"] == [10, 40] and state["legend"]["unit"] == "micrometer^2"
    tile = _png(_request(url, f"/tiles/overlay/{state['token']}/fill/9/0/0.png")[1])
    cmap = matplotlib.colormaps["magma"]
    for _, row in df.sample(10, random_state=0).iterrows():
        ys, xs = np.nonzero(labels[:T, :T] == row.label_id)
        if not ys.size:
            continue
        expected = np.round(np.asarray(cmap(np.clip((row.area_um2 - 10) / 30, 0, 1))) * 255).astype(int)
        np.testing.assert_array_equal(tile[ys[0], xs[0], :3], expected[:3])
    status, out = _request(url, "/api/state", {"by": "area_um2", "range": [5, 1]})
    assert status == 400 and "low first" in out["error"]
    status, out = _request(url, "/api/state", {"by": "aera"})
    assert status == 400 and "did you mean: area" in out["error"]


def test_overlay_tiles_zoomed_out_read_a_coarser_label_level(session, case):
    """At 2 image pixels per tile pixel the labels come from pyramid level 1 (labels[::2, ::2])."""
    state = session.state()
    level = session.overlay_grid.max_level - 3
    assert session.overlay_grid.factor(level) == 2
    lab, edge = session.label_tiles.get(level, 0, 0)
    np.testing.assert_array_equal(lab, case["labels"][::2, ::2])
    assert tiles.png(tiles.paint(lab, edge, state.palette, "fill"))


def test_a_3d_image_is_shown_plane_by_plane(tmp_path):
    labels = nuclei_like((10, 48, 64), 20, seed=73)
    image = write_image(tmp_path / "z.ome.zarr", intensities((10, 48, 64), 1, seed=74), "czyx", chunks=(1, 5, 32, 32),
                        labels={"cells": labels}, scale={"z": 2.0, "y": 0.5, "x": 0.5}, n_levels=2)
    measure.measure(str(image), "cells", tmp_path / "z.cellar", workers=1)
    session = Session(None, tmp_path / "z.cellar")
    assert session.info()["image"]["planes"] == 10
    state = session.state()
    top = session.overlay_grid.max_level - 2  # one tile pixel per image pixel
    for z in (0, 4, 9):
        tile = _png(session.overlay_tile(state.token, "fill", top, 0, 0, z=z))
        np.testing.assert_array_equal(tile[..., 3] > 0, labels[z] > 0)
        ys, xs = np.nonzero(labels[z])
        assert session.label_at(xs[0] + 0.5, ys[0] + 0.5, z) == labels[z, ys[0], xs[0]]
    ys, xs = np.nonzero(labels[4])
    label_id = int(labels[4, ys[0], xs[0]])
    found = session.object(label_id, state)
    zs = np.nonzero(labels == label_id)[0]
    assert found["view"]["z"] == pytest.approx(zs.mean() + 0.5) and found["matches"] is True  # the centroid's plane
    with pytest.raises(tiles.TileNotFound):
        session.overlay_tile(state.token, "fill", top, 0, 0, z=10)


def test_palette_lookup_dense_and_sparse_agree():
    rng = np.random.default_rng(3)
    ids = np.sort(rng.choice(10_000, 500, replace=False).astype(np.uint64)) + 1
    rgba = rng.integers(0, 256, (500, 4)).astype(np.uint8)
    labels = rng.choice(np.r_[ids, [0, 20_000, 77]], (64, 64)).astype(np.uint32)
    dense = tiles.Palette(ids, rgba)
    sparse = tiles.Palette(ids * np.uint64(2**40), rgba)
    assert dense.dense is not None and sparse.dense is None
    got = dense.lookup(labels)
    np.testing.assert_array_equal(sparse.lookup(labels.astype(np.uint64) * np.uint64(2**40)), got)
    pos = np.searchsorted(ids, labels)
    known = (pos < ids.size) & (ids[np.minimum(pos, ids.size - 1)] == labels)
    np.testing.assert_array_equal(got[known], rgba[pos[known]])
    assert np.all(got[~known] == 0)
    shown = rng.random(500) < 0.5
    for others in ((0, 0, 0, 0), (128, 128, 128, 255)):
        for palette in (tiles.Palette(ids, rgba, shown, others), tiles.Palette(ids * np.uint64(2**40), rgba, shown, others)):
            values = labels if palette.dense is not None else labels.astype(np.uint64) * np.uint64(2**40)
            out = palette.lookup(values)
            hit = known & shown[np.minimum(pos, ids.size - 1)]
            np.testing.assert_array_equal(out[hit], rgba[pos[hit]])
            assert np.all(out[known & ~hit] == others) and np.all(out[~known] == 0)


def test_state_changes_need_json_and_a_loopback_host(url):
    status, _ = _request(url, "/api/state", raw=b'{"where": "area > 1"}', headers={"Content-Type": "text/plain"})
    assert status == 415
    status, _ = _request(url, "/api/info", headers={"Host": "attacker.example"})
    assert status == 400  # a DNS-rebound page cannot talk to the viewer
    status, page = _request(url, "/")
    assert status == 200 and b"viewer.js" in page
    assert _request(url, "/static/viewer.js")[0] == 200


# -- the command line ----------------------------------------------------------------------------------------
def test_cli_view_prints_its_loopback_url_and_serves(case):
    exe = Path(sys.executable).with_name("cellar")
    proc = subprocess.Popen([str(exe), "view", str(case["image"]), "--store", str(case["store"]), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:(\d+)/)", line)
        assert m and f"{len(case['df'])} objects" in line, line
        status, info = _request(m.group(1), "/api/info")
        assert status == 200 and info["table"]["label_image"] == "nuclei"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert proc.returncode == 0, proc.stderr.read()


def test_cli_view_errors_are_one_line(case, tmp_path):
    for args, fragment in [
        (("--store", str(tmp_path / "none.cellar")), "no such store"),
        (("--store", str(case["store"]), "--labels", "cells"), "no table */cells"),
        (("--store", str(case["store"]), "--host", "no-such-host.invalid"), "--host no-such-host.invalid"),
    ]:
        proc = run_cli("view", str(case["image"]), *args, "--no-browser")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cellar: error: ") and fragment in lines[0], lines


# -- the page, end to end in Chromium -------------------------------------------------------------------------
@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda r: errors.append(f"request outside the server: {r.url}")
            if not r.url.startswith(url) and not r.url.startswith("data:") else None)
    page.goto(url)
    _settled(page)
    yield page
    context.close()
    assert not errors, errors


def _settled(page, count: int | None = None) -> None:
    """Wait until the page shows `count` matches (if given) and has drawn every tile of both layers."""
    if count is not None:
        page.wait_for_selector(f"#count[data-count='{count}']", timeout=10_000)
    page.wait_for_selector("body[data-overlay=loaded][data-image=loaded][data-drawn=yes]", timeout=15_000)


def _view_pixels(page) -> np.ndarray:
    return _png(page.locator("#osd").screenshot()).astype(int)


def _inner_points(labels: np.ndarray) -> dict[int, tuple[int, int]]:
    """One pixel (y, x) per object, the one farthest from its border, if at least 2 pixels from it (a sample
    that rounding on screen cannot move out of the object)."""
    from scipy import ndimage as ndi

    points = {}
    for label_id, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        depth = ndi.distance_transform_edt(np.pad(labels[box] == label_id, 1))
        y, x = np.unravel_index(np.argmax(depth), depth.shape)
        if depth[y, x] >= 2:
            points[label_id] = (box[0].start + y - 1, box[1].start + x - 1)
    return points


def _filled_on_screen(page, labels: np.ndarray) -> tuple[set[int], set[int]]:
    """With the fill style: (objects the overlay colours on screen, objects it leaves as the image), each
    sampled around its inner point (3 x 3 screen pixels), in the view with the overlay against the view with
    its opacity at 0: any change is the overlay's (hidden objects' pixels are not touched at all)."""
    page.select_option("#style", "fill")
    _settled(page)
    shown = _view_pixels(page)
    page.eval_on_selector("#opacity", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    _settled(page)
    plain = _view_pixels(page)
    points = _inner_points(labels)
    box = page.locator("#osd").bounding_box()
    at = page.evaluate("pts => pts.map(([x, y]) => window.cellar.imageToPage(x, y))",
                       [[x + 0.5, y + 0.5] for y, x in points.values()])
    coloured, left = set(), set()
    for label_id, p in zip(points, at):
        y, x = int(p["y"] - box["y"]), int(p["x"] - box["x"])
        if 1 <= y < shown.shape[0] - 1 and 1 <= x < shown.shape[1] - 1:
            change = np.abs(shown[y - 1:y + 2, x - 1:x + 2] - plain[y - 1:y + 2, x - 1:x + 2]).sum()
            assert change == 0 or change > 20, (label_id, change)  # coloured or not, nothing in between
            (coloured if change else left).add(label_id)
    assert len(coloured | left) > 0.8 * len(points)  # the whole image is in view
    return coloured, left


def test_page_filter_with_completion_updates_the_count_and_the_image(page, case):
    before = _view_pixels(page)
    total = len(case["df"])
    assert page.text_content("#count") == f"{total} of {total} objects match"
    box = page.locator("#where")
    box.click()
    box.type("intensity_mean__C")
    page.wait_for_selector("#completions li[data-name=intensity_mean__CD8]")
    box.press("Tab")
    assert box.input_value() == "intensity_mean__CD8"
    box.type(" > 30000 AND are")
    assert page.locator("#completions li").first.get_attribute("data-name") == "area"
    box.press("Tab")
    box.type(" > 60")
    box.press("Enter")
    where = "intensity_mean__CD8 > 30000 AND area > 60"
    assert box.input_value() == where
    expected = query.open(case["store"]).where(where).count()
    _settled(page, expected)
    assert page.text_content("#count") == f"{expected} of {total} objects match"
    after = _view_pixels(page)
    assert (np.abs(after - before).sum(axis=-1) > 30).sum() > 200  # the hidden objects' outlines are gone
    assert page.locator("#rows tbody tr").count() == min(50, expected)
    df = case["df"]
    matching = set(df[(df.intensity_mean__CD8 > 30000) & (df.area > 60)].label_id.tolist())
    coloured, left = _filled_on_screen(page, case["labels"])
    assert coloured == matching & (coloured | left) and left == (coloured | left) - matching
    assert coloured  # some matching object is on screen


def test_page_shows_sql_errors_and_keeps_the_last_state(page, case):
    total = len(case["df"])
    page.fill("#where", "COPY objects TO '/tmp/x.csv'")
    page.press("#where", "Enter")
    page.wait_for_selector("#where-error:not([hidden])")
    assert "refused: COPY statement" in page.text_content("#where-error")
    assert page.text_content("#count") == f"{total} of {total} objects match"


def test_page_colour_by_a_column_draws_its_legend_and_recolours(page, case):
    before = _view_pixels(page)
    page.select_option("#by", "area_um2")
    page.wait_for_selector("#legend[data-column=area_um2]")
    _settled(page)
    legend = page.text_content("#legend")
    assert "area_um2 (micrometer^2)" in legend
    lo, hi = case["df"].area_um2.min(), case["df"].area_um2.max()  # every object matches: their range
    ticks = page.locator("#legend .ticks span").all_text_contents()
    assert ticks == [f"{lo:.6g}", f"{(lo + hi) / 2:.6g}", f"{hi:.6g}"]
    assert page.input_value("#hist-column") == "area_um2"
    after = _view_pixels(page)
    assert (np.abs(after - before).sum(axis=-1) > 30).sum() > 200


def test_page_click_on_an_object_shows_its_row_with_units(page, case):
    labels, df = case["labels"], case["df"]
    row = df.sort_values("area").iloc[-1]  # the largest: easy to hit
    label_id = int(row.label_id)
    ys, xs = np.nonzero(labels == label_id)
    inner = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)  # a pixel of it near its centroid
    point = page.evaluate(f"() => window.cellar.imageToPage({xs[inner] + 0.5}, {ys[inner] + 0.5})")
    page.mouse.click(point["x"], point["y"])
    page.wait_for_selector(f"#object[data-label-id='{label_id}']")
    cells = page.locator("#object tr[data-column=area_um2] td").all_text_contents()
    assert cells == ["area_um2", f"{row.area_um2:.6g}", "micrometer^2"]
    assert page.locator("#object tr").count() == len(df.columns) + 2  # and image, label_image
    assert "matches the filter" in page.text_content("#object .status")


def test_page_table_sorts_and_a_row_centres_the_view_on_its_object(page, case):
    df = case["df"]
    page.click("#rows th[data-column=area]")
    page.wait_for_selector("#rows th.sorted[data-column=area]")
    page.click("#rows th[data-column=area]")  # again: descending
    page.wait_for_selector("#rows th.sorted[data-column=area]:has-text('▼')")
    largest = df.sort_values(["area", "label_id"], ascending=[False, True]).iloc[0]
    label_id = int(largest.label_id)
    first = page.locator("#rows tbody tr").first
    assert first.get_attribute("data-label-id") == str(label_id)
    first.click()
    page.wait_for_selector(f"#object[data-label-id='{label_id}']")
    # the pan animation: over once the viewport's current centre and zoom have reached their targets
    page.wait_for_function("() => { const v = window.cellar.viewer.viewport; "
                           "return v.getCenter(true).equals(v.getCenter(false)) && v.getZoom(true) === v.getZoom(false); }")
    centre = page.evaluate("() => { const c = window.cellar.viewer.viewport.getCenter(true); "
                           "return [c.x * window.cellar.width, c.y * window.cellar.width]; }")
    assert centre == pytest.approx([largest.centroid_x + 0.5, largest.centroid_y + 0.5], abs=2)


def test_page_histogram_drag_sets_a_between_filter(page, case):
    page.select_option("#hist-column", "area")
    page.wait_for_function("() => { const h = document.getElementById('hist').dataset; "
                           "return h.column === 'area' && h.token === document.body.dataset.token; }")
    box = page.locator("#hist").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.3, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=5)
    page.mouse.move(box["x"] + box["width"] * 0.7, y, steps=5)
    page.mouse.up()
    page.wait_for_selector("#count[data-count]")
    where = page.input_value("#where")
    m = re.fullmatch(r"area BETWEEN (\S+) AND (\S+)", where)
    assert m and float(m.group(1)) < float(m.group(2)), where
    expected = query.open(case["store"]).where(where).count()
    _settled(page, expected)
    assert 0 < expected < len(case["df"])
