// A column's histogram on a canvas: every object in grey, the matching ones on top in colour; dragging across
// it reports the value range swept (onRange), which the page turns into a BETWEEN term of the filter.

import { formatCount, formatValue } from "./format.js";

const PAD = { left: 6, right: 6, top: 6, bottom: 18 };

export class Histogram {
  constructor(canvas, info, onRange) {
    this.canvas = canvas;
    this.info = info;
    this.onRange = onRange;
    this.data = null;
    this.log = false;
    this.drag = null;
    canvas.addEventListener("mousedown", (e) => this.down(e));
    window.addEventListener("mousemove", (e) => this.move(e));
    window.addEventListener("mouseup", (e) => this.up(e));
    canvas.addEventListener("mousemove", (e) => this.hover(e));
    canvas.addEventListener("mouseleave", () => this.describe());
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  set(data, log) {
    this.data = data;
    this.log = log;
    this.draw();
    this.describe();
  }

  plotWidth() {
    return this.canvas.clientWidth - PAD.left - PAD.right;
  }

  valueAt(clientX) {
    const rect = this.canvas.getBoundingClientRect();
    const t = Math.min(1, Math.max(0, (clientX - rect.left - PAD.left) / this.plotWidth()));
    const edges = this.data.edges;
    return edges[0] + t * (edges[edges.length - 1] - edges[0]);
  }

  xOf(value) {
    const edges = this.data.edges;
    const t = (value - edges[0]) / (edges[edges.length - 1] - edges[0]);
    return PAD.left + t * this.plotWidth();
  }

  draw() {
    const c = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = c.clientWidth;
    const h = c.clientHeight;
    if (!w || !h) return;
    c.width = Math.round(w * ratio);
    c.height = Math.round(h * ratio);
    const g = c.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    if (!this.data) return;
    const { edges, all, matched } = this.data;
    const scale = (n) => (this.log ? Math.log10(1 + n) : n);
    const top = Math.max(1, ...all.map(scale));
    const ph = h - PAD.top - PAD.bottom;
    const bw = this.plotWidth() / all.length;
    for (const [counts, colour] of [[all, "#c4c8cf"], [matched, "#2563eb"]]) {
      g.fillStyle = colour;
      counts.forEach((n, i) => {
        if (!n) return;
        const bh = Math.max(1, (scale(n) / top) * ph);
        g.fillRect(PAD.left + i * bw + 0.5, PAD.top + ph - bh, Math.max(1, bw - 1), bh);
      });
    }
    if (this.drag && this.drag.moved) {
      const x0 = this.xOf(Math.min(this.drag.a, this.drag.b));
      const x1 = this.xOf(Math.max(this.drag.a, this.drag.b));
      g.fillStyle = "rgba(37, 99, 235, 0.15)";
      g.fillRect(x0, PAD.top, x1 - x0, ph);
      g.strokeStyle = "#2563eb";
      g.strokeRect(x0 + 0.5, PAD.top + 0.5, x1 - x0 - 1, ph - 1);
    }
    g.fillStyle = "#4b5363";
    g.font = "11px system-ui, sans-serif";
    g.textBaseline = "bottom";
    g.textAlign = "left";
    g.fillText(formatValue(edges[0]), PAD.left, h - 2);
    g.textAlign = "right";
    g.fillText(formatValue(edges[edges.length - 1]), w - PAD.right, h - 2);
  }

  describe(text) {
    const info = this.info;
    if (text !== undefined) {
      info.textContent = text;
      return;
    }
    if (!this.data) {
      info.textContent = "";
      return;
    }
    const d = this.data;
    const extra = d.not_finite ? `; ${formatCount(d.not_finite)} NaN or NULL not shown` : "";
    info.textContent = `${d.column}${d.unit ? ` (${d.unit})` : ""}: ${formatCount(d.matched_count)} of ${formatCount(d.count)} values match${extra}`;
  }

  hover(e) {
    if (!this.data || this.drag) return;
    const v = this.valueAt(e.clientX);
    const { edges, all, matched } = this.data;
    const i = Math.min(all.length - 1, Math.max(0, Math.floor(((v - edges[0]) / (edges[edges.length - 1] - edges[0])) * all.length)));
    this.describe(`${formatValue(edges[i])} to ${formatValue(edges[i + 1])}: ${formatCount(matched[i])} of ${formatCount(all[i])} objects match`);
  }

  down(e) {
    if (!this.data || e.button !== 0) return;
    e.preventDefault();
    const v = this.valueAt(e.clientX);
    this.drag = { a: v, b: v, x: e.clientX, moved: false };
  }

  move(e) {
    if (!this.drag) return;
    this.drag.b = this.valueAt(e.clientX);
    this.drag.moved = this.drag.moved || Math.abs(e.clientX - this.drag.x) > 3;
    this.draw();
  }

  up(e) {
    if (!this.drag) return;
    const { a, moved } = this.drag;
    const b = this.valueAt(e.clientX);
    this.drag = null;
    this.draw();
    if (moved) this.onRange(Math.min(a, b), Math.max(a, b));
  }
}
