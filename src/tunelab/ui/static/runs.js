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
  document.querySelector("#runs tbody").innerHTML = sorted.map(row => {
    const h = row.headline;
    const change = h ? `${esc(h.metric)} ${num(h.before)} → <b>${num(h.after)}</b>` : "";
    return `<tr data-run="${esc(row.name)}">
      <td><input type="checkbox" class="pick" value="${esc(row.name)}"${selected.has(row.name) ? " checked" : ""}></td>
      <td>${runLink(row.name)}</td><td>${esc(row.task)}</td><td>${esc(row.model)}</td><td>${esc(row.method)}</td>
      <td><span class="status ${row.status}">${row.status}</span></td><td>${change}</td>
      <td class="num">${row.samples_per_second ? row.samples_per_second.toFixed(2) : ""}</td>
      <td>${new Date(row.started * 1000).toLocaleString()}</td></tr>`;
  }).join("");
  document.querySelectorAll(".pick").forEach(box => box.addEventListener("change", () => {
    box.checked ? selected.add(box.value) : selected.delete(box.value);
  }));
}

function renderJobs(jobs) {
  const lines = [];
  if (jobs.current) lines.push(`running: ${runLink(jobs.current.run)}`);
  jobs.queued.forEach(job => lines.push(`queued: ${esc(job.run)}`));
  jobs.ended.filter(job => job.state === "failed").slice(-3).forEach(job =>
    lines.push(`failed: ${esc(job.run)} <pre class="error">${esc(job.error)}</pre>`));
  document.getElementById("jobs").innerHTML = lines.length ? "<h2>Board's jobs</h2><p>" + lines.join("<br>") + "</p>" : "";
}

async function refresh() {
  try {
    const body = await getJSON("/api/runs");
    rows = body.runs;
    render();
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
