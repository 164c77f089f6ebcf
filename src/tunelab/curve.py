"""Learning curves: "how many labelled examples do I need, and which method should I train?"

One recipe runs at several training-set sizes (k examples per class, or all rows), seeds and methods. Every
run is an ordinary run folder under `<curve>/runs/`; the curve folder gets a table of the eval metric
(mean ± sample std over seeds) as curve.csv and curve.json, and report.html with the metric plotted against k,
one line per method, error bars = std. Re-running the same command into the same folder continues an
interrupted curve: finished runs are reused, an unfinished one is resumed.

Methods (`--methods`):
  fewshot                       task fewshot (SetFit-style contrastive tuning + logistic-regression head)
  full, lora, dora, ia3, prompt task classify with that method (the recipe's own options kept for its method)
  freeze:head                   task classify, freeze everything but the head
  freeze:topN                   … and train the top N transformer layers (e.g. freeze:top2)
  freeze:gradual                … unfreezing one more layer from the top each epoch
Seed i sets data.seed and train.seed to the recipe's seeds + i: each seed draws other examples and another
initialisation. A numeric k sets data.shots = k (and data.train_size = null); `all` keeps the recipe's data.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunelab.console import say
from tunelab.errors import TunelabError
from tunelab.recipe import Recipe, load_recipe
from tunelab.runs.folder import RunFolder, write_json_atomic, write_text_atomic
from tunelab.tasks import tasks_that

SPEC_FILE = "curve_spec.json"
CLASSIFY_METHODS = ("full", "lora", "dora", "ia3", "prompt")
METRICS = ("accuracy", "macro_f1")


@dataclass(frozen=True)
class CurvePoint:
    """One run of the curve: a method at k shots (None: all rows) with one seed."""

    method: str
    shots: int | None
    seed: int

    @property
    def folder_name(self) -> str:
        """The run's folder under <curve>/runs/."""
        return f"{self.method.replace(':', '-')}-k{self.shots or 'all'}-seed{self.seed}"


def parse_shots(text: str) -> list[int | None]:
    """'4,8,16,all' → [4, 8, 16, None] (None = all rows), or a one-line error."""
    values: list[int | None] = []
    for item in (part.strip() for part in text.split(",")):
        if item == "all":
            value = None
        elif item.isdigit() and int(item) >= 1:
            value = int(item)
        else:
            raise TunelabError(f"--shots '{text}': '{item}' is not a number of examples per class (≥ 1) or 'all'; "
                               f"give e.g. --shots 4,8,16,all")
        if value in values:
            raise TunelabError(f"--shots '{text}' names '{item}' twice")
        values.append(value)
    return sorted(values, key=lambda v: math.inf if v is None else v)


def parse_methods(text: str) -> list[str]:
    """'fewshot,full,freeze:top2' → the method names, each checked (see the module docstring)."""
    methods = [item.strip() for item in text.split(",") if item.strip()]
    if not methods:
        raise TunelabError("--methods is empty; give e.g. --methods fewshot,full,lora")
    for method in methods:
        method_overrides(method, "full")  # raises on an unknown name
    if len(set(methods)) != len(methods):
        raise TunelabError(f"--methods '{text}' names a method twice")
    return methods


def method_overrides(method: str, recipe_method: str) -> list[str]:
    """The recipe overrides that turn a recipe into `method`; the recipe's own method keeps its options."""
    if method == "fewshot":
        return ["task=fewshot", "method={name: full}"]
    classify = ["task=classify", "fewshot=null"]  # the recipe's fewshot section configures the fewshot points only
    if method in CLASSIFY_METHODS:
        return classify + ([] if method == recipe_method else [f"method={{name: {method}}}"])
    variant = re.fullmatch(r"freeze:(head|top(\d+)|gradual)", method)
    if variant is None:
        raise TunelabError(f"--methods: unknown method '{method}'; use fewshot, {', '.join(CLASSIFY_METHODS)}, "
                           f"freeze:head, freeze:topN (e.g. freeze:top2) or freeze:gradual")
    options = {"head": "train_top_layers: 0", "gradual": "unfreeze_schedule: 1"}.get(
        variant.group(1), f"train_top_layers: {variant.group(2)}")
    return [*classify, f"method={{name: freeze, {options}}}"]


def point_recipe(recipe_path: Path, overrides: list[str], base: Recipe, point: CurvePoint) -> Recipe:
    """The recipe of one curve point: the base recipe with the point's method, shots and seed."""
    size = ["data.shots=null"] if point.shots is None else [f"data.shots={point.shots}", "data.train_size=null"]
    seeds = [f"data.seed={base.data.seed + point.seed}", f"train.seed={base.train.seed + point.seed}"]
    name = f"name={base.name}-{point.folder_name}"
    return load_recipe(recipe_path, [*overrides, *method_overrides(point.method, base.method.name), *size, *seeds,
                                     name])


def curve_recipe(recipe_path: Path, overrides: list[str]) -> Recipe:
    """The recipe the curve's points vary. A classify recipe may carry a fewshot section, the options of the curve's
    fewshot points, which a classify run does not take: it is set aside here and kept for those points."""
    raw = yaml.safe_load(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else None
    fewshot = isinstance(raw, dict) and raw.get("task") == "fewshot"
    return load_recipe(recipe_path, [*overrides, *([] if fewshot else ["fewshot=null"])])


def run_curve(recipe_path: str | Path, shots: list[int | None], seeds: int, methods: list[str] | None = None,
              output: str | None = None, overrides: list[str] | None = None, metric: str = "accuracy") -> Path:
    """Run every (k, seed, method) point, write the table and report, and return the curve folder."""
    from tunelab import api  # the API imports every stage; the curve's parsing helpers stay light without it

    recipe_path, overrides = Path(recipe_path), list(overrides or [])
    base = curve_recipe(recipe_path, overrides)
    methods = methods or ["fewshot" if base.task == "fewshot" else base.method.name]
    spec = {"recipe": str(recipe_path), "overrides": overrides, "shots": shots, "seeds": seeds,
            "methods": methods, "metric": metric}
    points = [CurvePoint(method, k, seed) for k in shots for seed in range(seeds) for method in methods]
    recipes = {point: point_recipe(recipe_path, overrides, base, point) for point in points}
    for point in points:  # data and model problems show before anything runs (checked once per method and k)
        if point.seed == 0:
            api.check_recipe(recipes[point])
    folder = open_curve_folder(Path(output) if output else default_curve_path(base), spec)

    results = []
    for number, point in enumerate(points, 1):
        run_dir = folder / "runs" / point.folder_name
        say(f"tunelab curve: run {number}/{len(points)}: {point.method}, "
              f"k={point.shots or 'all'}, seed {point.seed} → {run_dir}")
        if RunFolder(run_dir).finished:
            metrics = RunFolder(run_dir).metrics
        else:
            _, metrics = api.train(recipes[point], str(run_dir), resume=run_dir.exists())
        results.append(point_result(point, metrics, run_dir.relative_to(folder)))
        write_curve(folder, spec, results, metric)  # partial results survive an interrupted curve
    say(f"tunelab curve: table {folder / 'curve.csv'}; report {folder / 'report.html'}")
    return folder


def run_seeds(recipe_path: str | Path, recipe: Recipe, seeds: int, output: str | None = None,
              overrides: list[str] | None = None) -> tuple[Path, dict]:
    """`tunelab train --seeds N`: the recipe as one curve point (its own data size and method) over N seeds, in
    one folder; returns it and the mean and sample std of accuracy and macro-F1 over the seeds."""
    if not recipe.entry.labels:
        raise TunelabError(f"--seeds averages accuracy and macro-F1 over runs of tasks "
                           f"{', '.join(tasks_that('labels'))}; for task {recipe.task} run `tunelab train` once per "
                           f"train.seed=N instead")
    output = output or str(Path(recipe.output.root) / f"{recipe.name}-seeds-{time.strftime('%Y%m%d-%H%M%S')}")
    method = "fewshot" if recipe.task == "fewshot" else recipe.method.name
    folder = run_curve(recipe_path, [recipe.data.shots], seeds, [method], output, overrides)
    table = json.loads((folder / "curve.json").read_text(encoding="utf-8"))["table"][0]
    return folder, {name: {"mean": round(table[f"{name}_mean"], 6), "std": round(table[f"{name}_std"], 6)}
                    for name in METRICS}


def default_curve_path(recipe: Recipe) -> Path:
    """`<output.root>/<recipe name>-curve-<timestamp>`."""
    return Path(recipe.output.root) / f"{recipe.name}-curve-{time.strftime('%Y%m%d-%H%M%S')}"


def open_curve_folder(folder: Path, spec: dict) -> Path:
    """Create the curve folder, or reopen one that the same command started (to continue it)."""
    saved = folder / SPEC_FILE
    if saved.is_file():
        if json.loads(saved.read_text(encoding="utf-8")) != json.loads(json.dumps(spec)):
            raise TunelabError(f"curve folder '{folder}' was started with other settings ({saved}); give a new "
                               f"--output, or the same recipe, overrides, --shots, --seeds, --methods to continue it")
        return folder
    if folder.exists():
        raise TunelabError(f"output folder '{folder}' already exists and is not a curve folder; choose a new --output")
    folder.mkdir(parents=True)
    write_json_atomic(saved, spec)
    return folder


def point_result(point: CurvePoint, metrics: dict, run: Path) -> dict:
    """One row of curve.json's points."""
    return {"method": point.method, "shots": point.shots if point.shots is not None else "all", "seed": point.seed,
            "train_rows": metrics["train_rows"], **{m: metrics["after"][m] for m in METRICS},
            **{f"before_{m}": metrics["before"][m] for m in METRICS},
            "train_seconds": metrics["train_seconds"], "run": str(run)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[dict]) -> list[dict]:
    """Mean ± std over seeds for each (method, k), in the order the points first appear."""
    groups: dict[tuple[str, object], list[dict]] = {}
    for row in results:
        groups.setdefault((row["method"], row["shots"]), []).append(row)
    table = []
    for (method, shots), rows in groups.items():
        summary = {"method": method, "shots": shots, "seeds": len(rows),
                   "train_rows": round(statistics.fmean(r["train_rows"] for r in rows))}
        for name in [*METRICS, "before_accuracy"]:
            summary[f"{name}_mean"], summary[f"{name}_std"] = mean_std([r[name] for r in rows])
        summary["train_seconds_mean"] = statistics.fmean(r["train_seconds"] for r in rows)
        table.append(summary)
    return table


def write_curve(folder: Path, spec: dict, results: list[dict], metric: str) -> None:
    """curve.csv (the table), curve.json (spec, every point, the table) and report.html (plot + table)."""
    table = summarise(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: round(value, 6) if isinstance(value, float) else value for key, value in row.items()}
                     for row in table)
    write_text_atomic(folder / "curve.csv", buffer.getvalue())
    write_json_atomic(folder / "curve.json", {"spec": spec, "points": results, "table": table})
    write_curve_report(folder, spec, results, table, metric)


def write_curve_report(folder: Path, spec: dict, results: list[dict], table: list[dict], metric: str) -> Path:
    """report.html: the metric against k per method (error bars = std over seeds), the table, the runs."""
    from tunelab.runs.report import write_page

    rows = "".join(
        f"<tr><td>{html.escape(r['method'])}</td><td>{r['shots']}</td><td>{r['train_rows']}</td><td>{r['seeds']}</td>"
        f"<td>{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}</td><td>{r['macro_f1_mean']:.4f} ± "
        f"{r['macro_f1_std']:.4f}</td><td>{r['before_accuracy_mean']:.4f}</td><td>{r['train_seconds_mean']:.1f}</td>"
        f"</tr>" for r in table)
    table_html = ("<table><tr><th>method</th><th>k per class</th><th>train rows</th><th>seeds</th>"
                  "<th>accuracy (mean ± std)</th><th>macro-F1 (mean ± std)</th><th>accuracy before</th>"
                  "<th>train s</th></tr>" + rows + "</table>")
    runs = "".join(f"<li><a href='{html.escape(r['run'])}/report.html'>{html.escape(r['run'])}</a>: "
                   f"{metric} {r[metric]:.4f}</li>" for r in results)
    command = (f"tunelab curve {spec['recipe']} --shots {','.join(str(k or 'all') for k in spec['shots'])} "
               f"--seeds {spec['seeds']} --methods {','.join(spec['methods'])} {' '.join(spec['overrides'])}")
    return write_page(folder / "report.html", f"tunelab learning curve: {Path(spec['recipe']).stem}", [
        (f"{metric} against examples per class", curve_plot(table, metric)),
        ("Table (mean ± sample std over seeds)", table_html),
        ("Runs", f"<ul>{runs}</ul>"),
        ("Command", f"<pre>{html.escape(command.strip())}</pre>"),
    ])


def curve_plot(table: list[dict], metric: str) -> str:
    """One line per method with error bars; k on a log₂ axis, 'all' as the rightmost point."""
    from tunelab.runs.report import figure_to_img, plt

    numeric = sorted({r["shots"] for r in table if r["shots"] != "all"})
    all_x = numeric[-1] * 2 if numeric else 1
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(r["method"] for r in table):
        rows = sorted((r for r in table if r["method"] == method),
                      key=lambda r: all_x if r["shots"] == "all" else r["shots"])
        xs = [all_x if r["shots"] == "all" else r["shots"] for r in rows]
        ax.errorbar(xs, [r[f"{metric}_mean"] for r in rows], yerr=[r[f"{metric}_std"] for r in rows],
                    marker="o", capsize=4, label=method)
    ticks = numeric + ([all_x] if any(r["shots"] == "all" for r in table) else [])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(k) for k in numeric] + (["all"] if len(ticks) > len(numeric) else []))
    ax.minorticks_off()
    ax.set_xlabel("training examples per class (k)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_to_img(fig)

