// Study page: a `tunelab tune` study's outcome (the tuned recipe against yours, on the reported split), the validation
// score of each trial, and every trial linked to its run folder; polled every two seconds until the study finishes.
// Everything from the study folder goes in as text (el() in common.js), never as HTML.
"use strict";
navigation("");
const name = param("name");

function lowerWins(metric) {
  return /(loss|perplexity)$/.test(metric);
}

function shown(value) {
  return typeof value === "number" && !Number.isInteger(value) ? String(+value.toPrecision(4)) : String(value ?? "");
}

function span(interval) {
  return interval ? ` [${interval.low.toFixed(3)}, ${interval.high.toFixed(3)}]` : "";
}

function settings(study) {
  const data = study.data || {}, counts = study.counts, parts = [];
  if (study.metric) {
    const rows = data.validation_rows != null ? `, ${data.validation_rows} rows` : "";
    parts.push(`Trials scored by validation ${study.metric} (${study.direction === "minimize" ? "lower" : "higher"} `
      + `wins)${data.validation ? ` on ${data.validation}${rows}` : ""}`);
  }
  if (data.reported) {
    parts.push(`the final runs reported on ${data.reported}${study.refit ? " (trained on train + validation)" : ""}`);
  }
  parts.push(`${counts.complete ?? "?"} trials complete, ${counts.pruned ?? "?"} pruned, ${counts.fail ?? "?"} failed`
    + (study.planned != null ? ` (${study.planned} planned)` : "")
    + (study.wall_seconds != null ? ` in ${duration(study.wall_seconds)}` : ""));
  return parts.join("; ") + ".";
}

function links(study) {
  const final = study.final || {}, runs = final.runs || {}, parts = [];
  if (study.report) {
    parts.push(el("a", {id: "report-link", href: filesURL(study.name, "report.html")}, "report.html"),
      el("span", {class: "note"}, " (its tables; its plots are drawn by plotly's script, which the board does not run "
        + "from the runs folder: open the file itself to see them)"));
  }
  if (study.best_recipe) {
    parts.push(el("br"), "The tuned recipe: ", el("a", {href: filesURL(study.name, "best_recipe.yaml")},
      "best_recipe.yaml"), " (tunelab train best_recipe.yaml)");
  }
  if (runs.yours || runs.winner) {
    parts.push(el("br"), "Final runs: ", runs.yours ? runLink(runs.yours) : "", " ",
      runs.winner && runs.winner !== runs.yours ? runLink(runs.winner) : "");
    if (runs.yours && runs.winner && runs.winner !== runs.yours) {
      parts.push(" · ", el("a", {href: "/compare?runs=" + [runs.yours, runs.winner].map(encodeURIComponent).join(",")},
        "compare them"));
    }
  }
  return parts;
}

// The two final runs on the reported split: each score with its 95% interval, the gain with its paired one.
function outcome(study) {
  const final = study.final;
  if (!final) return [];
  const best = Object.entries(final.best_values || {}).map(([key, value]) => `${key} = ${shown(value)}`).join(", ");
  const heads = ["metric", "your recipe", "tuned", "gain [paired 95%]", "verdict"].map(h => el("th", {}, h));
  const rows = Object.entries(final.gain || {}).map(([metric, gain]) => {
    const intervals = (final.intervals || {})[metric] || {};
    const better = gain.significant && (gain.value > 0) !== lowerWins(metric);
    const verdict = !gain.significant ? "no significant change" : better ? "better" : "worse";
    return el("tr", {"data-metric": metric}, el("td", {}, metric),
      el("td", {class: "num"}, num((final.yours || {})[metric]) + span(intervals.yours)),
      el("td", {class: "num"}, num((final.winner || {})[metric]) + span(intervals.winner)),
      el("td", {class: `num ${gain.significant ? (better ? "gain" : "drop") : ""}`},
        `${signed(gain.value, 4)} [${signed(gain.low)}, ${signed(gain.high)}]`),
      el("td", {}, verdict + (typeof gain.p_value === "number" ? ` (p = ${+gain.p_value.toPrecision(3)})` : "")));
  });
  return [el("h2", {}, `Outcome on ${final.reported_on ?? "the reported split"}`),
    final.best_trial != null ? el("p", {}, `Best trial ${final.best_trial}${best ? `: ${best}` : ""}`
      + (final.best_validation_score != null ? ` (validation ${study.metric} ${num(final.best_validation_score)})` : "")
      + ".") : null,
    rows.length ? el("table", {id: "outcome-table"}, el("tr", {}, heads), rows) : null];
}

function history(study) {
  const scored = study.trials.filter(t => t.state === "complete" && typeof t.score === "number");
  const sign = study.direction === "minimize" ? -1 : 1;
  let best = null;
  const bestSoFar = scored.map(t => {
    best = best === null || sign * t.score > sign * best ? t.score : best;
    return [t.number, best];
  });
  return lineChart([{name: `trial's validation ${study.metric}`, points: scored.map(t => [t.number, t.score]),
                     dots: true, line: false},
                    {name: "best so far", points: bestSoFar}], {xLabel: "trial", yLabel: study.metric ?? ""});
}

function trialsTable(study) {
  const bestNumber = (study.final || {}).best_trial;
  const heads = ["trial", "state", ...study.keys, study.metric ?? "score", "last epoch", "seconds", "run"];
  return [el("tr", {}, heads.map(h => el("th", {}, h))), ...study.trials.map(t => el("tr", {"data-trial": t.number},
    el("td", {}, String(t.number), t.yours ? el("div", {class: "sub"}, "your values") : null),
    el("td", {}, el("span", {class: `status ${t.state ?? ""}`}, t.state ?? "")),
    study.keys.map(key => el("td", {class: "num"}, shown((t.values || {})[key]))),
    el("td", {class: `num ${t.number === bestNumber ? "better" : ""}`}, num(t.score)),
    el("td", {class: "num"}, shown(t.last_epoch)), el("td", {class: "num"}, shown(t.seconds)),
    el("td", {}, t.run ? runLink(t.run) : "")))];
}

function render(study) {
  document.getElementById("title").textContent = `Study ${study.study}`;
  const status = document.getElementById("status");
  status.textContent = study.status;
  status.className = `status ${study.status}`;
  document.getElementById("what").textContent = `${study.task ?? "?"} · ${study.model ?? "?"} · ${study.name}`;
  document.getElementById("settings").textContent = settings(study);
  document.getElementById("links").replaceChildren(...links(study));
  document.getElementById("outcome").replaceChildren(...outcome(study));
  document.getElementById("history").replaceChildren(history(study));
  document.getElementById("trials").replaceChildren(...trialsTable(study));
}

async function refresh() {
  let finished = false;
  try {
    const study = await getJSON(`/api/study?name=${encodeURIComponent(name)}`);
    render(study);
    document.getElementById("loading").textContent = "";
    finished = study.status === "finished";
  } catch (error) {
    document.getElementById("loading").textContent = error.message;
  }
  if (!finished) setTimeout(refresh, 2000);
}

refresh();
