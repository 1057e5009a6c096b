"""What one `cellar view` serves: a table of a store with its image, and the view states made from them.

A `Session` opens the store with the session cache (`query.open(store, cache=True)`), picks one (image,
label image) table (`query.pathviewer.table_query`), opens the source image and its label image
(`query.pathviewer.source_image`) and holds:

- the table's rows as Arrow memory, in a `viewer.sql.Sandbox` for the filter box's SQL, and the order of
  their label ids (to map rows onto the sorted ids a colouring uses);
- the tile pyramids of the image and of the overlay (`viewer.tiles`);
- view states: a filter, a colouring (`query.pathviewer.coloring` by a column, colormap and range) and
  what to do with the objects that do not match (hide them or grey them), made into a per-label `Palette`
  and named by a token that the overlay tiles' URLs carry, so the browser fetches new overlay tiles, and
  only those, when the state changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import ngff
from .. import query
from ..query import pathviewer
from ..schemas import store as layout
from ..schemas.errors import QueryError, UsageError
from . import tiles
from .sql import Sandbox

COLORMAPS = ("viridis", "magma", "plasma", "inferno", "cividis", "turbo", "coolwarm", "RdBu_r", "Spectral_r",
             "gray")
PLAIN = (255, 212, 0, 255)  # the objects' colour when they are not coloured by a column
PALETTE = ("ff0000", "00ff00", "0080ff", "ffff00", "ff00ff", "00ffff", "ffffff")  # channels without a colour
# View states: the definition of each (filter, colouring) is kept for the server's life (the last MAX_STATES of
# them, a few hundred bytes each), and its arrays (the match mask and the per-label colours) for the most recent
# states within STATE_BYTES; a state whose arrays were let go is made again from its definition when a request
# names it, so a token the server gave out stays valid.
MAX_STATES = 10_000
STATE_BYTES = 512 << 20


class UnknownState(LookupError):
    """A state token this server did not make, or has forgotten (HTTP 404)."""


@dataclass(frozen=True)
class ViewState:
    """A filter and a colouring, made into per-label colours."""

    token: str
    where: str | None
    by: str | None
    cmap: str
    vrange: tuple[float, float] | None
    others: str
    matched: np.ndarray  # bool per row of the table (table order)
    palette: tiles.Palette
    legend: dict

    @property
    def count(self) -> int:
        return int(self.matched.sum())

    @property
    def nbytes(self) -> int:
        return self.matched.nbytes + self.palette.nbytes

    @property
    def definition(self) -> tuple:
        """The arguments of `Session.state` that make this state again."""
        return self.where, self.by, self.cmap, self.vrange, self.others


class Session:
    """One table of a store and its image, served by `viewer.server` (see the module docstring)."""

    def __init__(self, image: str | None, store: str | Path, *, labels: str | None = None,
                 image_name: str | None = None, timeout_s: float = 5.0, max_rows: int = 500):
        self.objs = query.open(store, cache=True)
        self.query, self.entry = pathviewer.table_query(self.objs, image_name, labels)
        self.image = pathviewer.source_image(self.entry, image)
        self.label = self.image.label(self.entry["label_image"])
        self.table = self._table()
        ids = self.table.column("label_id").to_numpy()
        self.order = np.argsort(ids, kind="stable")  # table rows in label id order
        self.ids = np.asarray(ids[self.order], np.uint64)
        self.sandbox = Sandbox(self.table, timeout_s=timeout_s, max_rows=max_rows, explain=self.objs.explain)
        self._salt = uuid.uuid4().hex  # tokens of an earlier server are unknown to this one
        self._geometry()
        self.columns = self._columns()
        self.column_names = [c["name"] for c in self.columns]
        self.channels = self._channels()
        self._states: OrderedDict[str, ViewState] = OrderedDict()  # made states, the most recent last
        self._state_bytes = 0
        self._definitions: OrderedDict[str, tuple] = OrderedDict()  # token -> `ViewState.definition`
        self._colorings: OrderedDict[tuple, pathviewer.Coloring] = OrderedDict()
        self._matches: OrderedDict[str | None, np.ndarray] = OrderedDict()
        self._values: OrderedDict[str, np.ndarray] = OrderedDict()
        self._plain: np.ndarray | None = None
        self._lock = threading.Lock()

    # -- setup -----------------------------------------------------------------------------------------
    def _table(self) -> pa.Table:
        table = self.objs.cached
        if self.objs.n_tables > 1:  # the session cache holds every table of the store
            keep = pc.and_(pc.equal(table.column("image"), layout.partition_value(self.entry["image"])),
                           pc.equal(table.column("label_image"), layout.partition_value(self.entry["label_image"])))
            table = table.filter(keep)
        if table.num_rows == 0:
            raise QueryError(f"{self.entry['image']}/{self.entry['label_image']}: the table has no objects to show")
        return table

    def _geometry(self) -> None:
        ims, lms = self.image.multiscale, self.label.multiscale
        base = ims.spatial_shape(0)
        if len(base) != len(lms.spatial_shape(0)):
            raise UsageError(f"{self.image.url}: the image is {len(base)}-D and labels/{self.label.name} "
                             f"{len(lms.spatial_shape(0))}-D")
        self.ndim = len(base)
        self.height, self.width = base[-2:]
        self.planes = base[0] if self.ndim == 3 else 1
        timepoint = self.entry.get("timepoint")
        if timepoint is None:
            timepoint = (self.entry.get("settings") or {}).get("timepoint") or 0
        self.timepoint = int(timepoint)
        label_base = lms.spatial_shape(0)
        self.image_source = tiles.Source(self.image.url, ims, (1.0,) * self.ndim, self.timepoint)
        self.label_source = tiles.Source(self.image.url, lms, tuple(b / a for a, b in zip(base, label_base)),
                                         self.timepoint)
        # measured pixels (the table's level of the label image) -> image level-0 pixels
        level = int(self.entry.get("level") or 0)
        measured = lms.spatial_shape(min(level, len(lms.levels) - 1))
        self.to_image = tuple(a / m for a, m in zip(base, measured))
        coarsest = float(min(self.image_source.downsample[-1][-2:]))
        grid = tiles.Grid(self.width, self.height)
        self.image_grid = tiles.Grid(self.width, self.height, min_level=tiles.shallow_min_level(grid, coarsest))
        overlay = tiles.Grid(self.width, self.height, tiles.OVERLAY_SUPERSAMPLE, tile=tiles.OVERLAY_TILE)
        label_coarsest = float(min(self.label_source.downsample[-1][-2:]))
        self.overlay_grid = tiles.Grid(self.width, self.height, tiles.OVERLAY_SUPERSAMPLE, tile=tiles.OVERLAY_TILE,
                                       min_level=tiles.shallow_min_level(overlay, label_coarsest))
        self.label_tiles = tiles.LabelTiles(self.label_source, self.overlay_grid)

    def _columns(self) -> list[dict]:
        out = []
        for field in self.table.schema:
            info = self.objs.column_info(field.name)
            numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or pa.types.is_decimal(field.type)
            out.append({"name": field.name, "dtype": info["dtype"] or str(field.type), "unit": info["unit"],
                        "description": info["description"], "numeric": bool(numeric)})
        return out

    def _channels(self) -> list[dict]:
        """Name, colour, contrast window and value range of each channel (omero metadata where it has them)."""
        ms = self.image.multiscale
        meta = _omero_channels(self.image)
        k = len(ms.levels) - 1  # statistics from the coarsest level, at most ~1M pixels of it
        shape = ms.spatial_shape(k)
        step = max(1, math.ceil(math.sqrt(shape[-1] * shape[-2] / 1e6)))
        dtype = np.dtype(ms.levels[0].dtype)
        names = self.image.channel_names
        colours = [str(m.get("color", "")).lower().lstrip("#") if isinstance(m, dict) else "" for m in meta]
        if len(names) > 1 and all(c in ("", "ffffff") for c in colours):  # no colours given: tell them apart
            colours = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
        out = []
        for i, name in enumerate(names):
            ys = (np.arange(0, shape[-2], step) + 0.5) * self.image_source.downsample[k][-2]
            xs = (np.arange(0, shape[-1], step) + 0.5) * self.image_source.downsample[k][-1]
            plane = self.image_source.sample(ys, xs, float(self.image_source.downsample[k][-1]), channel=i,
                                             z=self.planes // 2).astype(np.float64)
            finite = plane[np.isfinite(plane)]
            lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
            vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if dtype.kind in "ui":
                vmin, vmax = float(min(vmin, 0)), float(max(vmax, hi))
            window = (meta[i].get("window") if i < len(meta) and isinstance(meta[i], dict) else None) or {}
            if isinstance(window.get("start"), (int, float)) and isinstance(window.get("end"), (int, float)) \
                    and window["end"] > window["start"]:
                lo, hi = float(window["start"]), float(window["end"])
            colour = colours[i] if i < len(colours) and _is_hex(colours[i]) else ("ffffff" if len(names) == 1 else PALETTE[i % len(PALETTE)])
            out.append({"index": i, "name": name, "color": colour, "lo": float(lo), "hi": float(hi if hi > lo else lo + 1),
                        "min": min(vmin, float(lo)), "max": max(vmax, float(hi)), "active": i < 3})
        return out

    # -- what the page needs to start -----------------------------------------------------------------
    def info(self) -> dict:
        spacing = self.image.multiscale.spacing_um(0)
        return {
            "image": {"name": self.image.name, "url": self.image.url, "width": self.width, "height": self.height,
                      "planes": self.planes, "ndim": self.ndim, "pixel_size_um": list(spacing) if spacing else None,
                      "levels": len(self.image.multiscale.levels)},
            "table": {"image": self.entry["image"], "label_image": self.entry["label_image"],
                      "objects": self.table.num_rows, "store": str(self.objs.stores[0])},
            "tiles": {"image": self.image_grid.describe(), "overlay": self.overlay_grid.describe()},
            "channels": self.channels,
            "columns": self.columns,
            "colormaps": list(COLORMAPS),
            "styles": list(tiles.STYLES),
            "limits": {"timeout_s": self.sandbox.timeout_s, "max_rows": self.sandbox.max_rows},
        }

    # -- view states -----------------------------------------------------------------------------------
    def state(self, where: str | None = None, by: str | None = None, cmap: str = "viridis",
              vrange: tuple[float, float] | None = None, others: str = "hide") -> ViewState:
        """The state for this filter and colouring (made once, then kept by its token)."""
        where = self.sandbox.check(where)
        by = by or None
        if others not in ("hide", "grey"):
            raise UsageError(f"others={others!r}; expected 'hide' or 'grey'")
        if vrange is not None:
            vrange = (float(vrange[0]), float(vrange[1]))
            if not all(math.isfinite(v) for v in vrange) or vrange[0] > vrange[1]:
                raise UsageError(f"range {vrange[0]:g} {vrange[1]:g}: expected two finite numbers, low first")
        token = self.token(where, by, cmap, vrange, others)
        with self._lock:
            if token in self._states:
                self._states.move_to_end(token)
                return self._states[token]
        matched = self._matched(where)
        rgba, legend = self._colours(by, cmap, vrange)
        palette = tiles.Palette(self.ids, rgba, shown=matched[self.order],
                                others=pathviewer.HIDDEN if others == "hide" else pathviewer.GREY)
        state = ViewState(token, where, by, cmap, vrange, others, matched, palette, legend)
        self._keep(state)
        return state

    def _keep(self, state: ViewState) -> None:
        """Keep the state's definition, and its arrays within STATE_BYTES (the least recently used go first)."""
        with self._lock:
            if state.token not in self._states:
                self._states[state.token] = state
                self._state_bytes += state.nbytes
            self._definitions[state.token] = state.definition
            self._definitions.move_to_end(state.token)
            while len(self._definitions) > MAX_STATES:
                token, _ = self._definitions.popitem(last=False)
                self._forget(token)
            while self._state_bytes > STATE_BYTES and len(self._states) > 1:
                self._forget(next(iter(self._states)))

    def _forget(self, token: str) -> None:
        gone = self._states.pop(token, None)
        if gone is not None:
            self._state_bytes -= gone.nbytes

    def token(self, where: str | None, by: str | None, cmap: str, vrange: tuple[float, float] | None,
              others: str) -> str:
        """The token naming a state (of this server: tokens of an earlier one are unknown here)."""
        key = json.dumps([self._salt, where, by, cmap, vrange, others])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def get_state(self, token: str) -> ViewState:
        """The state a token names: kept, or made again from its definition."""
        with self._lock:
            state = self._states.get(token)
            if state is not None:
                self._states.move_to_end(token)
                return state
            definition = self._definitions.get(token)
        if definition is None:
            raise UnknownState(f"unknown view state {token!r} (not made by this server, which may have restarted, "
                               f"or older than its last {MAX_STATES:,} states); apply the filter again")
        return self.state(*definition)

    def _matched(self, where: str | None) -> np.ndarray:
        with self._lock:
            hit = self._matches.get(where)
        if hit is not None:
            return hit
        matched = np.zeros(self.table.num_rows, bool)
        matched[self.sandbox.rows(where)] = True
        with self._lock:
            self._matches[where] = matched
            while len(self._matches) > 16:
                self._matches.popitem(last=False)
        return matched

    def _colours(self, by: str | None, cmap: str, vrange) -> tuple[np.ndarray, dict]:
        """RGBA per label id (sorted) and the legend."""
        if by is None:
            if self._plain is None:
                self._plain = np.tile(np.array(PLAIN, np.uint8), (self.ids.size, 1))
            return self._plain, {"column": None, "color": _hex(PLAIN)}
        if by not in self.column_names:
            self.objs.check_columns([by], "colour by")  # the closest names
        if cmap not in COLORMAPS:
            raise UsageError(f"colormap {cmap!r}: expected one of {', '.join(COLORMAPS)}")
        key = (by, cmap, vrange)
        with self._lock:
            coloring = self._colorings.get(key)
        if coloring is None:
            coloring = pathviewer.coloring(self.query, by, cmap=cmap, vrange=vrange)
            if not np.array_equal(coloring.ids, self.ids):  # both are the table's ids, sorted
                raise AssertionError("colouring and table disagree on the label ids")
            with self._lock:
                self._colorings[key] = coloring
                while len(self._colorings) > 8:
                    self._colorings.popitem(last=False)
        legend: dict[str, Any] = {"column": by, "unit": coloring.unit, "cmap": coloring.cmap}
        if coloring.vrange is not None:
            import matplotlib

            colormap = matplotlib.colormaps[coloring.cmap]
            legend["range"] = list(coloring.vrange)
            legend["colors"] = [_hex(c) for c in np.round(colormap(np.linspace(0, 1, 64)) * 255).astype(int)]
        else:
            legend["categories"] = [{"name": name, "color": _hex(c)} for name, c in (coloring.categories or {}).items()]
        return coloring.rgba, legend

    def describe(self, state: ViewState) -> dict:
        return {"token": state.token, "where": state.where, "count": state.count, "total": self.table.num_rows,
                "by": state.by, "cmap": state.cmap, "range": list(state.vrange) if state.vrange else None,
                "others": state.others, "legend": state.legend}

    # -- tiles -----------------------------------------------------------------------------------------
    def image_tile(self, level: int, x: int, y: int, channels: list[tiles.Channel], z: float = 0.0) -> bytes:
        ys, xs = self.image_grid.samples(level, x, y)
        self._check_plane(z)
        f = self.image_grid.factor(level)
        if not channels:
            return tiles.png(np.zeros((len(ys), len(xs), 3), np.uint8))
        planes = [(self.image_source.sample(ys, xs, f, channel=c.index, z=z), c) for c in channels]
        return tiles.png(tiles.compose(planes))

    def overlay_tile(self, token: str, style: str, level: int, x: int, y: int, z: float = 0.0) -> bytes:
        if style not in tiles.STYLES:
            raise UsageError(f"style {style!r}: expected one of {', '.join(tiles.STYLES)}")
        state = self.get_state(token)
        self._check_plane(z)
        labels, edge = self.label_tiles.get(level, x, y, z)
        return tiles.png(tiles.paint(labels, edge, state.palette, style))

    def _check_plane(self, z: float) -> None:
        if not 0 <= z < self.planes:
            raise tiles.TileNotFound(f"plane z={z:g}: the image has planes 0..{self.planes - 1}")

    def parse_channels(self, spec: str | None) -> list[tiles.Channel]:
        """'index:rrggbb:lo:hi,...' -> channels (the defaults when empty)."""
        if spec is None:
            return [tiles.Channel(c["index"], _rgb(c["color"]), c["lo"], c["hi"]) for c in self.channels if c["active"]]
        out = []
        for part in filter(None, spec.split(",")):
            bits = part.split(":")
            try:
                if len(bits) != 4 or not _is_hex(bits[1]):
                    raise ValueError
                index, lo, hi = int(bits[0]), float(bits[2]), float(bits[3])
            except ValueError:
                raise UsageError(f"channel {part!r}: expected index:rrggbb:low:high") from None
            if not 0 <= index < len(self.channels):
                raise UsageError(f"channel {index}: the image has channels 0..{len(self.channels) - 1}")
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise UsageError(f"channel {index}: contrast {lo:g}..{hi:g} is not finite")
            out.append(tiles.Channel(index, _rgb(bits[1]), lo, hi))
        return out

    # -- objects ---------------------------------------------------------------------------------------
    def histogram(self, column: str, state: ViewState, bins: int = 64, lo: float | None = None,
                  hi: float | None = None) -> dict:
        """Counts of a numeric column over every object and over the matching ones, on the same bins."""
        info = self._column(column)
        if not info["numeric"]:
            raise UsageError(f"histogram: column {column!r} is {info['dtype']}, not numeric")
        if not 1 <= bins <= 1000:
            raise UsageError(f"bins {bins}: expected 1 to 1000")
        values = self._numeric(column)
        finite = np.isfinite(values)
        v, m = values[finite], state.matched[finite]
        if lo is None or hi is None:
            lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise UsageError(f"histogram range {lo:g}..{hi:g}: expected two finite numbers, low first")
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        every = np.histogram(v, edges)[0]
        chosen = v[m]
        matching = np.histogram(chosen, edges)[0]
        return {"column": column, "unit": info["unit"], "edges": edges.tolist(), "all": every.tolist(),
                "matched": matching.tolist(), "count": int(v.size), "matched_count": int(m.sum()),
                "matched_range": [float(chosen.min()), float(chosen.max())] if chosen.size else None,
                "not_finite": int((~finite).sum()), "not_finite_matched": int(state.matched[~finite].sum())}

    def page(self, state: ViewState, *, offset: int = 0, limit: int = 50, sort: str | None = None,
             descending: bool = False) -> dict:
        """A page of the matching objects: every column, sorted, with where to centre the view on each."""
        order = []
        if sort:
            self._column(sort)
            order.append((sort, descending))
        order.append(("label_id", False))
        table = self.sandbox.page(state.where, order=order, limit=limit, offset=offset)
        rows = table.drop_columns(["__row"]).to_pylist()
        return {"token": state.token, "offset": offset, "total": state.count,
                "columns": [c["name"] for c in self.columns],
                "rows": [[json_value(r[c["name"]]) for c in self.columns] for r in rows],
                "views": [self._view(r) for r in rows]}

    def label_at(self, x: float, y: float, z: float = 0.0) -> int:
        """The label value at image pixel (x, y) (continuous coordinates), 0 outside the image."""
        if not (0 <= x < self.width and 0 <= y < self.height):
            return 0
        self._check_plane(z)
        value = self.label_source.sample(np.array([y], np.float64), np.array([x], np.float64), 0.0, z=z)
        return int(value.ravel()[0])

    def object(self, label_id: int, state: ViewState | None = None) -> dict | None:
        """An object's row (every column with its unit), whether it matches the state's filter, and where it is."""
        pos = int(np.searchsorted(self.ids, np.uint64(label_id)))
        if pos >= self.ids.size or int(self.ids[pos]) != label_id:
            return None
        row = int(self.order[pos])
        values = self.table.slice(row, 1).to_pylist()[0]
        return {"label_id": str(label_id), "matches": bool(state.matched[row]) if state is not None else None,
                "columns": [{"name": c["name"], "value": json_value(values[c["name"]]), "unit": c["unit"],
                             "description": c["description"]} for c in self.columns],
                "view": self._view(values)}

    def _view(self, row: dict) -> dict | None:
        """Centre and box of an object in image pixels (continuous), from its centroid and bounding box."""
        axes = ("z", "y", "x")[-self.ndim:]
        try:
            centre = [(float(row[f"centroid_{a}"]) + 0.5) * f for a, f in zip(axes, self.to_image)]
        except (KeyError, TypeError):
            centre = None
        try:
            box = [[float(row[f"bbox_min_{a}"]) * f, float(row[f"bbox_max_{a}"]) * f] for a, f in zip(axes, self.to_image)]
        except (KeyError, TypeError):
            box = None
        if centre is None and box is None:
            return None
        if centre is None:
            centre = [(lo + hi) / 2 for lo, hi in box]
        view = {"x": centre[-1], "y": centre[-2], "box": {"x0": box[-1][0], "x1": box[-1][1], "y0": box[-2][0],
                                                           "y1": box[-2][1]} if box else None}
        if self.ndim == 3:
            view["z"] = centre[0]
        return view

    def _column(self, name: str) -> dict:
        for c in self.columns:
            if c["name"] == name:
                return c
        self.objs.check_columns([name], "column")
        raise QueryError(f"column {name!r} is not in this table")

    def _numeric(self, column: str) -> np.ndarray:
        with self._lock:
            hit = self._values.get(column)
        if hit is not None:
            return hit
        values = self.table.column(column).cast(pa.float64()).fill_null(np.nan).to_numpy()
        with self._lock:
            self._values[column] = values
            while len(self._values) > 8:
                self._values.popitem(last=False)
        return values


def json_value(value: Any) -> Any:
    """A value as JSON can carry it: non-finite floats as "NaN" / "Infinity" / "-Infinity", integers beyond
    2^53 (which JavaScript would round) as strings."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if abs(value) <= 2**53 else str(value)
    return str(value)


def _omero_channels(image: ngff.NgffImage) -> list:
    """The image's `omero.channels` list (colours and windows), or []."""
    try:
        omero = image.attributes().get("omero")
    except Exception:  # metadata for display only: without it the defaults apply
        return []
    channels = omero.get("channels") if isinstance(omero, dict) else None
    return channels if isinstance(channels, list) else []


def _is_hex(text: str) -> bool:
    return len(text) == 6 and all(ch in "0123456789abcdefABCDEF" for ch in text)


def _rgb(text: str) -> tuple[int, int, int]:
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


def _hex(rgba) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in list(rgba)[:3])
