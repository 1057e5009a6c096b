// cellar view: the page. OpenSeadragon shows two tiled layers from the server, the image (channels composed
// there) and the objects' overlay (outlines or fills coloured there); a view state (filter, colouring) is
// made by the server and named by a token in the overlay tiles' URLs, so changing it refetches only the
// overlay. Everything else (filter box, colour and legend, histogram, table, the clicked object's row) is
// plain DOM around it.

import OpenSeadragon from "openseadragon";
import * as api from "./api.js";
import { Completer } from "./completer.js";
import { el, formatCount, formatValue, sqlName, sqlNumber, unitText } from "./format.js";
import { Histogram } from "./histogram.js";
import { ObjectTable } from "./table.js";

const $ = (id) => document.getElementById(id);

class App {
  constructor(info) {
    this.info = info;
    this.width = info.image.width;
    this.height = info.image.height;
    this.z = Math.floor(info.image.planes / 2);
    this.state = null;
    this.selected = null;
    this.layers = { image: null, overlay: null };
    this.incoming = { image: null, overlay: null };
    this.generation = { image: 0, overlay: 0 };
    this.stateRequest = 0;
    this.numeric = info.columns.filter((c) => c.numeric);
    this.byName = Object.fromEntries(info.columns.map((c) => [c.name, c]));
  }

  start() {
    const { info } = this;
    document.title = `cellar view: ${info.table.image}/${info.table.label_image}`;
    $("title").textContent = `${info.table.image} / labels/${info.table.label_image}`;
    $("subtitle").textContent = `${formatCount(info.table.objects)} objects, ${this.width} x ${this.height} px` +
      (info.image.planes > 1 ? ` x ${info.image.planes} planes` : "") + ` (${info.table.store})`;
    this.viewer = OpenSeadragon({
      element: $("osd"),
      showNavigationControl: false,
      showNavigator: false,
      navigatorPosition: "BOTTOM_RIGHT",
      drawer: "canvas",
      imageSmoothingEnabled: false,
      maxZoomPixelRatio: 8,
      visibilityRatio: 0.2,
      immediateRender: true,
      blendTime: 0,
      animationTime: 0.3,
      preserveViewport: true,
      gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
      // two layers, and a third while one is replaced: OpenSeadragon's default of 200 tiles in its cache is
      // fewer than a full-screen view of all three at full resolution, which would evict and reload forever
      maxImageCacheCount: 1500,
      maxTilesPerFrame: 32, // the default (1) takes a frame per tile: a new overlay of 60 tiles took a second
      imageLoaderLimit: 12,
    });
    this.viewer.addHandler("canvas-click", (e) => {
      if (!e.quick) return;
      e.preventDefaultAction = true;
      const p = this.toImage(e.position);
      this.selectAt(p.x, p.y);
    });
    // body[data-drawn] is "yes" once a frame has been drawn in which both layers are in place and every
    // tile of their current view is loaded, "no" until then (the end-to-end tests look at the pixels then)
    this.viewer.addHandler("update-viewport", () => {
      const ready = ["image", "overlay"].every((k) => this.layers[k] && !this.incoming[k] &&
        this.layers[k].getFullyLoaded());
      document.body.dataset.drawn = ready && !this.viewer.world.needsDraw() ? "yes" : "no";
    });
    new OpenSeadragon.MouseTracker({
      element: this.viewer.canvas,
      moveHandler: (e) => this.showCoordinates(e.position),
    });
    this.setupFilter();
    this.setupColour();
    this.setupHistogram();
    this.setupChannels();
    this.table = new ObjectTable(document, info, (id, view) => this.selectId(id, view));
    this.setLayer("image", this.imageSource());
    this.applyState();
  }

  // -- coordinates: the image is 1 wide in viewport units -------------------------------------------------
  toImage(elementPoint) {
    const vp = this.viewer.viewport.viewerElementToViewportCoordinates(elementPoint);
    return { x: vp.x * this.width, y: vp.y * this.width };
  }

  imageToPage(x, y) {
    const p = this.viewer.viewport.viewportToViewerElementCoordinates(new OpenSeadragon.Point(x / this.width, y / this.width));
    const r = this.viewer.element.getBoundingClientRect();
    return { x: r.left + p.x, y: r.top + p.y };
  }

  showCoordinates(position) {
    const p = this.toImage(position);
    if (p.x < 0 || p.y < 0 || p.x >= this.width || p.y >= this.height) {
      $("coords").textContent = "";
      return;
    }
    const size = this.info.image.pixel_size_um;
    const um = size ? ` (${formatValue(p.x * size[size.length - 1])}, ${formatValue(p.y * size[size.length - 2])} µm)` : "";
    $("coords").textContent = `x ${Math.floor(p.x)}, y ${Math.floor(p.y)} px${um}`;
  }

  // -- layers -------------------------------------------------------------------------------------------
  imageSource() {
    const t = this.info.tiles.image;
    const spec = encodeURIComponent(this.channelSpec());
    const z = this.z;
    return { width: t.width, height: t.height, tileSize: t.tileSize, tileOverlap: 0, minLevel: t.minLevel,
             maxLevel: t.maxLevel, getTileUrl: (level, x, y) => `tiles/image/${level}/${x}/${y}.png?c=${spec}&z=${z}` };
  }

  overlaySource() {
    const t = this.info.tiles.overlay;
    const token = this.state.token;
    const style = $("style").value;
    const z = this.z;
    return { width: t.width, height: t.height, tileSize: t.tileSize, tileOverlap: 0, minLevel: t.minLevel,
             maxLevel: t.maxLevel, getTileUrl: (level, x, y) => `tiles/overlay/${token}/${style}/${level}/${x}/${y}.png?z=${z}` };
  }

  // Replace a layer without flicker: the new one loads hidden (or beneath), and takes the old one's place when
  // every tile of the view has arrived. body[data-image] / body[data-overlay] say "loading" or "loaded".
  setLayer(kind, tileSource) {
    const generation = ++this.generation[kind];
    document.body.dataset[kind] = "loading";
    document.body.dataset.drawn = "no";
    if (kind === "overlay") document.body.dataset.token = this.state.token;
    this.busy();
    const opacity = kind === "overlay" ? Number($("opacity").value) : 1;
    this.viewer.addTiledImage({
      tileSource,
      x: 0,
      y: 0,
      width: 1,
      index: kind === "image" ? 0 : undefined,
      opacity: kind === "overlay" ? 0 : 1,
      preload: true,
      success: ({ item }) => {
        if (generation !== this.generation[kind]) {
          this.viewer.world.removeItem(item);
          return;
        }
        if (this.incoming[kind]) this.viewer.world.removeItem(this.incoming[kind]);
        this.incoming[kind] = item;
        // the overlay is supersampled (4 tile pixels per image pixel at its top level): a tile pixel per
        // screen pixel is sharp enough, and loads a quarter of the tiles that the default (0.5) would
        if (kind === "overlay") item.minPixelRatio = 1;
        const done = () => {
          if (this.incoming[kind] !== item) return;
          if (this.layers[kind]) this.viewer.world.removeItem(this.layers[kind]);
          item.setOpacity(opacity);
          this.layers[kind] = item;
          this.incoming[kind] = null;
          document.body.dataset[kind] = "loaded";
          this.viewer.forceRedraw(); // a frame to draw it in, which sets body[data-drawn]
          this.busy();
          if (kind === "overlay") {
            // from the filter or colour change to the new overlay's last tile, measured here (benchmarks)
            document.body.dataset.redrawMs = String(Math.round(performance.now() - this.stateStarted));
            if (this.afterOverlay) this.afterOverlay();
          }
        };
        if (item.getFullyLoaded()) done();
        else {
          const handler = (e) => {
            if (!e.fullyLoaded) return;
            item.removeHandler("fully-loaded-change", handler);
            done();
          };
          item.addHandler("fully-loaded-change", handler);
        }
      },
      error: (e) => this.flash(`could not load the ${kind} layer: ${e.message || e}`),
    });
  }

  busy() {
    $("busy").hidden = !(this.incoming.image || this.incoming.overlay ||
      document.body.dataset.image === "loading" || document.body.dataset.overlay === "loading");
  }

  flash(message) {
    $("where-error").textContent = message;
    $("where-error").hidden = false;
  }

  // -- the view state ----------------------------------------------------------------------------------
  range() {
    const lo = $("vmin").value;
    const hi = $("vmax").value;
    if (lo === "" && hi === "") return null;
    const auto = this.state && this.state.legend && this.state.legend.range;
    const a = lo === "" ? (auto ? auto[0] : 0) : Number(lo);
    const b = hi === "" ? (auto ? auto[1] : 1) : Number(hi);
    return [a, b];
  }

  async applyState() {
    const request = ++this.stateRequest;
    this.stateStarted = performance.now();
    const body = { where: $("where").value, by: $("by").value || null, cmap: $("cmap").value, range: this.range(),
                   others: $("others").value };
    let state;
    try {
      state = await api.post("api/state", body);
    } catch (e) {
      if (request === this.stateRequest) this.flash(e.message);
      return;
    }
    if (request !== this.stateRequest) return;
    $("where-error").hidden = true;
    this.state = state;
    const count = $("count");
    count.textContent = `${formatCount(state.count)} of ${formatCount(state.total)} objects match`;
    count.dataset.count = String(state.count);
    this.drawLegend();
    this.setLayer("overlay", this.overlaySource());
    // The redraw first: the histogram, the table and the selected object's row follow once the overlay has
    // arrived (or after a moment), so their queries do not compete with the tiles for the server's cores.
    let followed = false;
    const follow = () => {
      if (followed || request !== this.stateRequest) return;
      followed = true;
      this.refreshHistogram();
      this.table.load(state.token, 0).catch((e) => this.flash(e.message));
      if (this.selected) this.selectId(this.selected, null, false);
    };
    this.afterOverlay = follow;
    setTimeout(follow, 2000); // should the overlay never finish loading (a tile that fails)
  }

  // -- filter ------------------------------------------------------------------------------------------
  setupFilter() {
    const where = $("where");
    this.completer = new Completer(where, $("completions"), this.info.columns);
    where.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        this.applyState();
      }
    });
    $("apply").addEventListener("click", () => this.applyState());
    $("clear").addEventListener("click", () => {
      where.value = "";
      this.applyState();
    });
  }

  // A `column BETWEEN a AND b` term: replaces the column's range term if the filter has one, else is ANDed on.
  setRange(column, a, b) {
    const name = sqlName(column);
    const term = `${name} BETWEEN ${sqlNumber(a)} AND ${sqlNumber(b)}`;
    const where = $("where").value.trim();
    const escaped = name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    const existing = new RegExp(`${escaped}\\s+BETWEEN\\s+\\S+\\s+AND\\s+\\S+`, "i");
    let next;
    if (existing.test(where)) next = where.replace(existing, term);
    else if (!where) next = term;
    else if (/\bOR\b/i.test(where)) next = `(${where}) AND ${term}`;
    else next = `${where} AND ${term}`;
    $("where").value = next;
    this.applyState();
  }

  // -- colour ------------------------------------------------------------------------------------------
  setupColour() {
    const by = $("by");
    by.append(el("option", { value: "", text: "(one colour)" }));
    for (const c of this.info.columns) {
      if (c.name === "image" || c.name === "label_image") continue;
      by.append(el("option", { value: c.name, text: c.name + (unitText(c.unit) ? ` (${c.unit})` : "") }));
    }
    for (const name of this.info.colormaps) $("cmap").append(el("option", { value: name, text: name }));
    for (const name of this.info.styles) $("style").append(el("option", { value: name, text: name }));
    by.addEventListener("change", () => {
      $("vmin").value = "";
      $("vmax").value = "";
      const column = this.byName[by.value];
      if (column && column.numeric) $("hist-column").value = column.name;
      this.applyState();
    });
    for (const id of ["cmap", "others"]) $(id).addEventListener("change", () => this.applyState());
    for (const id of ["vmin", "vmax"]) $(id).addEventListener("change", () => this.applyState());
    $("style").addEventListener("change", () => this.setLayer("overlay", this.overlaySource()));
    $("opacity").addEventListener("input", () => {
      if (!this.layers.overlay) return;
      document.body.dataset.drawn = "no"; // until the next frame shows the new opacity
      this.layers.overlay.setOpacity(Number($("opacity").value));
      this.viewer.forceRedraw();
    });
    $("fit").addEventListener("click", () => this.fitRange());
    $("reset-range").addEventListener("click", () => {
      $("vmin").value = "";
      $("vmax").value = "";
      this.applyState();
    });
  }

  async fitRange() {
    const column = this.byName[$("by").value];
    if (!column || !column.numeric || !this.state) return;
    const h = await api.get("api/histogram", { token: this.state.token, column: column.name, bins: 1 });
    if (!h.matched_range) return;
    $("vmin").value = sqlNumber(h.matched_range[0]);
    $("vmax").value = sqlNumber(h.matched_range[1]);
    this.applyState();
  }

  drawLegend() {
    const legend = this.state.legend;
    const root = $("legend");
    const numeric = Boolean(legend.range);
    $("cmap").disabled = !numeric;
    $("vmin").disabled = !numeric;
    $("vmax").disabled = !numeric;
    $("fit").disabled = !numeric;
    $("reset-range").disabled = !numeric;
    root.dataset.column = legend.column || "";
    if (!legend.column) {
      root.replaceChildren(el("div", { class: "cats" },
        el("span", {}, el("span", { class: "swatch", style: `background:${legend.color}` }), "every object")));
      return;
    }
    const title = el("div", { class: "small", text: `${legend.column}${unitText(legend.unit) ? ` (${legend.unit})` : ""}` });
    if (numeric) {
      $("vmin").placeholder = sqlNumber(legend.range[0]);
      $("vmax").placeholder = sqlNumber(legend.range[1]);
      const bar = el("canvas", { width: legend.colors.length, height: 1 });
      const g = bar.getContext("2d");
      legend.colors.forEach((c, i) => {
        g.fillStyle = c;
        g.fillRect(i, 0, 1, 1);
      });
      root.replaceChildren(title, bar, el("div", { class: "ticks" },
        el("span", { text: formatValue(legend.range[0]) }),
        el("span", { text: formatValue((legend.range[0] + legend.range[1]) / 2) }),
        el("span", { text: formatValue(legend.range[1]) })));
    } else {
      const cats = legend.categories.slice(0, 40).map((c) =>
        el("span", {}, el("span", { class: "swatch", style: `background:${c.color}` }), c.name));
      if (legend.categories.length > 40) cats.push(el("span", { text: `and ${legend.categories.length - 40} more` }));
      root.replaceChildren(title, el("div", { class: "cats" }, ...cats));
    }
  }

  // -- histogram ---------------------------------------------------------------------------------------
  setupHistogram() {
    const select = $("hist-column");
    for (const c of this.numeric) {
      if (c.name === "label_id") continue;
      select.append(el("option", { value: c.name, text: c.name }));
    }
    if (this.byName.area) select.value = "area";
    this.histogram = new Histogram($("hist"), $("hist-info"), (a, b) => this.setRange(select.value, a, b));
    select.addEventListener("change", () => this.refreshHistogram());
    $("hist-log").addEventListener("change", () => this.refreshHistogram());
  }

  async refreshHistogram() {
    const column = $("hist-column").value;
    if (!column || !this.state) return;
    const token = this.state.token;
    try {
      const data = await api.get("api/histogram", { token, column, bins: 64 });
      if (data.column !== $("hist-column").value) return;
      this.histogram.set(data, $("hist-log").checked);
      Object.assign($("hist").dataset, { column: data.column, token }); // what is drawn (the tests wait on it)
    } catch (e) {
      this.histogram.describe(e.message);
    }
  }

  // -- channels ----------------------------------------------------------------------------------------
  setupChannels() {
    const root = $("channels");
    let timer = null;
    const changed = () => {
      clearTimeout(timer);
      timer = setTimeout(() => this.setLayer("image", this.imageSource()), 150);
    };
    this.channelInputs = this.info.channels.map((c) => {
      const step = (c.max - c.min) / 1000 || 1;
      const on = el("input", { type: "checkbox", checked: c.active, title: "show this channel", onchange: changed });
      const colour = el("input", { type: "color", value: `#${c.color}`, title: "colour", oninput: changed });
      const lo = el("input", { type: "number", step: "any", value: sqlNumber(c.lo), title: "black at", onchange: changed });
      const hi = el("input", { type: "number", step: "any", value: sqlNumber(c.hi), title: "full colour at", onchange: changed });
      const loRange = el("input", { type: "range", min: c.min, max: c.max, step, value: c.lo });
      const hiRange = el("input", { type: "range", min: c.min, max: c.max, step, value: c.hi });
      loRange.addEventListener("input", () => { lo.value = sqlNumber(Number(loRange.value)); changed(); });
      hiRange.addEventListener("input", () => { hi.value = sqlNumber(Number(hiRange.value)); changed(); });
      lo.addEventListener("change", () => { loRange.value = lo.value; });
      hi.addEventListener("change", () => { hiRange.value = hi.value; });
      root.append(el("div", { class: "channel", "data-channel": c.index },
        on, el("span", { class: "name", text: c.name }), colour,
        el("div", { class: "window" }, loRange, hiRange, lo, hi)));
      return { index: c.index, on, colour, lo, hi };
    });
    if (this.info.image.planes > 1) {
      $("plane").hidden = false;
      const z = $("z");
      z.max = this.info.image.planes - 1;
      z.value = this.z;
      $("z-value").textContent = String(this.z);
      z.addEventListener("change", () => this.setPlane(Number(z.value)));
    }
  }

  channelSpec() {
    if (!this.channelInputs) return "";
    return this.channelInputs.filter((c) => c.on.checked)
      .map((c) => `${c.index}:${c.colour.value.slice(1)}:${Number(c.lo.value)}:${Number(c.hi.value)}`).join(",");
  }

  setPlane(z) {
    this.z = Math.max(0, Math.min(this.info.image.planes - 1, Math.round(z)));
    $("z").value = this.z;
    $("z-value").textContent = String(this.z);
    this.setLayer("image", this.imageSource());
    if (this.state) this.setLayer("overlay", this.overlaySource());
  }

  // -- objects -----------------------------------------------------------------------------------------
  async selectAt(x, y) {
    if (x < 0 || y < 0 || x >= this.width || y >= this.height) return;
    const found = await api.get("api/object", { token: this.state && this.state.token, x, y, z: this.z });
    if (!found.found) {
      this.selected = null;
      this.highlight(null);
      this.table.mark(null);
      $("object").dataset.labelId = "";
      $("object").replaceChildren(el("span", { class: "muted", text: found.label_id ?
        `label ${found.label_id} has no row in this table` : "No object here (background)." }));
      return;
    }
    this.showObject(found);
  }

  async selectId(id, view, centre = true) {
    if (centre && view) this.centre(view);
    const found = await api.get("api/object", { token: this.state && this.state.token, id });
    if (found.found) {
      this.showObject(found);
      if (centre && !view && found.view) this.centre(found.view);
    }
  }

  centre(view) {
    if (view.z !== undefined && this.info.image.planes > 1 && Math.round(view.z - 0.5) !== this.z) this.setPlane(view.z - 0.5);
    const box = view.box;
    const size = Math.max(box ? Math.max(box.x1 - box.x0, box.y1 - box.y0) * 6 : 0, 96);
    const rect = new OpenSeadragon.Rect((view.x - size / 2) / this.width, (view.y - size / 2) / this.width,
      size / this.width, size / this.width);
    this.viewer.viewport.fitBounds(rect);
  }

  showObject(found) {
    this.selected = found.label_id;
    this.table.mark(found.label_id);
    const root = $("object");
    root.dataset.labelId = found.label_id;
    const status = found.matches === null ? null :
      el("span", { class: `tag ${found.matches ? "yes" : "no"}`, text: found.matches ? "matches the filter" : "does not match the filter" });
    const rows = found.columns.map((c) => el("tr", { "data-column": c.name, title: c.description },
      el("td", { class: "name", text: c.name }), el("td", { class: "value", text: formatValue(c.value) }),
      el("td", { class: "unit", text: unitText(c.unit) })));
    root.replaceChildren(el("div", { class: "status" }, el("b", { text: `label ${found.label_id} ` }), status),
      el("table", {}, el("tbody", {}, ...rows)));
    this.highlight(found.view);
  }

  highlight(view) {
    if (this.selection) {
      this.viewer.removeOverlay(this.selection);
      this.selection = null;
    }
    if (!view || !view.box) return;
    const b = view.box;
    this.selection = el("div", { class: "selection" });
    this.viewer.addOverlay({ element: this.selection, location: new OpenSeadragon.Rect(b.x0 / this.width, b.y0 / this.width,
      (b.x1 - b.x0) / this.width, (b.y1 - b.y0) / this.width) });
  }
}

async function main() {
  const info = await api.get("api/info");
  const app = new App(info);
  window.cellar = app; // for the end-to-end tests and the curious
  app.start();
}

main().catch((e) => {
  document.body.dataset.error = String(e.message || e);
  const box = $("where-error");
  if (box) {
    box.textContent = `cellar view failed to start: ${e.message || e}`;
    box.hidden = false;
  }
});
