// Compare page: loss and eval curves overlaid, metrics side by side (the better value marked), recipe differences.
"use strict";
navigation("/compare");
const LOWER_IS_BETTER = ["loss", "perplexity"];

function flatten(value, prefix = "", out = {}) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    Object.entries(value).forEach(([k, v]) => flatten(v, prefix ? `${prefix}.${k}` : k, out));
  } else {
    out[prefix] = JSON.stringify(value);
  }
  return out;
}

function metricsTable(runs, phase) {
  const keys = [...new Set(runs.flatMap(r => Object.keys((r.metrics || {})[phase] || {})))]
    .filter(k => runs.some(r => typeof ((r.metrics || {})[phase] || {})[k] === "number"));
  if (!keys.length) return "";
  const rows = keys.map(key => {
    const values = runs.map(r => ((r.metrics || {})[phase] || {})[key]);
    const numbers = values.filter(v => typeof v === "number");
    const best = LOWER_IS_BETTER.includes(key) ? Math.min(...numbers) : Math.max(...numbers);
    const distinct = new Set(numbers).size > 1;
    return `<tr><td>${esc(key)}</td>` + values.map(v => typeof v !== "number" ? "<td></td>"
      : `<td class="num${distinct && v === best ? " better" : ""}">${num(v)}${distinct && v === best ? " ★" : ""}</td>`).join("") + "</tr>";
  }).join("");
  return `<h2>Metrics ${phase} training</h2><table id="metrics-${phase}"><tr><th>metric</th>`
       + runs.map(r => `<th>${esc(r.name)}</th>`).join("") + `</tr>${rows}</table>`;
}

function recipeDiff(runs) {
  const flat = runs.map(r => flatten(r.recipe || {}));
  const keys = [...new Set(flat.flatMap(Object.keys))].sort()
    .filter(k => new Set(flat.map(f => f[k] ?? "(absent)")).size > 1);
  if (!keys.length) return "<h2>Recipe differences</h2><p>The recipes are the same.</p>";
  return `<h2>Recipe differences</h2><table id="recipe-diff"><tr><th>key</th>` + runs.map(r => `<th>${esc(r.name)}</th>`).join("")
       + "</tr>" + keys.map(k => `<tr><td>${esc(k)}</td>` + flat.map(f => `<td>${esc(f[k] ?? "(absent)")}</td>`).join("") + "</tr>").join("")
       + "</table>";
}

async function compare(names) {
  const out = document.getElementById("out");
  if (names.length < 2) {
    out.innerHTML = "<p>Pick at least two runs.</p>";
    return;
  }
  const runs = await Promise.all(names.map(n => getJSON(`/api/run?name=${encodeURIComponent(n)}`)));
  const loss = runs.flatMap((r, i) => lossSeries(r.log, `${r.name}: `).map(s => ({...s, colour: COLOURS[i % COLOURS.length]})));
  const evalSeries = runs.flatMap((r, i) => ["accuracy", "macro_f1", "loss"].map(m => ({
    name: `${r.name}: eval ${m}`, colour: COLOURS[i % COLOURS.length], dots: true, dashed: m !== "accuracy",
    points: r.log.filter(x => typeof x[`eval_${m}`] === "number").map(x => [x.epoch, x[`eval_${m}`]])}))
    .filter(s => s.points.length && !(s.name.endsWith("eval loss") && r.log.some(x => typeof x.eval_accuracy === "number"))));
  out.innerHTML = `<h2>Loss</h2><div id="loss-chart">${lineChart(loss, {yLabel: "loss", width: 760, height: 300})}</div>`
    + `<h2>Eval curves</h2><div id="eval-chart">${lineChart(evalSeries, {xLabel: "epoch", width: 760, height: 300})}</div>`
    + metricsTable(runs, "after") + metricsTable(runs, "before") + recipeDiff(runs);
}

async function init() {
  const body = await getJSON("/api/runs");
  const chosen = (param("runs") || "").split(",").filter(Boolean);
  document.getElementById("pick").innerHTML = body.runs.map(r =>
    `<option${chosen.includes(r.name) ? " selected" : ""}>${esc(r.name)}</option>`).join("");
  if (chosen.length) await compare(chosen);
}

document.getElementById("go").addEventListener("click", () => {
  const names = [...document.getElementById("pick").selectedOptions].map(o => o.value);
  history.replaceState(null, "", "/compare?runs=" + names.map(encodeURIComponent).join(","));
  compare(names);
});
init();
