"""Read a run folder back (recipe, metrics, log, progress) without importing torch: for the web board and tools.

A run folder is written by `tunelab train` (runs/folder.py, runs/artifacts.py); these readers never write, and a
file half-way through being written (log.jsonl's last line) is skipped rather than failing the reader.

A run folder is also untrusted input: anyone who can write into the runs folder (or copied a run in) decides its
contents. So metrics.json and log.jsonl rows are parsed into typed models where a value of the wrong type (a string
`max_steps`, a NaN) is dropped on its own, not the whole row or file; a file that is a symlink leading out of its
run folder is not read; and what is returned is always JSON-safe (no NaN, no surrogates, plain types).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from tunelab.evaluation import HEADLINE_METRICS
from tunelab.runs.folder import METRICS_FILE, RECIPE_FILE

LOG_FILE = "log.jsonl"
REPORT_FILE = "report.html"
LOWER_IS_BETTER = ("loss", "perplexity")
YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads a recipe ~10x faster
MAX_READ_BYTES = 64 * 1024 * 1024  # a file bigger than this is not a run's own metrics or log: not read
MAX_STEPS = 10**12  # far above any real run, low enough that arithmetic on steps stays finite

# A number as the board shows it: int or float, never a bool, a string or NaN/infinity (which JSON cannot carry).
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class LogRow(BaseModel):
    """One line of log.jsonl as the board reads it: the fields it uses typed, any other field kept only when it is a
    number (losses, learning rates, eval metrics); warnings and other text events are not the board's to show."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Number]
    step: Annotated[StrictInt, Field(ge=0, le=MAX_STEPS)] | None = None
    max_steps: Annotated[StrictInt, Field(ge=1, le=MAX_STEPS)] | None = None
    time: Number | None = None
    epoch: Number | None = None


class Metrics(BaseModel):
    """metrics.json as the board reads it: the scores before and after training (numbers only) and the numbers
    beside them (samples/s, seconds, win rate); everything else stays in the file, served as it is under /files."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Number]
    before: dict[str, Number] = Field(default_factory=dict)
    after: dict[str, Number] = Field(default_factory=dict)


def typed(model: type[BaseModel], raw: dict) -> dict:
    """`raw` through `model`, each value that does not fit dropped alone (one entry of a nested dict, at most)."""
    raw = dict(raw)
    for _ in range(len(raw) + 1):
        try:
            return model.model_validate(raw).model_dump(exclude_unset=True)
        except ValidationError as exc:
            for error in exc.errors():
                drop(raw, error["loc"])
    return {}


def drop(raw: dict, loc: tuple) -> None:
    """Remove the value at `loc`: a key of `raw`, or a key of a dict inside it (copied, so the caller's is kept)."""
    if not loc:
        raw.clear()
        return
    key = loc[0]
    if len(loc) > 1 and isinstance(raw.get(key), dict) and loc[1] in raw[key]:
        raw[key] = {k: v for k, v in raw[key].items() if k != loc[1]}
    else:
        raw.pop(key, None)


def json_safe(value: Any) -> Any:
    """A parsed YAML value as plain JSON: non-finite floats become None, dates and other objects their text, keys
    strings; text that could not be sent as UTF-8 (a lone surrogate) is replaced."""
    if isinstance(value, dict):
        return {json_safe_text(str(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int):
        return value
    return json_safe_text(str(value))


def json_safe_text(text: str) -> str:
    return text.encode("utf-8", errors="replace").decode("utf-8")


def run_file(run_dir: Path, name: str) -> Path | None:
    """`run_dir/name` when it is a file inside the run folder (a symlink may not lead out of it), else None."""
    path = run_dir / name
    try:
        return path if path.resolve().is_relative_to(run_dir.resolve()) and path.is_file() else None
    except (OSError, RuntimeError, ValueError):
        return None


def read_text(run_dir: Path, name: str) -> str | None:
    """A text file of the run folder (undecodable bytes replaced), or None when it is missing, outside or huge."""
    path = run_file(run_dir, name)
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_READ_BYTES + 1)
    except OSError:
        return None
    return None if len(data) > MAX_READ_BYTES else data.decode("utf-8", errors="replace")


def read_json(run_dir: Path, name: str) -> dict | None:
    """A JSON object file of the run folder, or None when it is missing or not (yet) valid."""
    text = read_text(run_dir, name)
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_recipe(run_dir: Path) -> dict | None:
    """The run's resolved recipe as a plain, JSON-safe dict, or None."""
    text = read_text(run_dir, RECIPE_FILE)
    try:
        value = yaml.load(text, Loader=YamlLoader) if text is not None else None
    except (yaml.YAMLError, RecursionError):
        return None
    return json_safe(value) if isinstance(value, dict) else None


def read_metrics(run_dir: Path) -> dict | None:
    """metrics.json (present only once a run finished), its values typed: see Metrics."""
    raw = read_json(run_dir, METRICS_FILE)
    return typed(Metrics, raw) if raw is not None else None


def read_log(run_dir: Path) -> list[dict]:
    """Every complete line of log.jsonl, typed (see LogRow); a line being appended right now is left out."""
    text = read_text(run_dir, LOG_FILE)
    rows = []
    for line in (text or "").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(typed(LogRow, row))
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
    """Step, epoch, total steps, ETA (from the pace of the logged steps so far) and the latest eval metrics, from
    rows read by read_log (typed: step, max_steps and time are numbers where present)."""
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
        eta = eta if math.isfinite(eta) else None  # absurd times in a hand-edited log; JSON carries no infinity
    latest_eval = next(({k.removeprefix("eval_"): v for k, v in row.items() if k.startswith("eval_")}
                        for row in reversed(steps) if any(k.startswith("eval_") for k in row)), {})
    return {"step": last["step"], "epoch": last.get("epoch", 0.0), "max_steps": total, "eta_seconds": eta,
            "latest_eval": latest_eval}
