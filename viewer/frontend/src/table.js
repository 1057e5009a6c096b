// The table of matching objects: a page at a time from the server, sorted there by the column whose header
// was clicked (again: the other way round); clicking a row reports it (onChoose) so the view can centre on it.

import * as api from "./api.js";
import { el, formatCount, formatValue, unitText } from "./format.js";

export class ObjectTable {
  constructor(root, info, onChoose, pageSize = 50) {
    this.table = root.querySelector("#rows");
    this.pageInfo = root.querySelector("#page-info");
    this.prev = root.querySelector("#prev");
    this.next = root.querySelector("#next");
    this.units = Object.fromEntries(info.columns.map((c) => [c.name, c.unit]));
    this.onChoose = onChoose;
    this.pageSize = pageSize;
    this.token = null;
    this.offset = 0;
    this.total = 0;
    this.sort = null;
    this.desc = false;
    this.selected = null;
    this.request = 0;
    this.prev.addEventListener("click", () => this.load(this.token, Math.max(0, this.offset - this.pageSize)));
    this.next.addEventListener("click", () => this.load(this.token, this.offset + this.pageSize));
  }

  async load(token, offset = 0) {
    this.token = token;
    const request = ++this.request;
    const page = await api.get("api/rows", { token, offset, limit: this.pageSize, sort: this.sort, desc: this.desc ? 1 : 0 });
    if (request !== this.request) return; // a newer request was made meanwhile
    this.offset = page.offset;
    this.total = page.total;
    this.render(page);
  }

  render(page) {
    const head = el("tr", {}, ...page.columns.map((name) => {
      const arrow = this.sort === name ? (this.desc ? " ▼" : " ▲") : "";
      return el("th", {
        class: this.sort === name ? "sorted" : "",
        title: `sort by ${name}`,
        "data-column": name,
        onclick: () => this.sortBy(name),
      }, `${name}${arrow}`, el("span", { class: "unit", text: unitText(this.units[name]) || "\u00a0" }));
    }));
    this.table.tHead.replaceChildren(head);
    const labelIndex = page.columns.indexOf("label_id");
    const rows = page.rows.map((values, i) => {
      const id = String(values[labelIndex]);
      const tr = el("tr", { "data-label-id": id, onclick: () => this.choose(id, page.views[i], tr) },
        ...values.map((v) => el("td", { text: formatValue(v) })));
      if (id === this.selected) tr.classList.add("selected");
      return tr;
    });
    this.table.tBodies[0].replaceChildren(...rows);
    const last = Math.min(this.total, this.offset + page.rows.length);
    this.pageInfo.textContent = this.total ? `${formatCount(this.offset + 1)}–${formatCount(last)} of ${formatCount(this.total)}` : "none";
    this.prev.disabled = this.offset === 0;
    this.next.disabled = last >= this.total;
  }

  sortBy(name) {
    if (this.sort === name) this.desc = !this.desc;
    else {
      this.sort = name;
      this.desc = false;
    }
    this.load(this.token, 0);
  }

  choose(id, view, tr) {
    this.mark(id);
    this.onChoose(id, view);
  }

  mark(id) {
    this.selected = id;
    for (const tr of this.table.tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.labelId === id);
  }
}
