// A hand-written SVG line chart of training and validation loss. No chart library: the
// dashboard must work offline (no CDN) and load in under 300 KB, and two polylines with
// axes are a few dozen lines.

const NS = "http://www.w3.org/2000/svg";
const W = 640, H = 260, PAD = { left: 52, right: 16, top: 14, bottom: 34 };

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3));

// series: [{ name, cls, points: [[step, value], ...] }]
export function lossChart(series, { title = "Loss by step" } = {}) {
  const all = series.flatMap((s) => s.points);
  const counts = series.map((s) => `${s.name}: ${s.points.length} points`).join(", ");
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart",
    "aria-label": `${title}. ${counts}`,
  });
  for (const s of series) root.dataset[`${s.cls}Points`] = s.points.length;
  if (!all.length) {  // a short box, not an empty plot
    root.setAttribute("viewBox", `0 0 ${W} 40`);
    root.append(svg("text", { x: W / 2, y: 24, "text-anchor": "middle", class: "muted" },
      "No metrics yet"));
    return root;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const px = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
  const py = (y) => H - PAD.bottom - ((y - y0) / (y1 - y0)) * (H - PAD.top - PAD.bottom);

  for (let i = 0; i <= 4; i++) {  // horizontal grid with loss labels
    const v = y0 + ((y1 - y0) * i) / 4, y = py(v);
    root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "grid" }));
    root.append(svg("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end" }, fmt(v)));
  }
  const ticks = Math.min(5, x1 - x0);
  for (let i = 0; i <= ticks; i++) {
    const v = Math.round(x0 + ((x1 - x0) * i) / ticks);
    root.append(svg("text", { x: px(v), y: H - PAD.bottom + 16, "text-anchor": "middle" }, v));
  }
  root.append(svg("text", { x: (PAD.left + W - PAD.right) / 2, y: H - 4,
    "text-anchor": "middle" }, "step"));
  root.append(svg("text", { x: 12, y: PAD.top + (H - PAD.top - PAD.bottom) / 2,
    "text-anchor": "middle", transform: `rotate(-90 12 ${PAD.top + (H - PAD.top - PAD.bottom) / 2})` },
    "loss"));

  for (const s of series) {
    if (!s.points.length) continue;
    const pts = s.points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
    root.append(svg("polyline", { points: pts, class: `line ${s.cls}` }));
    for (const [x, y] of s.points.length <= 60 ? s.points : []) {
      root.append(svg("circle", { cx: px(x), cy: py(y), r: 2.5, class: `dot ${s.cls}` }));
    }
  }
  return root;
}

// The legend, as HTML so it reads as text.
export function legend(series) {
  const ul = document.createElement("ul");
  ul.className = "legend";
  for (const s of series) {
    const li = document.createElement("li");
    li.className = s.cls;
    const last = s.points.at(-1);
    li.textContent = `${s.name}${last ? ` (last: ${fmt(last[1])} at step ${last[0]})` : ""}`;
    ul.append(li);
  }
  return ul;
}

// The loss series from a job's metrics events (event.data: step, train_loss, valid_loss).
export function lossSeries(events) {
  const train = new Map(), valid = new Map();
  for (const ev of events) {
    if (ev.type !== "metrics" || typeof ev.data?.step !== "number") continue;
    if (typeof ev.data.train_loss === "number") train.set(ev.data.step, ev.data.train_loss);
    if (typeof ev.data.valid_loss === "number") valid.set(ev.data.step, ev.data.valid_loss);
  }
  const sorted = (m) => [...m.entries()].sort((a, b) => a[0] - b[0]);
  return [
    { name: "Training loss", cls: "train", points: sorted(train) },
    { name: "Validation loss", cls: "valid", points: sorted(valid) },
  ];
}
