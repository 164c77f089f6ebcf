"""Read a run folder back (recipe, metrics, log, progress) without importing torch: for the web board and tools.

A run folder is written by `tunelab train` (runs/folder.py, runs/artifacts.py); these readers never write, and a
file half-way through being written (log.jsonl's last line) is skipped rather than failing the reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tunelab.evaluation import HEADLINE_METRICS
from tunelab.runs.folder import METRICS_FILE, RECIPE_FILE

LOG_FILE = "log.jsonl"
REPORT_FILE = "report.html"
LOWER_IS_BETTER = ("loss", "perplexity")
YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads a recipe ~10x faster


def read_json(path: Path) -> dict | None:
    """A JSON object file, or None when it is missing or not (yet) valid."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_recipe(run_dir: Path) -> dict | None:
    """The run's resolved recipe as a plain dict, or None."""
    try:
        value = yaml.load((run_dir / RECIPE_FILE).read_text(encoding="utf-8"), Loader=YamlLoader)
    except (OSError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def read_metrics(run_dir: Path) -> dict | None:
    """metrics.json: present only once a run finished."""
    return read_json(run_dir / METRICS_FILE)


def read_log(run_dir: Path) -> list[dict]:
    """Every complete line of log.jsonl (a line being appended right now is left out)."""
    try:
        lines = (run_dir / LOG_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def better(metric: str, a: float, b: float) -> bool:
    """Whether value `a` of `metric` beats `b` (losses and perplexity: lower wins)."""
    return a < b if metric in LOWER_IS_BETTER else a > b


def headline(metrics: dict | None) -> dict | None:
    """The run's headline metric before and after training: {"metric", "before", "after"}."""
    if not metrics:
        return None
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    for key in HEADLINE_METRICS:
        if isinstance(before.get(key), int | float) and isinstance(after.get(key), int | float):
            return {"metric": key, "before": before[key], "after": after[key]}
    return None


def progress(log: list[dict]) -> dict[str, Any]:
    """Step, epoch, total steps, ETA (from the pace of the logged steps so far) and the latest eval metrics."""
    steps = [row for row in log if isinstance(row.get("step"), int) and isinstance(row.get("time"), int | float)]
    if not steps:
        return {"step": 0, "epoch": 0.0, "max_steps": None, "eta_seconds": None, "latest_eval": {}}
    last = steps[-1]
    total = next((row["max_steps"] for row in reversed(steps) if row.get("max_steps")), None)
    eta = None
    # The pace since the first logged step of this attempt (a resumed run starts a new series of times).
    first = next((row for row in steps if row["step"] < last["step"]), None)
    if total and first is not None and last["time"] > first["time"]:
        pace = (last["time"] - first["time"]) / (last["step"] - first["step"])
        eta = max(0.0, round((total - last["step"]) * pace, 1))
    latest_eval = next(({k.removeprefix("eval_"): v for k, v in row.items() if k.startswith("eval_")}
                        for row in reversed(steps) if any(k.startswith("eval_") for k in row)), {})
    return {"step": last["step"], "epoch": last.get("epoch", 0.0), "max_steps": total, "eta_seconds": eta,
            "latest_eval": latest_eval}
