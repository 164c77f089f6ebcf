// Shared helpers of the board's pages: JSON calls to this server, escaping, number formats and line charts.
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

function esc(text) {
  return String(text ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                         "'": "&#39;"}[c]));
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

function runLink(name) {
  return `<a href="/run?name=${encodeURIComponent(name)}">${esc(name)}</a>`;
}

function param(name) {
  return new URLSearchParams(location.search).get(name);
}

const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"];

// A line chart as inline SVG. series: [{name, points: [[x, y], ...], colour, dots}]
function lineChart(series, {width = 640, height = 260, xLabel = "step", yLabel = ""} = {}) {
  const all = series.flatMap(s => s.points);
  if (!all.length) return `<p class="muted">no points yet</p>`;
  const pad = {left: 56, right: 12, top: 12, bottom: 36};
  const xs = all.map(p => p[0]), ys = all.map(p => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const X = x => pad.left + (x - x0) / (x1 - x0) * (width - pad.left - pad.right);
  const Y = y => height - pad.bottom - (y - y0) / (y1 - y0) * (height - pad.top - pad.bottom);
  let svg = `<svg class="chart" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}">`;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    svg += `<line x1="${pad.left}" x2="${width - pad.right}" y1="${Y(y)}" y2="${Y(y)}" stroke="#eee"/>`;
    svg += `<text x="${pad.left - 6}" y="${Y(y) + 4}" font-size="11" text-anchor="end">${+y.toPrecision(3)}</text>`;
    svg += `<text x="${X(x)}" y="${height - pad.bottom + 16}" font-size="11" text-anchor="middle">${+x.toPrecision(3)}</text>`;
  }
  svg += `<text x="${width / 2}" y="${height - 4}" font-size="12" text-anchor="middle">${esc(xLabel)}</text>`;
  svg += `<text x="12" y="${height / 2}" font-size="12" transform="rotate(-90 12 ${height / 2})" text-anchor="middle">${esc(yLabel)}</text>`;
  series.forEach((s, i) => {
    const colour = s.colour || COLOURS[i % COLOURS.length];
    const path = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg += `<path class="series" data-name="${esc(s.name)}" d="${path}" fill="none" stroke="${colour}" stroke-width="1.8"`
         + (s.dashed ? ` stroke-dasharray="5,3"` : "") + `/>`;
    if (s.dots) s.points.forEach(p => { svg += `<circle cx="${X(p[0])}" cy="${Y(p[1])}" r="3" fill="${colour}"/>`; });
  });
  const legend = series.map((s, i) => `<span style="color:${s.colour || COLOURS[i % COLOURS.length]}">`
    + `${s.dashed ? "┄" : "━"} ${esc(s.name)}</span>`).join(" &nbsp; ");
  return svg + `</svg><div class="legend">${legend}</div>`;
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
  document.querySelector("header").innerHTML = `<b>tunelab studio</b>` + links.map(([href, text]) =>
    `<a href="${href}"${href === here ? ' class="here"' : ""}>${text}</a>`).join("");
}
