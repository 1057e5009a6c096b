"""PathViewer-style commands through the CLI, as a user types them: filter (ids and masks), color, render,
hist and annotate."""

from __future__ import annotations

import json
import shutil

import matplotlib
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from skimage.io import imread

from cellar import measure
from cellar import ngff
from cellar import query
from cellar.ngff.write import write_image
from helpers import intensities, nuclei_like, read_table, relocate_source, run_cli


@pytest.fixture(scope="module", params=["0.4", "0.5"])
def measured(tmp_path_factory, request):
    """A fresh copy per test of a measured image (with a 2-level pyramid) and its store."""
    tmp = tmp_path_factory.mktemp(f"pv{request.param}")
    labels = nuclei_like((96, 128), 45, seed=51)
    image = write_image(tmp / "img.ome.zarr", intensities((96, 128), 2, seed=52), "cyx", chunks=(1, 32, 32),
                        labels={"nuclei": labels}, channel_names=["DAPI", "CD8"], scale={"y": 0.5, "x": 0.5},
                        n_levels=2, version=request.param)
    measure.measure(str(image), "nuclei", tmp / "s.cellar", workers=1)
    return tmp, labels


@pytest.fixture
def case(measured, tmp_path):
    src, labels = measured
    shutil.copytree(src / "img.ome.zarr", tmp_path / "img.ome.zarr")
    shutil.copytree(src / "s.cellar", tmp_path / "s.cellar")
    relocate_source(tmp_path / "s.cellar", str(tmp_path / "img.ome.zarr"))  # the copy, not the original
    return tmp_path, labels


def _ok(result):
    assert result.returncode == 0, result.stderr
    return result


def _fails(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cellar: error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def _image_label(image_dir, name):
    return dict(ngff.open_image(str(image_dir)).label(name).image_label)


def test_filter_prints_writes_json_and_parquet_ids(case):
    tmp, _ = case
    _, df = read_table(tmp / "s.cellar")
    expected = np.sort(df[df.area > 60].label_id.to_numpy())
    out = _ok(run_cli("filter", str(tmp / "s.cellar"), "--where", "area > 60"))
    assert [int(x) for x in out.stdout.split()] == expected.tolist()
    _ok(run_cli("filter", str(tmp / "s.cellar"), "--where", "area > 60", "--output", str(tmp / "ids.json")))
    assert json.loads((tmp / "ids.json").read_text())["label_ids"] == expected.tolist()
    _ok(run_cli("filter", str(tmp / "s.cellar"), "--where", "area > 60", "--output", str(tmp / "ids.parquet")))
    assert pq.read_table(tmp / "ids.parquet").column("label_id").to_pylist() == expected.tolist()
    _fails(run_cli("filter", str(tmp / "s.cellar"), "--where", "area > 60", "--output", str(tmp / "ids.json")),
           "exists; pass --overwrite")


def test_filter_mask_writes_a_label_image_of_the_matching_objects(case):
    tmp, labels = case
    _, df = read_table(tmp / "s.cellar")
    keep = df[df.area > 60].label_id.to_numpy()
    _ok(run_cli("filter", str(tmp / "s.cellar"), "--where", "area > 60", "--mask", "big"))
    image = ngff.open_image(str(tmp / "img.ome.zarr"))  # validated by ome-zarr-models
    assert set(image.label_names) == {"nuclei", "big"}
    big = image.label("big")
    assert len(big.multiscale.levels) == 2
    level0 = np.asarray(ngff.open_level(image.url, big.multiscale.levels[0].path)[...])
    np.testing.assert_array_equal(level0, np.where(np.isin(labels, keep), labels, 0))
    level1 = np.asarray(ngff.open_level(image.url, big.multiscale.levels[1].path)[...])
    np.testing.assert_array_equal(level1, np.where(np.isin(labels[::2, ::2], keep), labels[::2, ::2], 0))
    _fails(run_cli("filter", str(tmp / "s.cellar"), "--where", "area > 60", "--mask", "big"), "exists")
    _ok(run_cli("filter", str(tmp / "s.cellar"), "--where", "area > 10000", "--mask", "big", "--overwrite"))
    assert not np.asarray(ngff.open_level(image.url, big.multiscale.levels[0].path)[...]).any()
    assert not any(p.name.startswith(".tmp") for p in (tmp / "img.ome.zarr" / "labels").iterdir())


def test_color_writes_colormap_colours_and_hides_the_rest(case):
    tmp, _ = case
    _, df = read_table(tmp / "s.cellar")
    _ok(run_cli("color", str(tmp / "s.cellar"), "--by", "area", "--where", "area > 40",
                "--properties", "area,eccentricity"))
    meta = _image_label(tmp / "img.ome.zarr", "nuclei")
    colors = {c["label-value"]: c["rgba"] for c in meta["colors"]}
    assert len(colors) == len(df)
    sub = df[df.area > 40]
    viridis = matplotlib.colormaps["viridis"]
    lo_id = int(sub.label_id[sub.area.idxmin()])
    hi_id = int(sub.label_id[sub.area.idxmax()])
    assert colors[lo_id] == [int(round(c * 255)) for c in viridis(0.0)]
    assert colors[hi_id] == [int(round(c * 255)) for c in viridis(1.0)]
    hidden = df[df.area <= 40].label_id
    assert len(hidden) and all(colors[int(i)][3] == 0 for i in hidden)
    props = {p["label-value"]: p for p in meta["properties"]}
    row = df.iloc[3]
    assert props[int(row.label_id)]["area"] == row.area
    assert props[int(row.label_id)]["eccentricity"] == pytest.approx(row.eccentricity)


def test_color_with_a_range_and_grey_others(case):
    tmp, _ = case
    _, df = read_table(tmp / "s.cellar")
    _ok(run_cli("color", str(tmp / "s.cellar"), "--by", "area", "--range", "0", "1000", "--cmap", "magma",
                "--where", "area > 40", "--others", "grey"))
    colors = {c["label-value"]: c["rgba"] for c in _image_label(tmp / "img.ome.zarr", "nuclei")["colors"]}
    small = int(df[df.area <= 40].label_id.iloc[0])
    assert colors[small] == [128, 128, 128, 255]
    row = df[df.area > 40].iloc[0]
    magma = matplotlib.colormaps["magma"]
    assert colors[int(row.label_id)] == [int(round(c * 255)) for c in magma(row.area / 1000)]


def test_color_by_a_text_annotation_uses_categories(case):
    tmp, _ = case
    _, df = read_table(tmp / "s.cellar")
    classes = np.where(df.area > 50, "tumour", "stroma")
    (tmp / "classes.csv").write_text("label_id,klass\n" + "".join(f"{i},{c}\n" for i, c in zip(df.label_id, classes)))
    _ok(run_cli("annotate", str(tmp / "s.cellar"), "--from", str(tmp / "classes.csv")))
    out = _ok(run_cli("color", str(tmp / "s.cellar"), "--by", "klass"))
    assert "2 categories" in out.stderr
    colors = {c["label-value"]: tuple(c["rgba"]) for c in _image_label(tmp / "img.ome.zarr", "nuclei")["colors"]}
    by_class = {}
    for i, c in zip(df.label_id, classes):
        by_class.setdefault(c, set()).add(colors[int(i)])
    assert all(len(v) == 1 for v in by_class.values()) and by_class["tumour"] != by_class["stroma"]


def _outline_pixels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ys, xs, label values) of the object pixels with a 4-neighbour of another value, and (ys, xs, values)
    of those without, away from the image's border (the axes' frame covers the outermost pixels)."""
    h, w = labels.shape
    inner = labels[1:-1, 1:-1]
    differs = np.zeros(inner.shape, bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        differs |= labels[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] != inner
    edge, fill = np.nonzero(differs & (inner > 0)), np.nonzero(~differs & (inner > 0))
    return (edge[0] + 1, edge[1] + 1, inner[edge]), (fill[0] + 1, fill[1] + 1, inner[fill])


def _image_grey(image_dir, channel: int = 0) -> np.ndarray:
    """The channel at level 0 as the render shows it under the objects: contrast-stretched to its 1st-99th
    percentiles, 0..255."""
    values = np.asarray(zarr.open_array(str(image_dir / "0"), mode="r")[channel], np.float64)
    lo, hi = np.percentile(values, [1, 99])
    return np.clip((values - lo) / (hi - lo), 0, 1) * 255


def _png_at(png: np.ndarray, info: dict, shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """RGB (int) of a rendered PNG at the centres of the pixels (ys, xs) of the drawn (h, w) image."""
    left, top, right, bottom = info["image_px"]
    py = (top + (ys + 0.5) * (bottom - top) / shape[0]).astype(int)
    px = (left + (xs + 0.5) * (right - left) / shape[1]).astype(int)
    return png[py, px, :3].astype(int)


@pytest.mark.parametrize("others", ["hide", "grey"])
def test_render_outlines_the_matching_objects_in_their_colours(case, others):
    """Sampled from the PNG: every outline pixel of a matching object has the colormap's colour of its value
    over the colour bar's range (the matching objects' min and max); other objects' outlines show the image
    (its first channel, contrast-stretched) or the others' grey; inside the outlines, the image."""
    from cellar.query import pathviewer

    tmp, labels = case
    entry, df = read_table(tmp / "s.cellar")
    q, _ = pathviewer.table_query(query.open(tmp / "s.cellar"), None, None)
    coloring = pathviewer.coloring(q, "area", where="area > 60", others=others)
    info = pathviewer.render(pathviewer.source_image(entry), "nuclei", coloring, tmp / "r.png", caption="objects")
    sub = df[df.area > 60]
    lo, hi = float(sub.area.min()), float(sub.area.max())
    assert info["colorbar"] == (lo, hi) and info["colorbar_label"] == "area (pixel)" and info["legend"] is None
    assert info["caption"] == "objects" and info["level"] == 0 and info["objects_in_view"] == len(df)
    png = imread(tmp / "r.png")
    (ys, xs, ids), (iy, ix, _) = _outline_pixels(labels)
    got = _png_at(png, info, labels.shape, ys, xs)
    matched = np.isin(ids, sub.label_id.to_numpy())
    assert matched.sum() > 100 and (~matched).sum() > 100
    area = dict(zip(df.label_id.tolist(), df.area.tolist()))
    values = np.array([area[int(i)] for i in ids[matched]], float)
    expected = np.round(matplotlib.colormaps["viridis"]((values - lo) / (hi - lo))[:, :3] * 255)
    np.testing.assert_allclose(got[matched], expected, atol=1)
    grey = _image_grey(tmp / "img.ome.zarr")
    if others == "grey":
        assert (got[~matched] == 128).all()
    else:  # hidden: the image shows through
        np.testing.assert_allclose(got[~matched], np.repeat(grey[ys, xs][~matched, None], 3, axis=1), atol=1)
    inside = _png_at(png, info, labels.shape, iy, ix)
    np.testing.assert_allclose(inside, np.repeat(grey[iy, ix][:, None], 3, axis=1), atol=1)


def test_render_draws_the_filtered_objects(case):
    from cellar.query import pathviewer

    tmp, labels = case
    entry, df = read_table(tmp / "s.cellar")
    a, b = tmp / "all.png", tmp / "some.png"
    out = _ok(run_cli("render", str(tmp / "img.ome.zarr"), "--store", str(tmp / "s.cellar"), "--by", "area",
                      "--out", str(a)))
    title = f"{entry['image']} / labels/nuclei, coloured by area"
    assert out.stderr.strip() == (f"wrote {a}: level 0, 128 x 96 px, {len(df)} objects in view; "
                                  f"{title} ({len(df)} of {len(df)} objects)")
    out = _ok(run_cli("render", str(tmp / "img.ome.zarr"), "--store", str(tmp / "s.cellar"), "--by", "area",
                      "--where", "area > 60", "--style", "fill", "--out", str(b)))
    caption = f"{title}; filter: area > 60 ({(df.area > 60).sum()} of {len(df)} objects)"
    assert out.stderr.strip() == f"wrote {b}: level 0, 128 x 96 px, {len(df)} objects in view; {caption}"
    # the file is what pathviewer.render draws (checked pixel by pixel above), here with fills: the matching
    # objects' insides are coloured, the others' show the image
    q, _ = pathviewer.table_query(query.open(tmp / "s.cellar"), None, None)
    info = pathviewer.render(pathviewer.source_image(entry), "nuclei", pathviewer.coloring(q, "area", where="area > 60"),
                             tmp / "api.png", style="fill", caption=caption)
    png = imread(b)
    np.testing.assert_array_equal(png, imread(tmp / "api.png"))
    assert info["caption"] == caption
    _, (iy, ix, ids) = _outline_pixels(labels)
    inside = _png_at(png, info, labels.shape, iy, ix)
    matched = np.isin(ids, df[df.area > 60].label_id.to_numpy())
    grey = np.repeat(_image_grey(tmp / "img.ome.zarr")[iy, ix][:, None], 3, axis=1)
    assert (np.abs(inside[matched] - grey[matched]).max(axis=1) > 10).all()
    np.testing.assert_allclose(inside[~matched], grey[~matched], atol=1)
    out = _ok(run_cli("render", str(tmp / "img.ome.zarr"), "--store", str(tmp / "s.cellar"), "--by", "area",
                      "--level", "1", "--region", "10:80,20:100", "--channel", "CD8", "--out", str(tmp / "r.png")))
    in_view = np.unique(labels[::2, ::2][5:40, 10:50])  # level 1 is labels[::2, ::2]; the region halved
    assert f"level 1, 40 x 35 px, {np.count_nonzero(in_view)} objects in view;" in out.stderr
    _fails(run_cli("render", str(tmp / "img.ome.zarr"), "--store", str(tmp / "s.cellar"), "--by", "area",
                   "--region", "80:10,0:5", "--out", str(tmp / "x.png")), "--region 80:10,0:5")
    _fails(run_cli("render", str(tmp / "img.ome.zarr"), "--store", str(tmp / "s.cellar"), "--by", "area",
                   "--level", "7", "--out", str(tmp / "x.png")), "--level 7")
    assert not (tmp / "x.png").exists()


def test_hist_counts_every_value_and_the_matching_ones(case):
    from cellar.query import pathviewer

    tmp, _ = case
    _, df = read_table(tmp / "s.cellar")
    h = tmp / "h.png"
    out = _ok(run_cli("hist", str(tmp / "s.cellar"), "area_um2", "--where", "eccentricity < 0.7", "--out", str(h)))
    match = df.eccentricity < 0.7
    assert 0 < match.sum() < len(df)
    assert out.stderr.strip() == f"wrote {h}: {len(df)} values in 50 bins, {match.sum()} match"
    info = pathviewer.histogram(query.open(tmp / "s.cellar"), "area_um2", tmp / "api.png", where="eccentricity < 0.7",
                                caption="area_um2; filter: eccentricity < 0.7")  # what the CLI draws
    np.testing.assert_array_equal(imread(h), imread(tmp / "api.png"))
    counts, edges = np.histogram(df.area_um2.to_numpy(), bins=50)
    np.testing.assert_allclose(info["edges"], edges, rtol=1e-12)
    np.testing.assert_array_equal(info["counts_all"], counts)
    np.testing.assert_array_equal(info["counts_matched"], np.histogram(df.area_um2[match].to_numpy(), bins=edges)[0])
    assert info["caption"] == "area_um2; filter: eccentricity < 0.7" and info["xlabel"] == "area_um2 (micrometer^2)"
    assert info["legend"] == [f"all ({len(df)})", f"eccentricity < 0.7 ({match.sum()})"]


def test_annotations_are_versioned_and_joined(case):
    tmp, _ = case
    store = tmp / "s.cellar"
    _, df = read_table(store)
    ids = df.label_id.to_numpy()
    (tmp / "v1.csv").write_text("cell,klass,score\n" + "".join(f"{i},a,{k / 10}\n" for k, i in enumerate(ids[:10])))
    out = _ok(run_cli("annotate", str(store), "--from", str(tmp / "v1.csv"), "--key", "cell"))
    assert "annotated 10 objects" in out.stderr and "version 1" in out.stderr
    (tmp / "v2.csv").write_text("label_id,klass\n" + "".join(f"{i},b\n" for i in ids[:4]))
    _ok(run_cli("annotate", str(store), "--from", str(tmp / "v2.csv")))
    objs = query.open(store)
    latest = dict(objs.sql("SELECT label_id, klass FROM objects WHERE klass IS NOT NULL").fetchall())
    assert latest == {int(i): "b" for i in ids[:4]}
    assert "score" not in objs.column_names  # the latest version only has klass
    versions = objs.sql("SELECT version, count(*) FROM annotations GROUP BY version ORDER BY version").fetchall()
    assert versions == [(1, 10), (2, 4)]
    # the versions' column lists differ (klass, score / klass): one scan each, unioned by name
    scored = "SELECT version, count(score), count(klass) FROM annotations GROUP BY version ORDER BY version"
    assert objs.sql(scored).fetchall() == [(1, 10, 10), (2, 0, 4)]
    assert _ok(run_cli("sql", str(store), scored, "--format", "csv")).stdout.split() == [
        '"version","count(score)","count(klass)"', "1,10,10", "2,0,4"]
    assert objs.sql("SELECT description FROM columns WHERE name = 'klass'").fetchall()[0][0].startswith("annotation (version 2")
    assert len(read_table(store)[1]) == len(df)  # measurements untouched
    assert query.open(store, cache=True).where("klass = 'b'").count() == 4


# (statement, whether it may read an annotation column: `sql.may_read`, which errs towards True)
_STATEMENTS = [
    ("SELECT label_id FROM objects WHERE area > 40 ORDER BY label_id", False),
    ("SELECT image, avg(area) AS m, count(*) AS n FROM objects GROUP BY image ORDER BY image", False),
    ("SELECT o.label_id FROM objects o WHERE o.area > 40 ORDER BY 1", False),
    ("WITH q AS (SELECT label_id, area FROM objects) SELECT label_id FROM q WHERE area > 40 ORDER BY label_id", False),
    ('select "Label_ID" from objects order by 1', False),
    ("SELECT count(*) FROM objects JOIN annotations a USING (image, label_image, label_id)", False),
    ("SELECT * FROM objects ORDER BY label_id", True),
    ("SELECT label_id, klass FROM objects ORDER BY label_id", True),
    ('SELECT label_id, "KLASS" FROM objects ORDER BY label_id', True),
    ("SELECT label_id, area AS a FROM objects ORDER BY a, label_id", False),
    ("SELECT o FROM objects o ORDER BY o.label_id", True),
    ("SELECT o AS x FROM objects o ORDER BY o.label_id", True),
    ("SELECT label_id FROM objects AS o ORDER BY o", True),
    ("SELECT COLUMNS('k.*') FROM objects ORDER BY 1", True),
    ("FROM objects ORDER BY label_id", True),
    ("SELECT count(*) FROM (FROM objects)", True),
    ("SELECT count(*) FROM objects UNION ALL SELECT count(*) FROM objects", False),
    ("DESCRIBE objects", True),
    ("SELECT count(*) FROM information_schema.columns WHERE table_name = 'objects'", True),
    ("SELECT label_id FROM objects -- klass\nORDER BY 1", True),
]


@pytest.mark.parametrize("statement, reads", _STATEMENTS, ids=[str(k) for k in range(len(_STATEMENTS))])
def test_the_annotation_join_is_left_out_only_where_no_statement_can_tell(case, statement, reads):
    """`objects` is made without the annotations' LEFT JOIN, which joins (once, for good) when a statement may
    read their columns (`Tables.con_for`); every statement answers as over the joined view."""
    from cellar.query.sql import may_read
    from cellar.query.store import _VIEW_NAMES

    tmp, _ = case
    store = tmp / "s.cellar"
    ids = read_table(store)[1].label_id.to_numpy()
    (tmp / "v1.csv").write_text("label_id,klass\n" + "".join(f"{i},{'ab'[k % 2]}\n" for k, i in enumerate(ids[:9])))
    _ok(run_cli("annotate", str(store), "--from", str(tmp / "v1.csv")))
    fresh, joined = query.open(store, engine="duckdb"), query.open(store, engine="duckdb")
    joined.con_for("SELECT *")
    early = fresh.sql("SELECT label_id FROM objects ORDER BY label_id")  # bound before any join
    notes, words = fresh._annotation_words, fresh._column_words
    assert notes == {"klass"} and may_read(statement, notes, words, _VIEW_NAMES) is reads
    assert fresh.sql(statement).fetchall() == joined.sql(statement).fetchall()
    assert fresh._joined is reads
    assert (fresh.sql("SELECT klass FROM objects WHERE klass = 'a'").fetchall()
            == joined.sql("SELECT klass FROM objects WHERE klass = 'a'").fetchall() == [("a",)] * 5)
    assert fresh._joined  # and stays so
    assert early.fetchall() == joined.sql("SELECT label_id FROM objects ORDER BY label_id").fetchall()


def test_threads_meeting_the_annotation_join_all_answer_alike(case):
    """Threads querying one Objects at once, some statements reading the annotations (the join is made while the
    others run), all get the joined view's answers."""
    import threading

    tmp, _ = case
    store = tmp / "s.cellar"
    ids = read_table(store)[1].label_id.to_numpy()
    (tmp / "v1.csv").write_text("label_id,klass\n" + "".join(f"{i},{'ab'[k % 2]}\n" for k, i in enumerate(ids[:9])))
    _ok(run_cli("annotate", str(store), "--from", str(tmp / "v1.csv")))
    statements = ["SELECT label_id FROM objects ORDER BY label_id", "SELECT label_id, klass FROM objects ORDER BY 1",
                  "SELECT count(*) FROM objects WHERE area > 20"]
    joined = query.open(store, engine="duckdb")
    want = {s: joined.sql(s).fetchall() for s in statements}
    for trial in range(5):
        objs, start, got = query.open(store, engine="duckdb"), threading.Barrier(6), []

        def work(k):
            start.wait()
            for s in statements[k % 3:] + statements[:k % 3]:
                got.append(objs.sql(s).fetchall() == want[s])

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert got == [True] * 18 and objs._joined


def test_annotation_errors_are_reported(case):
    tmp, _ = case
    store = tmp / "s.cellar"
    _, df = read_table(store)
    good = int(df.label_id.iloc[0])
    (tmp / "bad.csv").write_text(f"label_id,klass\n{good},a\n999999,b\n999998,c\n")
    _fails(run_cli("annotate", str(store), "--from", str(tmp / "bad.csv")), "2 of 3 rows", "999998, 999999",
           "--drop-unknown")
    out = _ok(run_cli("annotate", str(store), "--from", str(tmp / "bad.csv"), "--drop-unknown"))
    assert "annotated 1 objects" in out.stderr and "2 rows with unknown label ids not stored" in out.stderr
    (tmp / "clash.csv").write_text(f"label_id,area\n{good},3\n")
    _fails(run_cli("annotate", str(store), "--from", str(tmp / "clash.csv")), "column 'area'", "rename it")
    (tmp / "dup.csv").write_text(f"label_id,k\n{good},1\n{good},2\n")
    _fails(run_cli("annotate", str(store), "--from", str(tmp / "dup.csv")), f"more than once: {good}")
    _fails(run_cli("annotate", str(store), "--from", str(tmp / "dup.csv"), "--key", "cell"), "no column 'cell'")


def test_bad_object_commands_fail_with_one_line(case):
    tmp, _ = case
    store = str(tmp / "s.cellar")
    _fails(run_cli("filter", store, "--where", "aera > 3"), "unknown column 'aera'", "did you mean: area")
    _fails(run_cli("color", store, "--by", "eccentricty"), "did you mean: eccentricity")
    _fails(run_cli("color", store, "--by", "area", "--cmap", "nope"), "--cmap nope: unknown colormap")
    _fails(run_cli("color", store, "--by", "area", "--range", "5", "1"), "--range 5 1")
    _fails(run_cli("hist", store, "area", "--out", str(tmp / "h.png"), "--where", "area >"), "where 'area >'")
    _fails(run_cli("filter", store, "--where", "area > 3", "--image", "nope"), "no table nope/*")


def test_the_image_label_metadata_stays_valid_ngff(case):
    tmp, _ = case
    _ok(run_cli("color", str(tmp / "s.cellar"), "--by", "area", "--properties", "area"))
    group = zarr.open_group(str(tmp / "img.ome.zarr" / "labels" / "nuclei"), mode="r")
    attrs = dict(group.attrs)
    meta = (attrs.get("ome") or attrs)["image-label"]
    assert meta["source"] == {"image": "../../"} and len(meta["colors"]) == len(meta["properties"])
    ngff.open_image(str(tmp / "img.ome.zarr")).label("nuclei")  # ome-zarr-models accepts it


@pytest.mark.parametrize("column", ["klass", "reviewed"])
def test_categorical_colours_name_every_value_null_included(case, column):
    """Text and boolean columns: each category present among the matching objects gets its own colour, in
    sorted order of its name, NULL being the category "NULL"; other objects are hidden."""
    from cellar.query import pathviewer

    tmp, _ = case
    _, df = read_table(tmp / "s.cellar")
    klass = np.where(df.area > 50, "tumour", np.where(df.area > 30, "stroma", ""))  # "": no class (NULL)
    reviewed = np.where(df.label_id % 3 == 0, "", np.where(df.label_id % 2 == 0, "true", "false"))
    (tmp / "a.csv").write_text("label_id,klass,reviewed\n" + "".join(
        f"{i},{k},{r}\n" for i, k, r in zip(df.label_id, klass, reviewed)))
    _ok(run_cli("annotate", str(tmp / "s.cellar"), "--from", str(tmp / "a.csv")))
    q, _ = pathviewer.table_query(query.open(tmp / "s.cellar"), None, None)
    got = pathviewer.coloring(q, column, where="area > 20")
    assert q.objects.schema[column] == ("VARCHAR" if column == "klass" else "BOOLEAN")
    values = {"klass": klass, "reviewed": reviewed}[column]
    names = {"": "NULL", "true": "True", "false": "False"}
    by_id = {int(i): names.get(v, v) for i, v in zip(df.label_id, values)}
    matched = {int(i) for i in df.label_id[df.area > 20]}
    expected_names = sorted({by_id[i] for i in matched})
    assert list(got.categories) == expected_names
    palette = matplotlib.colormaps["tab10"]
    for i, rgba in zip(got.ids.tolist(), got.rgba.tolist()):
        if i in matched:
            k = expected_names.index(by_id[i])
            assert rgba == [int(round(c * 255)) for c in palette(k)], i
        else:
            assert rgba == [0, 0, 0, 0], i
    info = pathviewer.render(pathviewer.source_image(pathviewer.table_query(q.objects, None, None)[1]), "nuclei", got,
                             tmp / "r.png")
    assert info["legend"] == expected_names and info["colorbar"] is None
