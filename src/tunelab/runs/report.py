"""report.html: a self-contained page (plots inlined as PNG) a person reads to judge a run."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

from tunelab.console import percent, signed  # noqa: E402
from tunelab.runs.folder import write_text_atomic  # noqa: E402
from tunelab.runs.reading import retention_rows, typed_retention  # noqa: E402

STYLE = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}.gain{color:#070}.loss{color:#a00}pre{background:#f6f6f6;padding:1em;
overflow:auto}img{max-width:100%}.retention :is(td,th):is(:nth-child(2),:nth-child(6)){text-align:left}
.retention td:is(:nth-child(3),:nth-child(4),:nth-child(5)){white-space:nowrap}"""


def figure_to_img(fig) -> str:
    """An <img> tag holding the figure as an inline PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def loss_plot(history: list[dict]) -> str | None:
    """Training loss per step, with eval loss per evaluation when present."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return figure_to_img(fig)


def metric_plot(history: list[dict], names: list[str]) -> str | None:
    """Eval metrics per epoch."""
    points = [h for h in history if any(f"eval_{n}" in h for n in names)]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for name in names:
        series = [(h["epoch"], h[f"eval_{name}"]) for h in points if f"eval_{name}" in h]
        if series:
            ax.plot(*zip(*series, strict=True), "o-", label=name)
    ax.set_xlabel("epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    return figure_to_img(fig)


def confusion_plot(matrix: list[list[int]], labels: list[str]) -> str:
    """Confusion matrix heat map, gold labels as rows."""
    size = max(4.0, 0.38 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="white" if value > peak / 2 else "black")
    return figure_to_img(fig)


def before_after_table(before: dict, after: dict, intervals: dict | None = None, gains: dict | None = None) -> str:
    """Rows of scalar metrics with their change; headline metrics with 95% intervals, and a change whose paired
    interval includes 0 is written as no significant change rather than coloured as a gain."""
    intervals, gains = intervals or {}, gains or {}
    rows = []
    for key, old in before.items():
        new = after.get(key)
        if not isinstance(old, int | float) or not isinstance(new, int | float):
            continue
        change = new - old
        better = change >= 0 if key not in ("loss", "perplexity") else change <= 0
        span = intervals.get(key, {})
        cells = [f"{old:.4f}{bounds(span.get('before'))}", f"{new:.4f}{bounds(span.get('after'))}"]
        gain = gains.get(key)
        if gain and not gain["significant"]:
            verdict = f"<td>no significant change ({change:+.4f}{bounds(gain)})</td>"
        else:
            verdict = f"<td class={'gain' if better else 'loss'}>{change:+.4f}{bounds(gain)}</td>"
        rows.append(f"<tr><td>{html.escape(key)}</td><td>{cells[0]}</td><td>{cells[1]}</td>{verdict}</tr>")
    return ("<table><tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>" + "".join(rows)
            + "</table><p>Brackets: 95% bootstrap intervals over the eval rows; the change's is paired (the same "
              "rows before and after).</p>")


def bounds(span: dict | None, digits: str = ".3f") -> str:
    """' [low, high]' of an interval, or nothing."""
    return f" [{span['low']:{digits}}, {span['high']:{digits}}]" if span else ""


def selection_paragraph(metrics: dict) -> str:
    """In words: which split was reported and which (if any) picked the checkpoint."""
    reported = html.escape(str(metrics.get("reported_on") or metrics.get("eval_split")))
    selected = metrics.get("selected_on")
    if selected:
        return (f"<p>Scores are on <b>{reported}</b>. The checkpoint was picked on <b>{html.escape(selected)}</b>, "
                f"a different split: the reported rows played no part in training or selection.</p>")
    return (f"<p>Scores are on <b>{reported}</b>. No checkpoint was picked: the model is the last one, so the "
            f"reported rows played no part in training or selection.</p>")


def per_class_table(per_class: dict) -> str:
    """Precision, recall, F1 and support for each label."""
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
                   f"<td>{m['f1']:.3f}</td><td>{m['support']}</td></tr>" for label, m in per_class.items())
    return ("<table><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
            + rows + "</table>")


def retention_section(block: dict) -> str | None:
    """The general ability a decoder kept: per probe metric, before and after with their 95% intervals, the paired
    change (accuracies: a difference; perplexities: a ratio, as ±%) and its verdict; then the one-line summary. The
    block is read as the board reads it (runs/reading.py), so a part that does not fit is left out, never fatal;
    None when nothing of it does."""
    retention = typed_retention(block)
    if retention is None:
        return None
    rows = []
    for row in retention_rows(retention):
        digits = ".1f" if row["ratio"] is not None else ".3f"
        if row["ratio"] is not None:
            change = f"{percent(row['ratio'])}{signed_bounds(row, percent)}"
        elif row["change"] is not None:
            change = f"{signed(row['change'])}{signed_bounds(row, signed)}"
        else:
            change = ""
        verdict = row["verdict"] or ""
        if verdict and row["p_value"] is not None:
            verdict += f" (p = {row['p_value']:.3g})"
        css = {"better": " class=gain", "worse": " class=loss"}.get(row["verdict"], "")
        size = f" ({html.escape(row['size'])})" if row["size"] else ""
        rows.append(f"<tr><td>{html.escape(row['name'])}{size}</td><td>{html.escape(row['metric'])}</td>"
                    f"<td>{row['before']:{digits}}{bounds(row['interval_before'], digits)}</td>"
                    f"<td>{row['after']:{digits}}{bounds(row['interval_after'], digits)}</td>"
                    f"<td{css}>{change}</td><td{css}>{html.escape(verdict)}</td></tr>")
    table = ("<table class=retention><tr><th>probe</th><th>metric</th><th>before</th><th>after</th><th>change</th>"
             "<th>verdict</th></tr>" + "".join(rows) + "</table>") if rows else ""
    summary = f"<p>{html.escape(retention['summary'])}</p>" if retention.get("summary") else ""
    seconds = f" Scoring them before and after took {retention['seconds']:.1f} s." if "seconds" in retention else ""
    return (table + summary + "<p>General-ability probes, scored on the same items before and after training. "
            "Brackets: 95% bootstrap intervals; the change's is paired, and a change whose interval includes no "
            f"change is not significant. A perplexity's change is its ratio after / before, as ±%.{seconds}</p>")


def signed_bounds(row: dict, written) -> str:
    """' [low, high]' of a change's interval, each bound written like the change itself, or nothing."""
    if row["low"] is None or row["high"] is None:
        return ""
    return f" [{written(row['low'])}, {written(row['high'])}]"


def write_report(run_dir: Path, title: str, metrics: dict, recipe_yaml: str, labels: list[str] | None = None,
                 extra_sections: list[tuple[str, str]] | None = None) -> Path:
    """Write `report.html` for a finished run and return its path."""
    before, after = metrics["before"], metrics["after"]
    history = metrics.get("history", [])
    sections = [("Before and after training", before_after_table(before, after, metrics.get("intervals"),
                                                                 metrics.get("gain")) + selection_paragraph(metrics)),
                ("Run", f"<p>{metrics['trainable_params']:,} trainable parameters "
                        f"({metrics.get('trainable_percent', 0):.2f}%), trained for {metrics['train_seconds']:.1f} s "
                        f"at {metrics['train_samples_per_second']:.2f} samples/s"
                        + (f", on {metrics['shots']} examples per class" if metrics.get("shots") else "") + ".</p>")]
    retained = retention_section(metrics["retention"]) if "retention" in metrics else None
    if retained:  # decoders with eval.retention: what the training cost in general ability
        sections.insert(1, ("Retained general ability", retained))
    if len(metrics.get("chain", [])) > 1:  # this run started from an earlier one: show how it came about
        sections.append(("Started from", "<p>" + " → ".join(html.escape(str(link)) for link in metrics["chain"])
                         + " → this run</p>"))
    if "judge" in metrics:
        sections.append(("Win rate over the starting model", win_rate_paragraph(metrics["win_rate"],
                                                                                metrics["judge"],
                                                                                metrics.get("win_rate_interval"))))
    if "in_context" in metrics:
        sections.append(("In-context baseline (no training)", in_context_paragraph(metrics["in_context"])))
    per_epoch = "Validation metrics per epoch" if metrics.get("selected_on") else "Eval metrics per epoch"
    for heading, image in [("Loss", loss_plot(history)), (per_epoch, metric_plot(history, ["accuracy", "macro_f1"]))]:
        if image:
            sections.append((heading, image))
    if labels and "confusion_matrix" in after:
        sections.append(("Confusion matrix after training", confusion_plot(after["confusion_matrix"], labels)))
    if "per_class" in after:
        sections.append(("Per class after training", per_class_table(after["per_class"])))
    sections += extra_sections or []
    sections.append(("Recipe", f"<pre>{html.escape(recipe_yaml)}</pre>"))
    return write_page(run_dir / "report.html", title, sections)


def samples_table(path: Path, limit: int = 12) -> str:
    """The first sample generations (prompt, reference, before, after) of samples.jsonl as a table."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:limit]]
    cells = "".join("<tr>" + "".join(f"<td><pre>{html.escape(row[key])}</pre></td>"
                                     for key in ("prompt", "reference", "before", "after")) + "</tr>" for row in rows)
    return (f"<p>The first {len(rows)} of the scored eval prompts; all are in samples.jsonl.</p><table><tr>"
            "<th>prompt</th><th>reference</th><th>before</th><th>after</th></tr>" + cells + "</table>")


def win_rate_paragraph(rate: float, judge: dict, span: dict | None = None) -> str:
    """How the judge compared the trained model's answers with the starting model's, prompt by prompt."""
    return (f"<p>Judged by {html.escape(judge['source'])} on {judge['judged_prompts']} held-out prompts, the trained "
            f"model's answer scored higher on {judge['wins']}, the same on {judge['ties']} and lower on "
            f"{judge['losses']}: <b>win rate {rate:.3f}{bounds(span)}</b> (a tie counts half; 0.5 = no better than "
            f"before). The answers of both are in samples.jsonl.</p>")


def in_context_paragraph(scores: dict) -> str:
    """The untrained decoder prompted with k examples per class, beside the fine-tuned numbers above."""
    return (f"<p>The model before training, prompted with {scores['shots']} labelled examples per class "
            f"({scores['prompt_tokens']:,} prompt tokens) and picking the most likely label name: accuracy "
            f"{scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f}.</p>")


def write_page(path: Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write a self-contained HTML page of (heading, HTML content) sections and return its path."""
    body = "".join(f"<h2>{html.escape(heading)}</h2>{content}" for heading, content in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    write_text_atomic(path, page)
    return path
