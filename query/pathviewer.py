"""PathViewer-style outputs from a store: the label ids matching a filter, label images holding only those
objects, per-label colours (and properties) written into the NGFF label metadata, rendered overlays and
histograms.

Colouring: a numeric column maps linearly onto a matplotlib colormap over `vrange` (default: the
matching objects' min and max), NaN values grey; any other column gets categorical colours (`tab10`, or
`tab20` beyond ten categories, repeating beyond twenty). Objects that do not match the filter are hidden
(alpha 0) or grey.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..schemas import lazy
from ..schemas import store as layout
from ..schemas.errors import QueryError, UsageError
from .sql import literal, quote

np = lazy.module("numpy")  # `cellar filter` runs without it (`Query.label_id_series`)

if TYPE_CHECKING:
    from .. import ngff
    from .api import Objects, Query

GREY = (128, 128, 128, 255)
HIDDEN = (0, 0, 0, 0)
MAX_RENDER_PIXELS = 2048  # longest side of an automatically chosen render level


@dataclass(frozen=True)
class Coloring:
    """Per-label colours of one table: `ids` (sorted uint64), `rgba` (n, 4) uint8, and the legend."""

    ids: np.ndarray
    rgba: np.ndarray
    matched: np.ndarray  # bool per id
    column: str
    unit: str
    cmap: str
    vrange: tuple[float, float] | None  # numeric columns
    categories: dict[str, tuple[int, int, int, int]] | None  # categorical columns

    def lookup(self, labels: np.ndarray) -> np.ndarray:
        """RGBA (..., 4) uint8 of a label array (0 and unknown values transparent)."""
        flat = labels.ravel().astype(np.uint64, copy=False)
        out = np.zeros((flat.size, 4), np.uint8)
        if self.ids.size:
            pos = np.minimum(np.searchsorted(self.ids, flat), self.ids.size - 1)
            hit = self.ids[pos] == flat
            out[hit] = self.rgba[pos[hit]]
        return out.reshape(*labels.shape, 4)


def table_query(objs: Objects, image: str | None, label_image: str | None) -> tuple[Query, dict]:
    """A query restricted to one (image, label image) table, and that table's manifest entry."""
    store, entry = objs.table(image, label_image)
    image, label_image = (layout.partition_value(entry[k]) for k in ("image", "label_image"))  # as queries see them
    q = objs.where(f"image = {literal(image)} AND label_image = {literal(label_image)}")
    return q, entry


def _is_numeric(duck_type: str) -> bool:
    t = duck_type.upper()
    return any(t.startswith(p) for p in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                                          "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL", "REAL"))


def coloring(q: Query, by: str, *, where: str | None = None, cmap: str = "viridis",
             vrange: tuple[float, float] | None = None, others: str = "hide") -> Coloring:
    """Colours of every object of the (single-table) query `q` by column `by`; objects not matching `where`
    are hidden (`others="hide"`) or grey (`others="grey"`)."""
    import matplotlib

    q.objects.check_columns([by], "--by")
    if others not in ("hide", "grey"):
        raise UsageError(f"others={others!r}; expected 'hide' or 'grey'")
    if where:
        q.where(where)  # checks the condition (names, types) before any work
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise UsageError(f"--cmap {cmap}: unknown colormap (for example viridis, magma, coolwarm, tab10)") from None
    matched_sql = f"coalesce(({where}), false)" if where else "true"
    data = q.objects.fetch(f"SELECT label_id, {quote(by)} AS v, {matched_sql} AS m FROM ({q.to_sql()}) "
                           "ORDER BY label_id", "fetchnumpy")
    ids = np.asarray(data["label_id"], np.uint64)
    matched = np.asarray(data["m"], bool)
    values = data["v"]
    rgba = np.zeros((len(ids), 4), np.uint8)
    info = q.objects.column_info(by)
    categories = None
    if _is_numeric(q.objects.schema[by]):
        v = np.asarray(values, np.float64) if not np.ma.isMaskedArray(values) else values.filled(np.nan).astype(np.float64)
        if vrange is None:
            finite = v[matched & np.isfinite(v)]
            vrange = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        lo, hi = vrange
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise UsageError(f"--range {lo:g} {hi:g}: expected two finite numbers, low first")
        t = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.full(len(v), 0.5)
        rgba[:] = np.round(colormap(np.nan_to_num(t)) * 255).astype(np.uint8)
        rgba[~np.isfinite(v)] = GREY
    else:
        codes, names_of = _categories(values)
        present = np.unique(codes[matched] if matched.any() else codes)
        names = sorted({names_of[c] for c in present.tolist()})
        palette = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
        categories = {name: tuple(int(round(c * 255)) for c in palette(i % palette.N)) for i, name in enumerate(names)}
        by_code = np.array([categories.get(name, HIDDEN) for name in names_of], np.uint8).reshape(-1, 4)
        rgba[:] = by_code[codes]  # one gather for a million objects, not a comparison per category
        cmap, vrange = palette.name, None
    rgba[~matched] = HIDDEN if others == "hide" else GREY
    return Coloring(ids, rgba, matched, by, info["unit"], cmap, vrange, categories)


def _categories(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(code per value, name per code) of a non-numeric column's values (text, booleans), hashed once:
    NULL is a category of its own, named "NULL"."""
    import pandas as pd

    codes, uniques = pd.factorize(np.ma.getdata(values), use_na_sentinel=True)
    names = [str(u) for u in uniques.tolist()] + ["NULL"]
    nulls = codes < 0
    if np.ma.isMaskedArray(values):
        nulls |= np.ma.getmaskarray(values)
    return np.where(nulls, len(names) - 1, codes), names


def source_image(entry: dict, image_url: str | None = None) -> ngff.NgffImage:
    """The NGFF image a table was measured from (or `image_url`, checked to hold the label image)."""
    url = image_url or (entry.get("source") or {}).get("url")
    if url is None:  # a table written without provenance (store_write.write_table alone)
        raise UsageError(f"{entry['image']}/{entry['label_image']}: the store does not record the image it was "
                         "measured from; give the image's path or URL")
    from .. import ngff  # here, as in the other functions that touch an image: cellar.ngff loads zarr and the
    # NGFF models (450 ms), which filters and `cellar filter` writing label ids do without

    image = ngff.open_image(url)
    image.label(entry["label_image"])  # a clear error if it is not there
    return image


def write_colors(coloring: Coloring, image: ngff.NgffImage, label: str,
                 properties: dict[str, np.ndarray] | None = None) -> Path:
    """Write the colours (and optional per-label properties) into the label image's `image-label`."""
    colors = [{"label-value": int(i), "rgba": [int(c) for c in rgba]} for i, rgba in zip(coloring.ids, coloring.rgba)]
    props = None
    if properties:
        props = []
        cols = {k: v.tolist() for k, v in properties.items()}
        for j, i in enumerate(coloring.ids.tolist()):
            row = {"label-value": int(i)}
            for k, v in cols.items():
                x = v[j]
                row[k] = None if isinstance(x, float) and not math.isfinite(x) else x
            props.append(row)
    from ..ngff import labels as ngff_labels

    return ngff_labels.set_image_label(image, label, colors=colors, properties=props)


def pick_level(image: ngff.NgffImage, region: tuple[slice, slice] | None, level: int | None) -> int:
    """The requested level, or the sharpest level whose (region's) longest side is at most MAX_RENDER_PIXELS."""
    ms = image.multiscale
    if level is not None:
        if not 0 <= level < len(ms.levels):
            raise UsageError(f"--level {level}: the image has levels 0..{len(ms.levels) - 1}")
        return level
    base = ms.spatial_shape(0)[-2:]
    span = [(s.stop - s.start) if region else n for s, n in zip(region or (slice(0, 0),) * 2, base)]
    for k in range(len(ms.levels)):
        shape = ms.spatial_shape(k)[-2:]
        if max(math.ceil(sp * sh / b) for sp, sh, b in zip(span, shape, base)) <= MAX_RENDER_PIXELS:
            return k
    return len(ms.levels) - 1


def parse_region(text: str | None, shape: tuple[int, int]) -> tuple[slice, slice] | None:
    """'y0:y1,x0:x1' in level-0 pixels (either bound may be empty) -> slices, checked against `shape`."""
    if not text:
        return None
    try:
        parts = [p.split(":") for p in text.split(",")]
        if len(parts) != 2 or any(len(p) != 2 for p in parts):
            raise ValueError
        out = []
        for (a, b), n in zip(parts, shape):
            lo = int(a) if a.strip() else 0
            hi = int(b) if b.strip() else n
            if not 0 <= lo < hi <= n:
                raise UsageError(f"--region {text}: {lo}:{hi} is outside 0:{n} or empty")
            out.append(slice(lo, hi))
        return out[0], out[1]
    except ValueError:
        raise UsageError(f"--region {text}: expected y0:y1,x0:x1 in full-resolution pixels") from None


def render(image: ngff.NgffImage, label: str, coloring: Coloring, out: Path, *, level: int | None = None,
           region: str | None = None, channel: str | None = None, style: str = "outline", z: int | None = None,
           caption: str = "") -> dict:
    """Draw the image (one channel, contrast-stretched to its 1st-99th percentiles) at a pyramid level with
    the objects' outlines or fills coloured by `coloring`, a colour bar or legend, and `caption`; write a PNG.

    Returns the level drawn, the image's shape there, the number of objects in view, and what the figure shows
    (see `_draw_overlay`)."""
    from skimage.segmentation import find_boundaries

    if style not in ("outline", "fill"):
        raise UsageError(f"--style {style}: expected outline or fill")
    lab = image.label(label)
    ms, lms = image.multiscale, lab.multiscale
    base = ms.spatial_shape(0)
    box0 = parse_region(region, base[-2:])
    k = pick_level(image, box0, level)
    if k >= len(lms.levels):
        raise UsageError(f"--level {k}: labels/{label} has levels 0..{len(lms.levels) - 1}")
    shape = ms.spatial_shape(k)
    factors = [b / s for b, s in zip(base[-2:], shape[-2:])]
    box = tuple(slice(int(s.start // f), max(int(s.start // f) + 1, int(math.ceil(s.stop / f))))
                for s, f in zip(box0, factors)) if box0 else (slice(0, shape[-2]), slice(0, shape[-1]))
    if len(shape) == 3:
        zi = shape[0] // 2 if z is None else z
        if not 0 <= zi < shape[0]:
            raise UsageError(f"--z {z}: the level has planes 0..{shape[0] - 1}")
        spatial = (zi, *box)
    else:
        spatial = box
    c_index = 0
    if channel is not None:
        names = list(image.channel_names)
        if channel in names:
            c_index = names.index(channel)
        elif channel.isdigit() and int(channel) < len(names):
            c_index = int(channel)
        else:
            raise UsageError(f"--channel {channel}: the image has channels {', '.join(names)}")

    def read(group_ms, path: str, c: int | None) -> np.ndarray:
        it = iter(spatial)
        sel = tuple(0 if a.role == "time" else (c or 0) if a.role == "channel" else next(it) for a in group_ms.axes)
        from .. import ngff

        return np.asarray(ngff.open_level(image.url, path)[sel])

    grey = read(ms, ms.levels[k].path, c_index).astype(np.float64)
    labels = read(lms, lms.levels[k].path, None)
    finite = grey[np.isfinite(grey)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    g = np.clip((grey - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    colours = coloring.lookup(labels)
    paint = find_boundaries(labels, mode="inner") & (labels > 0) if style == "outline" else labels > 0
    alpha = (colours[..., 3:4] / 255.0) * paint[..., None] * (1.0 if style == "outline" else 0.6)
    rgb = rgb * (1 - alpha) + colours[..., :3] / 255.0 * alpha

    h, w = rgb.shape[:2]
    f0 = factors
    extent = (box[1].start * f0[1], box[1].stop * f0[1], box[0].stop * f0[0], box[0].start * f0[0])
    drawn = _draw_overlay(rgb, extent, coloring, caption, out)
    shown = np.unique(labels[labels > 0])
    return {"level": k, "shape": (h, w), "objects_in_view": int(shown.size), **drawn}


def _draw_overlay(rgb: np.ndarray, extent: tuple, coloring: Coloring, caption: str, out: Path) -> dict:
    """Write the PNG of `rgb` (h, w, 3) over `extent` (full-resolution pixels) with the colour bar or legend of
    `coloring` and `caption`. Returns what the figure shows: the caption, the colour bar's range and label or
    the legend's entries, and where the image lies in the PNG (`image_px`: left, top, right, bottom pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = rgb.shape[:2]
    fig_w = 8.0
    fig, ax = plt.subplots(figsize=(fig_w, fig_w * h / w * 0.9 + 1.0), dpi=max(100, int(w / fig_w * 1.0)))
    shown = ax.imshow(rgb, extent=extent, interpolation="nearest")
    ax.set_xlabel("x (full-resolution pixels)")
    ax.set_ylabel("y (full-resolution pixels)")
    unit = f" ({coloring.unit})" if coloring.unit and coloring.unit not in ("", "dimensionless") else ""
    bar = legend = None
    if coloring.vrange is not None:
        norm = matplotlib.colors.Normalize(*coloring.vrange)
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=coloring.cmap), ax=ax, fraction=0.04,
                           pad=0.02, label=f"{coloring.column}{unit}")
    elif coloring.categories:
        handles = [matplotlib.patches.Patch(color=np.array(c) / 255, label=name)
                   for name, c in list(coloring.categories.items())[:20]]
        legend = ax.legend(handles=handles, title=coloring.column, loc="upper left", bbox_to_anchor=(1.01, 1),
                           fontsize=8)
    ax.set_title(caption, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(out, format="png")  # the caller passes a temporary name and renames it into place
    box = shown.get_window_extent()  # display pixels of the last draw (the PNG's), origin at the bottom
    facts = {
        "caption": ax.get_title(),
        "colorbar": tuple(float(v) for v in bar.ax.get_ylim()) if bar else None,
        "colorbar_label": bar.ax.get_ylabel() if bar else None,
        "legend": [t.get_text() for t in legend.get_texts()] if legend else None,
        "image_px": (box.x0, fig.bbox.height - box.y1, box.x1, fig.bbox.height - box.y0),
    }
    plt.close(fig)
    return facts


def histogram(objs: Objects, column: str, out: Path, *, where: str | None = None, bins: int = 50,
              log: bool = False, caption: str = "") -> dict:
    """Histogram of a numeric column over all objects (grey) with the matching subset on top (colour).

    Returns the numbers of values and of matching ones, and what the figure shows: the bin `edges`, the
    counts drawn (`counts_all`, `counts_matched`), the caption, the x label and the legend's entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objs.check_columns([column], "hist")
    if not _is_numeric(objs.schema[column]):
        raise UsageError(f"hist: column {column!r} is {objs.schema[column]}, not numeric")
    if bins < 1:
        raise UsageError(f"--bins {bins}: expected at least 1")
    base = objs.query()
    if where:
        base.where(where)
    col = quote(column)
    matched = f"coalesce(({where}), false)" if where else "true"
    data = objs.fetch(f"SELECT {col}::DOUBLE AS v, {matched} AS m FROM objects WHERE {col} IS NOT NULL", "fetchnumpy")
    v = np.asarray(data["v"], np.float64)
    m = np.asarray(data["m"], bool)
    ok = np.isfinite(v)
    v, m = v[ok], m[ok]
    if not v.size:
        raise QueryError(f"hist: column {column!r} has no finite values")
    edges = np.histogram_bin_edges(v, bins=bins)
    info = objs.column_info(column)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    counts_all = ax.hist(v, bins=edges, color="0.75", label=f"all ({v.size:,})")[0]
    counts_matched = None
    if where:
        counts_matched = ax.hist(v[m], bins=edges, color="tab:blue", label=f"{where} ({int(m.sum()):,})")[0]
    unit = f" ({info['unit']})" if info["unit"] and info["unit"] != "dimensionless" else ""
    ax.set_xlabel(f"{column}{unit}")
    ax.set_ylabel("objects")
    if log:
        ax.set_yscale("log")
    legend = ax.legend(fontsize=8)
    ax.set_title(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, format="png")
    facts = {"values": int(v.size), "matched": int(m.sum()), "bins": len(edges) - 1, "edges": edges,
             "counts_all": counts_all.astype(np.int64),
             "counts_matched": None if counts_matched is None else counts_matched.astype(np.int64),
             "caption": ax.get_title(), "xlabel": ax.get_xlabel(), "legend": [t.get_text() for t in legend.get_texts()]}
    plt.close(fig)
    return facts
