// Shared helpers of the board's pages: JSON calls to this server, building elements, number formats and charts.
"use strict";

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || body.detail || response.statusText);
  return body;
}

async function postJSON(url, data) {
  const response = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                     body: JSON.stringify(data)});
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || body.detail || response.statusText);
  return body;
}

// Builds an element: el("td", {class: "num"}, "text", child, [more]). Strings go in as text nodes and attribute
// values through setAttribute, never as HTML: run folders are untrusted input (anyone who can write into the runs
// folder writes them), so nothing read from one is ever parsed as markup.
function el(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS("http://www.w3.org/2000/svg", tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.flat(Infinity).filter(c => c != null && c !== false)
    .map(c => c instanceof Node ? c : String(c)));
  return node;
}

function num(value, digits = 4) {
  return typeof value === "number" ? value.toFixed(digits) : "";
}

function duration(seconds) {
  if (seconds == null) return "–";
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`
       : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// A decoder's retained general ability (rows of /api/run's `retention`, one per probe metric compared), written as
// the report writes it: an accuracy's change as a signed difference, a perplexity's as its ratio in ±%.
const VERDICT_CLASS = {better: "gain", worse: "drop"};

function signed(value, digits = 3) {
  const text = Math.abs(value).toFixed(digits);
  return (value < 0 && Number(text) !== 0 ? "\u2212" : "+") + text;
}

function signedPercent(ratio) {
  return signed(100 * (ratio - 1), 0) + "%";
}

function retentionValue(row, key, withInterval = true) {
  const digits = row.ratio != null ? 1 : 3, value = row[key], span = row[`interval_${key}`];
  if (typeof value !== "number") return "";
  const interval = withInterval && span ? ` [${span.low.toFixed(digits)}, ${span.high.toFixed(digits)}]` : "";
  return value.toFixed(digits) + interval;
}

function retentionChange(row) {
  const write = row.ratio != null ? signedPercent : signed, value = row.ratio ?? row.change;
  if (typeof value !== "number") return "";
  return write(value) + (row.low != null && row.high != null ? ` [${write(row.low)}, ${write(row.high)}]` : "");
}

function retentionVerdict(row) {
  if (!row.verdict) return "";
  return row.verdict + (typeof row.p_value === "number" ? ` (p = ${+row.p_value.toPrecision(3)})` : "");
}

function runLink(name) {
  return el("a", {href: `/run?name=${encodeURIComponent(name)}`}, name);
}

function studyLink(name) {
  return el("a", {href: `/study?name=${encodeURIComponent(name)}`}, name);
}

// A file of a run or study folder, as /files serves it (each part of the path encoded on its own).
function filesURL(folder, path) {
  return "/files/" + `${folder}/${path}`.split("/").map(encodeURIComponent).join("/");
}

function param(name) {
  return new URLSearchParams(location.search).get(name);
}

const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"];

// A line chart as inline SVG, with its legend below. series: [{name, points: [[x, y], ...], colour, dots, dashed,
// line}] (line: false draws the dots alone)
function lineChart(series, {width = 640, height = 260, xLabel = "step", yLabel = ""} = {}) {
  const all = series.flatMap(s => s.points).filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  if (!all.length) return el("p", {class: "muted"}, "no points yet");
  const pad = {left: 56, right: 12, top: 12, bottom: 36};
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = x => pad.left + (x - x0) / (x1 - x0) * (width - pad.left - pad.right);
  const Y = y => height - pad.bottom - (y - y0) / (y1 - y0) * (height - pad.top - pad.bottom);
  const chart = svg("svg", {class: "chart", width, height, viewBox: `0 0 ${width} ${height}`});
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    chart.append(svg("line", {x1: pad.left, x2: width - pad.right, y1: Y(y), y2: Y(y), stroke: "#eee"}),
      svg("text", {x: pad.left - 6, y: Y(y) + 4, "font-size": 11, "text-anchor": "end"}, +y.toPrecision(3)),
      svg("text", {x: X(x), y: height - pad.bottom + 16, "font-size": 11, "text-anchor": "middle"}, +x.toPrecision(3)));
  }
  chart.append(svg("text", {x: width / 2, y: height - 4, "font-size": 12, "text-anchor": "middle"}, xLabel),
    svg("text", {x: 12, y: height / 2, "font-size": 12, transform: `rotate(-90 12 ${height / 2})`,
                 "text-anchor": "middle"}, yLabel));
  const legend = el("div", {class: "legend"});
  series.forEach((s, i) => {
    const colour = s.colour || COLOURS[i % COLOURS.length];
    const points = s.points.filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    const path = points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    if (s.line !== false) chart.append(svg("path", {class: "series", "data-name": s.name, d: path, fill: "none",
      stroke: colour, "stroke-width": 1.8, "stroke-dasharray": s.dashed ? "5,3" : null}));
    if (s.dots) points.forEach(p => chart.append(svg("circle", {cx: X(p[0]), cy: Y(p[1]), r: 3, fill: colour})));
    if (i) legend.append(" \u00a0 ");
    legend.append(el("span", {style: `color:${colour}`}, `${s.line === false ? "●" : s.dashed ? "┄" : "━"} ${s.name}`));
  });
  const figure = document.createDocumentFragment();
  figure.append(chart, legend);
  return figure;
}

// The loss series of a run's log.jsonl rows: training loss per step and eval loss per evaluation.
function lossSeries(log, prefix = "") {
  return [
    {name: `${prefix}train loss`, points: log.filter(r => typeof r.loss === "number").map(r => [r.step, r.loss])},
    {name: `${prefix}eval loss`, dots: true, dashed: true,
     points: log.filter(r => typeof r.eval_loss === "number").map(r => [r.step, r.eval_loss])},
  ].filter(s => s.points.length);
}

function navigation(here) {
  const links = [["/", "Runs"], ["/compare", "Compare"], ["/new", "New run"], ["/playground", "Playground"]];
  document.querySelector("header").replaceChildren(el("b", {}, "tunelab studio"),
    ...links.map(([href, text]) => el("a", {href, class: href === here ? "here" : null}, text)));
}
