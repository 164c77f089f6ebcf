"""A study's report.html: the outcome (winner against your recipe on the reported split), every trial, and
Optuna's own plots (optimisation history, parameter importances, parallel coordinates) as interactive plotly
figures, with plotly's script inlined once so that the page opens offline."""

from __future__ import annotations

import html
from pathlib import Path

import optuna

from tunelab.runs.folder import write_text_atomic
from tunelab.runs.report import STYLE
from tunelab.tune.plan import StudyPlan
from tunelab.tune.storage import open_storage

REPORT = "report.html"
# Optuna's own plots. The first three draw the trials that finished; the fourth every trial's validation loss per
# epoch as the pruner saw it (signed to the study's direction: for a score to maximise, minus the loss).
PLOTS = (("Optimisation history", optuna.visualization.plot_optimization_history),
         ("Parameter importances", optuna.visualization.plot_param_importances),
         ("Parallel coordinates", optuna.visualization.plot_parallel_coordinate),
         ("Validation loss per epoch, as the pruner saw it", optuna.visualization.plot_intermediate_values))


def write_study_report(study_dir: Path, plan: StudyPlan, summary: dict) -> Path:
    """Write report.html into the study folder; return its path."""
    study = optuna.load_study(study_name=plan.study_name, storage=open_storage(plan.storage))
    body = outcome_section(summary) + trials_section(summary) + plots_section(study)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tunelab study {html.escape(plan.study_name)}"
            f"</title><style>{STYLE}</style></head><body><h1>tunelab study: {html.escape(plan.study_name)}</h1>"
            f"{body}</body></html>")
    write_text_atomic(study_dir / REPORT, page)
    return study_dir / REPORT


def outcome_section(summary: dict) -> str:
    """What the search found and what it is worth on the reported split."""
    counts, data, final = summary["counts"], summary["data"], summary["final"]
    lines = [f"<p>{counts['complete']} trials finished, {counts['pruned']} pruned, {counts['fail']} failed, in "
             f"{summary['wall_seconds'] / 60:.1f} min. Trials were scored on validation "
             f"({html.escape(data['validation'])}, {data['validation_rows']} rows) by "
             f"{html.escape(summary['metric'])}; the reported split ({html.escape(data['reported'])}) was read only "
             "for the two final runs.</p>"]
    if final:
        values = ", ".join(f"{html.escape(key)} = {value:.4g}" if isinstance(value, float) else
                           f"{html.escape(key)} = {html.escape(str(value))}"
                           for key, value in final["best_values"].items())
        lines.append(f"<p>Best trial {final['best_trial']}: {values}.</p><table><tr><th>metric</th><th>your recipe"
                     "</th><th>tuned</th><th>gain [paired 95%]</th></tr>")
        for metric, gain in final["gain"].items():
            interval = final["intervals"][metric]
            significant = "" if gain["significant"] else " · no significant change"
            lines.append(f"<tr><td>{html.escape(metric)}</td>"
                         f"<td>{final['yours'][metric]:.4f} [{interval['yours']['low']:.3f}, "
                         f"{interval['yours']['high']:.3f}]</td><td>{final['winner'][metric]:.4f} "
                         f"[{interval['winner']['low']:.3f}, {interval['winner']['high']:.3f}]</td>"
                         f"<td>{gain['value']:+.4f} [{gain['low']:+.3f}, {gain['high']:+.3f}]{significant}</td></tr>")
        lines.append("</table>")
        lines += [f"<p>General ability, {html.escape(name)}: {html.escape(summary)}</p>"
                  for name, summary in final.get("retention", {}).items()]
        lines.append("<p>The tuned recipe: <code>best_recipe.yaml</code>.</p>")
    return "<h2>Outcome</h2>" + "".join(lines)


def trials_section(summary: dict) -> str:
    """One row per trial, linking its run folder's report."""
    keys = list(summary["space"])
    head = "".join(f"<th>{html.escape(key)}</th>" for key in keys)
    rows = []
    for trial in summary["trials"]:
        cells = "".join(f"<td>{trial['values'].get(key, '')!s:.8}</td>" for key in keys)
        score = f"{trial['score']:.4f}" if trial["score"] is not None else ""
        run = trial["run"] or ""
        link = f"<a href='{html.escape(run)}/report.html'>{html.escape(run)}</a>" if trial["state"] == "complete" \
            else html.escape(run)
        note = " (your values)" if trial["yours"] else ""
        rows.append(f"<tr><td>{trial['number']}{note}</td><td>{trial['state']}</td>{cells}<td>{score}</td>"
                    f"<td>{trial['last_epoch'] or ''}</td><td>{trial['seconds'] or ''}</td><td>{link}</td></tr>")
    return (f"<h2>Trials</h2><table><tr><th>trial</th><th>state</th>{head}<th>{html.escape(summary['metric'])}</th>"
            f"<th>last epoch</th><th>seconds</th><th>run</th></tr>{''.join(rows)}</table>")


def plots_section(study: optuna.Study) -> str:
    """Optuna's plots; one that cannot be drawn yet (e.g. importances of a single finished trial) says why."""
    parts, script_included = [], False
    for title, plot in PLOTS:
        try:
            figure = plot(study)
        except (ValueError, RuntimeError) as exc:
            parts.append(f"<h2>{title}</h2><p>Not drawn: {html.escape(str(exc))}</p>")
            continue
        parts.append(f"<h2>{title}</h2><div class='plot'>"
                     f"{figure.to_html(full_html=False, include_plotlyjs=not script_included)}</div>")
        script_included = True
    return "".join(parts)
