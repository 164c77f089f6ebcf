// Runs page: the table of run folders, sortable, refreshed every two seconds.
"use strict";
navigation("/");
let sortKey = "started", descending = true, rows = [];
const selected = new Set();

function sortValue(row, key) {
  if (key === "after") return row.headline ? row.headline.after : -Infinity;
  return row[key] ?? "";
}

function render() {
  const sorted = [...rows].sort((a, b) => {
    const x = sortValue(a, sortKey), y = sortValue(b, sortKey);
    return (x < y ? -1 : x > y ? 1 : 0) * (descending ? -1 : 1);
  });
  document.querySelector("#runs tbody").replaceChildren(...sorted.map(row => {
    const h = row.headline;
    const change = h ? [`${h.metric} ${num(h.before)} → `, el("b", {}, num(h.after))] : "";
    const speed = typeof row.samples_per_second === "number" ? row.samples_per_second.toFixed(2) : "";
    const pick = el("input", {type: "checkbox", class: "pick", value: row.name, checked: selected.has(row.name)});
    pick.addEventListener("change", () => { pick.checked ? selected.add(row.name) : selected.delete(row.name); });
    const tr = el("tr", {}, el("td", {}, pick), el("td", {}, runLink(row.name)), el("td", {}, row.task ?? ""),
      el("td", {}, row.model ?? ""), el("td", {}, row.method ?? ""),
      el("td", {}, el("span", {class: `status ${row.status}`}, row.status)), el("td", {}, change),
      el("td", {class: "num"}, speed), el("td", {}, new Date(row.started * 1000).toLocaleString()));
    tr.dataset.run = row.name;
    return tr;
  }));
}

// Studies (`tunelab tune`): one row each, linking the study's page and its report.html.
function renderStudies(studies) {
  document.getElementById("studies").hidden = !studies.length;
  document.querySelector("#studies-table tbody").replaceChildren(...studies.map(study => {
    const counts = ["complete", "pruned", "fail"].map(state => study.counts[state] ?? "?").join(" · ");
    const planned = study.planned != null ? ` of ${study.planned}` : "";
    const verdict = study.verdict
      ? (study.verdict.metric !== study.metric ? `${study.verdict.metric}: ` : "") + study.verdict.text : "";
    const metric = study.metric ? `${study.metric} (${study.direction === "minimize" ? "lower" : "higher"} wins)` : "";
    const tr = el("tr", {}, el("td", {}, studyLink(study.name)), el("td", {}, study.task ?? ""),
      el("td", {}, study.model ?? ""), el("td", {}, metric), el("td", {class: "num"}, counts + planned),
      el("td", {class: "num"}, num(study.best)), el("td", {class: "verdict"}, verdict),
      el("td", {}, el("span", {class: `status ${study.status}`}, study.status)),
      el("td", {}, study.report ? el("a", {href: filesURL(study.name, "report.html")}, "report.html") : ""));
    tr.dataset.study = study.name;
    return tr;
  }));
}

function renderJobs(jobs) {
  const lines = [];
  if (jobs.current) lines.push(["running: ", runLink(jobs.current.run)]);
  jobs.queued.forEach(job => lines.push(`queued: ${job.run}`));
  jobs.ended.filter(job => job.state === "failed").slice(-3).forEach(job =>
    lines.push([`failed: ${job.run} `, el("pre", {class: "error"}, job.error ?? "")]));
  document.getElementById("jobs").replaceChildren(...(lines.length
    ? [el("h2", {}, "Board's jobs"), el("p", {}, lines.flatMap((line, i) => i ? [el("br"), line] : [line]))] : []));
}

async function refresh() {
  try {
    const body = await getJSON("/api/runs");
    rows = body.runs;
    render();
    renderStudies(body.studies);
    renderJobs(body.jobs);
  } finally {
    setTimeout(refresh, 2000);
  }
}

document.querySelectorAll("th.sortable").forEach(th => th.addEventListener("click", () => {
  descending = sortKey === th.dataset.key ? !descending : false;
  sortKey = th.dataset.key;
  render();
}));
document.getElementById("compare").addEventListener("click", () => {
  location.href = "/compare?runs=" + [...selected].map(encodeURIComponent).join(",");
});
refresh();
