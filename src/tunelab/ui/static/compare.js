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
  if (!keys.length) return [];
  const rows = keys.map(key => {
    const values = runs.map(r => ((r.metrics || {})[phase] || {})[key]);
    const numbers = values.filter(v => typeof v === "number");
    const best = LOWER_IS_BETTER.includes(key) ? Math.min(...numbers) : Math.max(...numbers);
    const distinct = new Set(numbers).size > 1;
    return el("tr", {}, el("td", {}, key), values.map(v => typeof v !== "number" ? el("td")
      : el("td", {class: `num${distinct && v === best ? " better" : ""}`}, num(v) + (distinct && v === best ? " ★" : ""))));
  });
  return [el("h2", {}, `Metrics ${phase} training`), el("table", {id: `metrics-${phase}`},
    el("tr", {}, el("th", {}, "metric"), runs.map(r => el("th", {}, r.name))), rows)];
}

// Each run's retained general ability side by side: per probe metric, the score after training and its paired
// change (a perplexity's as its ratio, ±%); a run that did not measure it shows a dash.
function retentionTable(runs) {
  const byRun = runs.map(r => new Map(((r.retention || {}).rows || [])
    .map(row => [`${row.probe}\u0000${row.metric}`, row])));
  const keys = [...new Set(byRun.flatMap(rows => [...rows.keys()]))];
  if (!keys.length) return [];
  const rows = keys.map(key => {
    const first = byRun.find(rows => rows.has(key)).get(key);
    return el("tr", {"data-probe": first.probe, "data-metric": first.metric},
      el("td", {}, `${first.name} · ${first.metric}`), byRun.map(rows => {
        const row = rows.get(key);
        if (!row) return el("td", {class: "num"}, "–");
        const before = `before ${retentionValue(row, "before")}`;
        return el("td", {class: `num ${VERDICT_CLASS[row.verdict] || ""}`, title: before},
          el("div", {}, retentionValue(row, "after", false)),
          el("div", {class: "sub"}, [retentionChange(row), retentionVerdict(row)].filter(Boolean).join(" · ")));
      }));
  });
  return [el("h2", {}, "Retained general ability"), el("table", {id: "retention-compare"},
    el("tr", {}, el("th", {}, "probe · metric"), runs.map(r => el("th", {}, r.name))), rows),
    el("p", {class: "note"}, "Each cell: the score after training, then its change with the paired 95% interval ",
       "(a perplexity's as its ratio, ±%) and the verdict; – : not measured (eval.retention off).")];
}

function recipeDiff(runs) {
  const flat = runs.map(r => flatten(r.recipe || {}));
  const keys = [...new Set(flat.flatMap(Object.keys))].sort()
    .filter(k => new Set(flat.map(f => f[k] ?? "(absent)")).size > 1);
  if (!keys.length) return [el("h2", {}, "Recipe differences"), el("p", {}, "The recipes are the same.")];
  return [el("h2", {}, "Recipe differences"), el("table", {id: "recipe-diff"},
    el("tr", {}, el("th", {}, "key"), runs.map(r => el("th", {}, r.name))),
    keys.map(k => el("tr", {}, el("td", {}, k), flat.map(f => el("td", {}, f[k] ?? "(absent)")))))];
}

async function compare(names) {
  const out = document.getElementById("out");
  if (names.length < 2) {
    out.replaceChildren(el("p", {}, "Pick at least two runs."));
    return;
  }
  const runs = await Promise.all(names.map(n => getJSON(`/api/run?name=${encodeURIComponent(n)}`)));
  const loss = runs.flatMap((r, i) => lossSeries(r.log, `${r.name}: `).map(s => ({...s, colour: COLOURS[i % COLOURS.length]})));
  const evalSeries = runs.flatMap((r, i) => ["accuracy", "macro_f1", "loss"].map(m => ({
    name: `${r.name}: eval ${m}`, colour: COLOURS[i % COLOURS.length], dots: true, dashed: m !== "accuracy",
    points: r.log.filter(x => typeof x[`eval_${m}`] === "number").map(x => [x.epoch, x[`eval_${m}`]])}))
    .filter(s => s.points.length && !(s.name.endsWith("eval loss") && r.log.some(x => typeof x.eval_accuracy === "number"))));
  out.replaceChildren(el("h2", {}, "Loss"),
    el("div", {id: "loss-chart"}, lineChart(loss, {yLabel: "loss", width: 760, height: 300})),
    el("h2", {}, "Eval curves"),
    el("div", {id: "eval-chart"}, lineChart(evalSeries, {xLabel: "epoch", width: 760, height: 300})),
    ...metricsTable(runs, "after"), ...retentionTable(runs), ...metricsTable(runs, "before"), ...recipeDiff(runs));
}

async function init() {
  const body = await getJSON("/api/runs");
  const chosen = (param("runs") || "").split(",").filter(Boolean);
  document.getElementById("pick").replaceChildren(...body.runs.map(r =>
    el("option", {selected: chosen.includes(r.name)}, r.name)));
  if (chosen.length) await compare(chosen);
}

document.getElementById("go").addEventListener("click", () => {
  const names = [...document.getElementById("pick").selectedOptions].map(o => o.value);
  history.replaceState(null, "", "/compare?runs=" + names.map(encodeURIComponent).join(","));
  compare(names);
});
init();
