// Run page: live progress while training (polled every two seconds), the report once finished, stop and resume.
// Everything from the run folder goes in as text (el() in common.js), never as HTML.
"use strict";
navigation("");
const name = param("name");
let shownReport = false;

function card(label, value, id) {
  return el("div", {class: "card", id}, el("div", {}, label), el("div", {class: "value"}, value));
}

// What training cost in general ability (decoders with eval.retention): before → after with intervals, the paired
// change and its verdict, then the one-line summary.
function retentionSection(retention) {
  if (!retention) return [];
  const heads = ["probe", "metric", "before", "after", "change", "verdict"].map(h => el("th", {}, h));
  const rows = retention.rows.map(r => el("tr", {"data-probe": r.probe, "data-metric": r.metric},
    el("td", {}, r.name, r.size ? el("div", {class: "sub"}, r.size) : null), el("td", {}, r.metric),
    el("td", {class: "num"}, retentionValue(r, "before")), el("td", {class: "num"}, retentionValue(r, "after")),
    el("td", {class: `num ${VERDICT_CLASS[r.verdict] || ""}`}, retentionChange(r)),
    el("td", {class: VERDICT_CLASS[r.verdict]}, retentionVerdict(r))));
  return [el("h2", {}, "Retained general ability"),
    rows.length ? el("table", {id: "retention-table"}, el("tr", {}, heads), rows) : null,
    retention.summary ? el("p", {id: "retention-summary"}, retention.summary) : null,
    el("p", {class: "note"}, "Brackets: 95% intervals; the change's is paired (the same items before and after). ",
       "A perplexity's change is its ratio after / before, as ±%.")];
}

function render(run) {
  document.getElementById("title").textContent = run.name;
  const status = document.getElementById("status");
  status.textContent = run.status;
  status.className = `status ${run.status}`;
  document.getElementById("what").textContent = `${run.task} · ${run.model} · ${run.method}`;
  document.getElementById("study").replaceChildren(...(!run.study ? []
    : run.study.role === "trial" ? ["· a trial of study ", studyLink(run.study.name), " (its scores are on the study's "
                                    + "validation rows)"]
    : ["· a final run of study ", studyLink(run.study.name)]));
  const p = run.progress;
  const evals = Object.entries(p.latest_eval).filter(([k]) => !/runtime|per_second/.test(k))
    .map(([k, v]) => el("div", {}, `${k} ${num(v)}`));
  const cards = [
    card("step", `${p.step}${p.max_steps ? " / " + p.max_steps : ""}`, "step"),
    card("epoch", num(p.epoch, 2), "epoch"),
    card("ETA", run.status === "running" ? duration(p.eta_seconds) : "–", "eta"),
    card("latest eval", el("span", {style: "font-size:0.7em"}, evals.length ? evals : "–"), "latest-eval"),
  ];
  if (run.headline) {
    const h = run.headline;
    cards.push(card(`${h.metric} before → after`, `${num(h.before)} → ${num(h.after)}`, "headline"));
  }
  document.getElementById("cards").replaceChildren(...cards);
  document.getElementById("retention").replaceChildren(...retentionSection(run.retention));
  document.getElementById("loss").replaceChildren(lineChart(lossSeries(run.log), {yLabel: "loss"}));
  const metricSeries = ["accuracy", "macro_f1"].map(m => ({name: m, dots: true,
    points: run.log.filter(r => typeof r[`eval_${m}`] === "number").map(r => [r.epoch, r[`eval_${m}`]])}))
    .filter(s => s.points.length);
  document.getElementById("evalchart").replaceChildren(...(metricSeries.length
    ? [el("h2", {}, "Eval metrics per epoch"), lineChart(metricSeries, {xLabel: "epoch"})] : []));
  document.getElementById("stop").hidden = !["running", "queued"].includes(run.status);
  // a study's run is continued by its study (`tunelab tune --resume`), not on its own
  document.getElementById("resume").hidden = !["interrupted", "failed"].includes(run.status) || Boolean(run.study);
  const tryLink = document.getElementById("try");
  tryLink.hidden = run.status !== "finished";
  tryLink.href = `/playground?run=${encodeURIComponent(run.name)}`;
  document.getElementById("failure").replaceChildren(...(run.status === "failed" && run.error
    ? [el("h2", {}, "Why it failed"), el("pre", {class: "error"}, run.error)] : []));
  document.getElementById("recipe").textContent = run.recipe_text;
  document.getElementById("files").replaceChildren(...run.files.map(f => el("li", {},
    el("a", {href: filesURL(run.name, f.path)}, f.path),
    ` (${Number(f.bytes).toLocaleString()} bytes)`)));
  if (run.status === "finished" && !shownReport && run.files.some(f => f.path === "report.html")) {
    shownReport = true;
    document.getElementById("report").replaceChildren(el("h2", {}, "Report"),
      el("iframe", {class: "report", src: filesURL(run.name, "report.html"), title: "report"}));
  }
}

async function refresh() {
  let finished = false;
  try {
    const run = await getJSON(`/api/run?name=${encodeURIComponent(name)}`);
    render(run);
    document.getElementById("loading").textContent = "";
    finished = ["finished", "pruned"].includes(run.status);  // a pruned trial changes no more
  } catch (error) {  // a queued run has no folder until its process starts: keep asking
    document.getElementById("loading").textContent = `waiting for the run folder (${error.message})`;
  }
  if (!finished) setTimeout(refresh, 1500);
}

async function act(url) {
  document.getElementById("message").textContent = "";
  try {
    await postJSON(url, {run: name});
  } catch (error) {
    document.getElementById("message").textContent = error.message;
  }
}

document.getElementById("stop").addEventListener("click", () => act("/api/stop"));
document.getElementById("resume").addEventListener("click", () => act("/api/resume"));
refresh();
