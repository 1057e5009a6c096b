"""Benchmark: `cellar view` on a slide of 1M objects: a filter change to redrawn overlay tiles, and tiles.

Generates, deterministically and chunk by chunk, an OME-Zarr 0.5 slide of `--size` x `--size` pixels (default
16384) with 2 uint16 channels and a label image of one elliptical object per 16 x 16 cell (1,048,576 objects
at the default size; random axes, orientation and brightness, label ids shuffled), with a pyramid down to
512 px (labels sampled at block centres, the image averaged over blocks), written in 512 x 512 chunks; then
measures it with cellar (`--features`: by default streaming, moment and convex-hull features) into a store.
Both are kept in `--data` (default benchmarks/results/viewer) and reused when they exist.

Timed in one process on the viewer's own session (`viewer.session.Session`: the store in the session cache,
the filter in the SQL sandbox, tiles from the pyramid), medians of `--repeat` runs:

1. filter change: a new view state (SQL filter over 1M rows, match mask, per-label colours) and then every
   overlay tile of a 1280 x 860 view rendered, as the page does after a new filter; at full resolution and
   zoomed out to the whole slide; the tiles one after the other and on 6 threads (a browser's connections);
2. colour change: a new colouring by a column (query.pathviewer.coloring over 1M objects) and its state;
3. single tiles: an image tile (2 channels composed) and an overlay tile, at full resolution and zoomed out;
   overlay tiles with the labels read (cold) and from the label-tile cache (warm: what a filter change
   needs).

`--browser` also times the filter change in the page, in headless Chromium (Playwright; $CELLAR_CHROMIUM, else
/usr/bin/chromium, as the tests):
from pressing Enter in the filter box to the new overlay fully drawn (measured by the page), at the page's
first view (the whole slide), and zoomed in to full resolution.

Run: `python benchmarks/bench_viewer.py` (generation and measurement take a few minutes the first time), or
`--size 4096` for a quick run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


CELL = 16
CHUNK = 512
BLOCK = 4096  # rows and columns generated at once
VIEW = (1280, 860)  # the page's viewer area (screen pixels)
FEATURES = "area,area_um,bbox_min,bbox_max,centroid,centroid_um,intensity_mean,intensity_max,eccentricity,solidity"


def _cells(n: int, seed: int) -> dict[str, np.ndarray]:
    """Per-cell object parameters (n x n cells), from one seed."""
    rng = np.random.default_rng(seed)
    count = n * n
    return {
        "a": rng.uniform(3.0, 7.4, count).astype(np.float32),
        "b": rng.uniform(2.5, 6.0, count).astype(np.float32),
        "theta": rng.uniform(0, np.pi, count).astype(np.float32),
        "dy": rng.uniform(-0.5, 0.5, count).astype(np.float32),
        "dx": rng.uniform(-0.5, 0.5, count).astype(np.float32),
        "bright": np.stack([rng.lognormal(7.0, 0.5, count), rng.lognormal(6.0, 0.8, count)]).astype(np.float32),
        "ids": (rng.permutation(count) + 1).astype(np.uint32),
    }


def _block(p: dict, n: int, y0: int, x0: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (uint32) and 2 channels (uint16) of the block [y0, y0+size) x [x0, x0+size)."""
    yy = np.arange(y0, y0 + size, dtype=np.int64)[:, None]
    xx = np.arange(x0, x0 + size, dtype=np.int64)[None, :]
    cell = (yy // CELL) * n + xx // CELL
    ly = (yy % CELL - (CELL - 1) / 2).astype(np.float32) - p["dy"][cell]
    lx = (xx % CELL - (CELL - 1) / 2).astype(np.float32) - p["dx"][cell]
    c, s = np.cos(p["theta"][cell]), np.sin(p["theta"][cell])
    u, v = (lx * c + ly * s) / p["a"][cell], (-lx * s + ly * c) / p["b"][cell]
    inside = u * u + v * v <= 1.0
    labels = np.where(inside, p["ids"][cell], 0).astype(np.uint32)
    rng = np.random.default_rng([seed, y0, x0])
    channels = np.empty((2, size, size), np.uint16)
    for k in range(2):
        signal = np.where(inside, p["bright"][k][cell], 0.0).astype(np.float32)
        channels[k] = np.clip(150 + signal + rng.integers(0, 80, (size, size), dtype=np.int16), 0, 65535)
    return labels, channels


def generate(path: Path, size: int, seed: int = 0) -> Path:
    """The slide as OME-Zarr 0.5, written block by block into every pyramid level."""
    import zarr

    from cellar.ngff.write import _multiscales, _set_ome

    n = size // CELL
    levels = max(1, int(np.log2(size // CHUNK)) + 1)  # down to CHUNK px
    p = _cells(n, seed)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    _set_ome(root, "0.5", {"multiscales": _multiscales("cyx", {"y": 0.25, "x": 0.25}, {}, levels, "micrometer",
                                                       "slide", "0.5"),
                           "omero": {"channels": [{"label": "DAPI", "color": "0080FF", "active": True},
                                                  {"label": "CD8", "color": "FFB000", "active": True}]}})
    lab = root.create_group("labels")
    _set_ome(lab, "0.5", {"labels": ["cells"]})
    cells = lab.create_group("cells")
    _set_ome(cells, "0.5", {"multiscales": _multiscales("yx", {"y": 0.25, "x": 0.25}, {}, levels, "micrometer",
                                                        "cells", "0.5"),
                            "image-label": {"colors": [], "source": {"image": "../../"}}})
    images, labelled = [], []
    for k in range(levels):
        side = size >> k
        images.append(root.create_array(str(k), shape=(2, side, side), chunks=(1, CHUNK, CHUNK), dtype="uint16"))
        labelled.append(cells.create_array(str(k), shape=(side, side), chunks=(CHUNK, CHUNK), dtype="uint32"))
    block = min(BLOCK, size)
    for y0 in range(0, size, block):
        for x0 in range(0, size, block):
            labels, channels = _block(p, n, y0, x0, block, seed)
            for k in range(levels):
                f, m = 1 << k, block >> k
                ys, xs = slice(y0 // f, (y0 + block) // f), slice(x0 // f, (x0 + block) // f)
                # labels: the value at the centre of each f x f block (a stride from 0 would hit the same
                # corner of every 16-px cell, background, at f = 16); image: the block's mean
                labelled[k][ys, xs] = labels[f // 2::f, f // 2::f]
                images[k][:, ys, xs] = channels.reshape(2, m, f, m, f).mean(axis=(2, 4)).astype(np.uint16)
    return path


def timed(fn, repeat: int) -> float:
    """Median wall time of `fn()` in ms."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def view_tiles(grid, factor: float, centre: tuple[float, float]) -> tuple[int, list[tuple[int, int]]]:
    """The level and tiles of `grid` that a VIEW-sized view at `factor` image pixels per screen pixel shows."""
    level = grid.max_level - int(round(np.log2(factor * grid.supersample)))
    level = max(grid.min_level, min(grid.max_level, level))
    f = grid.factor(level)
    nx, ny = grid.tiles(level)
    x0, x1 = (centre[0] - VIEW[0] / 2 * factor) / f, (centre[0] + VIEW[0] / 2 * factor) / f
    y0, y1 = (centre[1] - VIEW[1] / 2 * factor) / f, (centre[1] + VIEW[1] / 2 * factor) / f
    xs = range(max(0, int(x0 // grid.tile)), min(nx, int(x1 // grid.tile) + 1))
    ys = range(max(0, int(y0 // grid.tile)), min(ny, int(y1 // grid.tile) + 1))
    return level, [(x, y) for y in ys for x in xs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16384, help="slide side in pixels (16384: 1,048,576 objects)")
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "results" / "viewer")
    parser.add_argument("--features", default=FEATURES)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--browser", action="store_true", help="also time the filter change in headless Chromium")
    args = parser.parse_args()
    if args.size % CHUNK or args.size < CHUNK:
        parser.error(f"--size must be a multiple of {CHUNK}")

    from cellar import measure
    from cellar import query
    from cellar.schemas import log
    from cellar.viewer.session import Session

    data = args.data / f"s{args.size}"
    image, store = data / "slide.ome.zarr", data / "slide.cellar"
    if not log.is_store(store):
        data.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        generate(image, args.size)
        print(f"generated {image} in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        measure.measure(str(image), "cells", store, features=args.features, overwrite=True, progress=False)
        print(f"measured {store} in {time.perf_counter() - t:.1f} s", flush=True)

    t = time.perf_counter()
    session = Session(None, store)
    opened = time.perf_counter() - t
    n = session.table.num_rows
    df = query.open(store, cache=True)
    q = {k: float(df.sql(f"SELECT quantile_cont({c}, {p}) FROM objects").fetchall()[0][0])
         for k, c, p in (("a50", "area", 0.5), ("a90", "area", 0.9), ("i50", "intensity_mean__DAPI", 0.5),
                         ("i99", "intensity_mean__CD8", 0.99), ("e30", "eccentricity", 0.3))}
    filters = [f"area > {q['a50']:.6g}", f"intensity_mean__DAPI > {q['i50']:.6g} AND eccentricity < {q['e30']:.6g}",
               f"intensity_mean__CD8 > {q['i99']:.6g}", f"area BETWEEN {q['a50']:.6g} AND {q['a90']:.6g}",
               f"area > {q['a90']:.6g} OR intensity_mean__CD8 > {q['i99']:.6g}"]
    counts = {w: session.state(where=w).count for w in filters}
    print(f"{n:,} objects, {session.width} x {session.height} px, {len(session.image.multiscale.levels)} levels; "
          f"session opened in {opened:.1f} s", flush=True)

    centre = (session.width / 2, session.height / 2)
    whole = max(session.width / VIEW[0], session.height / VIEW[1])
    views = {"full resolution": 1.0, "whole slide": 2 ** np.ceil(np.log2(whole))}
    pool = ThreadPoolExecutor(6)
    rows = []
    salt = [0]

    def fresh(where: str) -> str:
        salt[0] += 1  # a condition the state cache has not seen: the work of a new filter
        return f"{where} AND {salt[0]} > 0"

    for name, factor in views.items():
        level, wanted = view_tiles(session.overlay_grid, factor, centre)
        for x, y in wanted:  # the view's labels read once, as after the page's first view
            session.label_tiles.get(level, x, y)
        it = iter(filters * args.repeat * 3)

        def state_only():
            session.state(where=fresh(next(it)))

        def serial():
            s = session.state(where=fresh(next(it)))
            for x, y in wanted:
                session.overlay_tile(s.token, "outline", level, x, y)

        def threaded():
            s = session.state(where=fresh(next(it)))
            list(pool.map(lambda xy: session.overlay_tile(s.token, "outline", level, *xy), wanted))

        rows.append((f"filter change: new state ({name} view)", timed(state_only, args.repeat), ""))
        rows.append((f"filter change: state + {len(wanted)} overlay tiles, serial ({name})", timed(serial, args.repeat), ""))
        rows.append((f"filter change: state + {len(wanted)} overlay tiles, 6 threads ({name})",
                     timed(threaded, args.repeat), ""))

    bys = iter([("intensity_mean__DAPI", "viridis"), ("area", "magma"), ("eccentricity", "plasma"),
                ("intensity_mean__CD8", "inferno"), ("solidity", "cividis"), ("intensity_max__DAPI", "turbo"),
                ("area_um2", "coolwarm")] * 3)

    def colour():
        by, cmap = next(bys)
        session._colorings.clear()
        session.state(by=by, cmap=cmap, where=filters[0])

    rows.append(("colour change: colouring by a column + state", timed(colour, min(args.repeat, 7)), ""))

    rng = np.random.default_rng(1)
    state = session.state(where=filters[0], by="intensity_mean__DAPI")
    channels = session.parse_channels(None)
    for name, factor in views.items():
        ilevel, itiles = view_tiles(session.image_grid, factor, centre)
        olevel, otiles = view_tiles(session.overlay_grid, factor, centre)
        picks = [itiles[i] for i in rng.integers(0, len(itiles), args.repeat)]
        it = iter(picks)
        rows.append((f"image tile, 2 channels ({name}, level {ilevel})",
                     timed(lambda: session.image_tile(ilevel, *next(it), channels), args.repeat), ""))
        # cold: every repeat a tile whose labels are not cached
        nx, ny = session.overlay_grid.tiles(olevel)
        cold = iter([(int(x), int(y)) for x, y in zip(rng.integers(0, nx, 3 * args.repeat), rng.integers(0, ny, 3 * args.repeat))])

        def overlay_cold():
            x, y = next(cold)
            session.label_tiles._cache.pop((olevel, x, y, 0.0), None)
            session.overlay_tile(state.token, "outline", olevel, x, y)

        rows.append((f"overlay tile, labels read ({name}, level {olevel})", timed(overlay_cold, args.repeat), ""))
        warm = iter([otiles[i] for i in rng.integers(0, len(otiles), args.repeat)])
        rows.append((f"overlay tile, labels cached ({name})",
                     timed(lambda: session.overlay_tile(state.token, "outline", olevel, *next(warm)), args.repeat), ""))

    if args.browser:
        rows.extend(browser_times(session, filters, args.repeat))

    print(f"\n{platform.machine()}, {platform.python_version()}, {n:,} objects; medians of {args.repeat} runs; "
          f"filters match {', '.join(f'{c / n:.0%}' for c in counts.values())}\n")
    print("| step | time (ms) | target |")
    print("|---|---|---|")
    for label, ms, _ in rows:
        target = "< 300" if label.startswith(("filter change", "page:")) else "< 100" if "tile" in label else ""
        print(f"| {label} | {ms:,.1f} | {target} |")


def browser_times(session, filters: list[str], repeat: int) -> list[tuple[str, float, str]]:
    """Filter change to redrawn overlay in the page (headless Chromium), at the first view and zoomed in."""
    from playwright.sync_api import sync_playwright

    from cellar.viewer.server import running

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    out = []
    with running(session) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("CELLAR_CHROMIUM", "/usr/bin/chromium"), args=args)
        page = browser.new_page(viewport={"width": 1280 + 410, "height": 860 + 250})
        page.goto(url)
        page.wait_for_selector("body[data-overlay=loaded][data-image=loaded]", timeout=60_000)
        for name in ("whole slide", "full resolution"):
            if name == "full resolution":
                page.evaluate("() => { const v = window.cellar.viewer.viewport; "
                              "v.zoomTo(window.cellar.width / v.getContainerSize().x, null, true); }")
                page.wait_for_timeout(500)
                page.wait_for_selector("body[data-overlay=loaded][data-image=loaded]", timeout=60_000)
                page.wait_for_timeout(1000)
            times = []
            for k in range(repeat):
                where = f"{filters[k % len(filters)]} AND {1000 + k} > 0 AND {len(name)} > 0"
                page.fill("#where", where)
                page.press("#where", "Enter")
                token = session.token(where, None, "viridis", None, "hide")
                page.wait_for_selector(f"body[data-overlay=loaded][data-token='{token}']", timeout=60_000)
                # measured by the page itself, from the Enter key to the new overlay's last tile drawn
                # (Playwright's polling of the selector adds up to 0.5 s of its own)
                times.append(float(page.get_attribute("body", "data-redraw-ms")))
                page.wait_for_timeout(300)  # the table and histogram follow the overlay: let them finish
            out.append((f"page: Enter to new overlay drawn ({name})", statistics.median(times), ""))
        browser.close()
    return out


if __name__ == "__main__":
    main()
