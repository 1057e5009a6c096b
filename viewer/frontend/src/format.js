// Number and value formatting shared by the panels.

export function formatCount(n) {
  return Number(n).toLocaleString("en-US");
}

// A value from the server: numbers to a few significant digits, non-finite floats arrive as strings.
export function formatValue(value) {
  if (value === null || value === undefined) return "NULL";
  if (typeof value === "number") {
    if (Number.isInteger(value)) return String(value);
    const abs = Math.abs(value);
    if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(4);
    return String(Number(value.toPrecision(6)));
  }
  if (typeof value === "boolean") return value ? "true" : "false";
  return String(value);
}

// A number written into SQL: short, but exact enough for a range bound.
export function sqlNumber(x) {
  if (!Number.isFinite(x)) return "0";
  return String(Number(x.toPrecision(6)));
}

export function unitText(unit) {
  return unit && unit !== "dimensionless" ? unit : "";
}

// A column name as SQL: plain identifiers as they are, others double-quoted.
export function sqlName(name) {
  return /^[A-Za-z_][A-Za-z0-9_]*$/.test(name) ? name : `"${name.replace(/"/g, '""')}"`;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}
