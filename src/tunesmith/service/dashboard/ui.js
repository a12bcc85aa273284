// Small DOM helpers shared by the pages.

// h("button", { type: "button", onclick: f }, "Cancel"): an element with attributes,
// properties (on*) and children (strings become text nodes, never HTML).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

export function time(unix) {
  if (!unix) return h("span", { class: "muted" }, "—");
  const d = new Date(unix * 1000);
  return h("time", { datetime: d.toISOString() }, d.toLocaleString());
}

export function badge(status) {
  return h("span", { class: `badge s-${status}` }, status.replace("_", " "));
}

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 ** 2).toFixed(1)} MB`;
}

export function announce(text) {
  const status = document.getElementById("status");
  status.textContent = "";
  setTimeout(() => { status.textContent = text; }, 50);
}

// A message box for an API error: its message, one line per line of the message (the file
// validator reports each bad line of an upload on a line of its own).
export function errorBox(err, id) {
  const lines = String(err.message ?? err).split("\n").filter((l) => l.trim());
  const box = h("div", { class: "error", role: "alert", id });
  box.append(h("p", {}, lines[0] ?? "Error"));
  if (lines.length > 1) {
    box.append(h("ul", { class: "problems" }, lines.slice(1).map((l) => h("li", {}, l.trim()))));
  }
  return box;
}

// The page's heading, focused so a keyboard or screen-reader user starts at the new page.
export function heading(text) {
  return h("h1", { tabindex: "-1" }, text);
}

export function table(caption, columns, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h("div", { class: "scroll" }, h("table", {},
    h("caption", { class: "sr-only" }, caption),
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows)));
}
