// Column-name completion for the filter box: the identifier being typed before the caret is matched against
// the table's columns (prefix matches first, then names containing it); arrows choose, Tab or Enter (or a
// click) inserts, Escape closes.

import { el, unitText } from "./format.js";

const WORD = /[A-Za-z_][A-Za-z0-9_]*$/;
const IDENT = /[A-Za-z0-9_]/;
const MAX_SHOWN = 12;

export class Completer {
  constructor(input, list, columns) {
    this.input = input;
    this.list = list;
    this.columns = columns; // [{name, unit, description}]
    this.items = [];
    this.active = 0;
    input.addEventListener("input", () => this.update());
    input.addEventListener("click", () => this.update());
    input.addEventListener("blur", () => setTimeout(() => this.close(), 150));
    input.addEventListener("keydown", (e) => this.key(e), true);
  }

  get open() {
    return !this.list.hidden && this.items.length > 0;
  }

  word() {
    const caret = this.input.selectionStart;
    if (caret !== this.input.selectionEnd) return null;
    const text = this.input.value;
    if (caret < text.length && IDENT.test(text[caret])) return null; // inside a word
    const before = text.slice(0, caret);
    if ((before.match(/'/g) || []).length % 2 === 1) return null; // inside a string literal
    const m = before.match(WORD);
    if (!m || /^[0-9]/.test(m[0])) return null;
    return { start: caret - m[0].length, end: caret, text: m[0] };
  }

  update() {
    const word = this.word();
    if (!word) return this.close();
    const lower = word.text.toLowerCase();
    const prefix = this.columns.filter((c) => c.name.toLowerCase().startsWith(lower));
    const inside = this.columns.filter((c) => !c.name.toLowerCase().startsWith(lower) && c.name.toLowerCase().includes(lower));
    const found = [...prefix, ...inside];
    if (!found.length || (found.length === 1 && found[0].name === word.text)) return this.close();
    this.items = found.slice(0, MAX_SHOWN);
    this.active = 0;
    this.render();
  }

  render() {
    this.list.replaceChildren(...this.items.map((c, i) => el("li", {
      role: "option",
      class: i === this.active ? "active" : "",
      title: c.description || "",
      "data-name": c.name,
      onmousedown: (e) => { e.preventDefault(); this.accept(i); },
    }, el("span", { text: c.name }), el("span", { class: "unit", text: unitText(c.unit) }))));
    this.list.hidden = false;
    const active = this.list.children[this.active];
    if (active && active.scrollIntoView) active.scrollIntoView({ block: "nearest" });
  }

  close() {
    this.list.hidden = true;
    this.items = [];
  }

  accept(i) {
    const word = this.word();
    const column = this.items[i];
    if (!word || !column) return this.close();
    const text = this.input.value;
    this.input.value = text.slice(0, word.start) + column.name + text.slice(word.end);
    const caret = word.start + column.name.length;
    this.input.setSelectionRange(caret, caret);
    this.close();
    this.input.dispatchEvent(new Event("completed"));
  }

  key(e) {
    if (!this.open) return;
    if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      const step = e.key === "ArrowDown" ? 1 : -1;
      this.active = (this.active + step + this.items.length) % this.items.length;
      this.render();
    } else if (e.key === "Tab" || e.key === "Enter") {
      this.accept(this.active);
    } else if (e.key === "Escape") {
      this.close();
    } else {
      return;
    }
    e.preventDefault();
    e.stopImmediatePropagation();
  }
}
