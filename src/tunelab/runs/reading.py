"""Read a run folder back (recipe, metrics, log, progress) without importing torch: for the web board and tools.

A run folder is written by `tunelab train` (runs/folder.py, runs/artifacts.py); these readers never write, and a
file half-way through being written (log.jsonl's last line) is skipped rather than failing the reader.

A run folder is also untrusted input: anyone who can write into the runs folder (or copied a run in) decides its
contents. So metrics.json and log.jsonl rows are parsed into typed models where a value of the wrong type (a string
`max_steps`, a NaN) is dropped on its own, not the whole row or file; a file that is a symlink leading out of its
run folder is not read; and what is returned is always JSON-safe (no NaN, no surrogates, plain types). metrics.json's
`retention` block (a decoder's general ability before and after, runs/artifacts.py) is typed apart from the rest: a
malformed one loses its bad parts, or all of it, never the run's other metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from tunelab.evaluation import HEADLINE_METRICS, PROBE_NAMES
from tunelab.evaluation.uncertainty import describe_gain
from tunelab.runs.folder import METRICS_FILE, RECIPE_FILE

LOG_FILE = "log.jsonl"
REPORT_FILE = "report.html"
LOWER_IS_BETTER = ("loss", "perplexity")  # and metrics named ...loss or ...perplexity (word_perplexity)
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


class Interval(BaseModel):
    low: Number
    high: Number


class RetentionChange(BaseModel):
    """One probe metric before and after training (evaluation/retention.compare): an accuracy's change is a
    difference, a perplexity's a ratio (after / before); low and high bound it (paired 95%)."""

    before: Number
    after: Number
    interval_before: Interval | None = None
    interval_after: Interval | None = None
    change: Number | None = None
    ratio: Number | None = None
    low: Number | None = None
    high: Number | None = None
    significant: StrictBool | None = None
    p_value: Number | None = None


class Retention(BaseModel):
    """metrics.json's `retention`: each probe's scores before and after (by probe name), their comparison (by probe,
    then metric), the one-line summary and the seconds the probes took."""

    before: dict[str, dict[str, Number]] = Field(default_factory=dict)
    after: dict[str, dict[str, Number]] = Field(default_factory=dict)
    change: dict[str, dict[str, RetentionChange]] = Field(default_factory=dict)
    summary: StrictStr | None = None
    seconds: Number | None = None


def typed(model: type[BaseModel], raw: dict) -> dict:
    """`raw` through `model`, each value that does not fit dropped alone (the innermost entry holding it)."""
    raw = dict(raw)
    for _ in range(len(raw) + 3):  # a round drops at least one value; a required one dropped takes its model next
        try:
            return model.model_validate(raw).model_dump(exclude_unset=True)
        except ValidationError as exc:
            for error in exc.errors():
                drop(raw, error["loc"])
    return {}


def drop(raw: dict, loc: tuple) -> None:
    """Remove the value at `loc`: a key of `raw`, or of a dict nested in it (copied on the way, so the caller's are
    kept). Where `loc` names a key that is missing (a required field), the dict lacking it goes instead; where a
    dict on the way is gone already (an earlier error of the same round dropped it), nothing more goes: one entry
    with several errors (each member of a union, each missing field) costs that entry, not its parents."""
    if not loc:
        raw.clear()
        return
    key, rest = loc[0], loc[1:]
    inner = raw.get(key)
    if rest and isinstance(inner, dict) and rest[0] in inner:
        inner = dict(inner)
        drop(inner, rest)
        raw[key] = inner
    elif not (len(rest) > 1 and isinstance(inner, dict)):
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
    """metrics.json (present only once a run finished), its values typed: see Metrics and Retention."""
    raw = read_json(run_dir, METRICS_FILE)
    if raw is None:
        return None
    metrics = typed(Metrics, {key: value for key, value in raw.items() if key != "retention"})
    retention = typed_retention(raw.get("retention"))
    return {**metrics, "retention": retention} if retention else metrics


def typed_retention(raw: Any) -> dict | None:
    """A `retention` block typed (see Retention) and JSON-safe, or None when it is absent or nothing of it fits."""
    if not isinstance(raw, dict):
        return None
    block = json_safe(typed(Retention, raw))  # probe names and the summary are any text: no lone surrogates out
    for part in ("before", "after", "change"):  # a probe whose every value was dropped goes too
        if part in block:
            block[part] = {probe: values for probe, values in block[part].items() if values}
    return block if block.get("change") or block.get("after") else None


def retention_rows(retention: dict | None) -> list[dict]:
    """The `retention` block (typed) as table rows, one per probe metric compared, for the report and the board:
    the probe's name as shown and its size, before and after with their intervals, the change (a difference) or
    ratio with its interval, and a verdict (better, worse or no significant change; None when unknown)."""
    rows = []
    for probe, metrics in ((retention or {}).get("change") or {}).items():
        for metric, compared in metrics.items():
            rows.append({"probe": probe, "name": PROBE_NAMES.get(probe, probe),
                         "size": probe_size(((retention.get("after") or {}).get(probe)) or {}), "metric": metric,
                         **{key: compared.get(key) for key in ("before", "after", "interval_before", "interval_after",
                                                               "change", "ratio", "low", "high", "significant",
                                                               "p_value")},
                         "verdict": verdict(metric, compared)})
    return rows


def probe_size(scores: dict) -> str | None:
    """How much of a probe was scored, in words: '300 items' or '10 documents, 20,480 tokens'."""
    if isinstance(scores.get("items"), int | float):
        return f"{scores['items']:,.0f} items"
    if isinstance(scores.get("documents"), int | float):
        tokens = f", {scores['tokens']:,.0f} tokens" if isinstance(scores.get("tokens"), int | float) else ""
        return f"{scores['documents']:,.0f} documents{tokens}"
    return None


def verdict(metric: str, compared: dict) -> str | None:
    """better, worse or no significant change (the paired interval includes no change); None when not known."""
    if compared.get("significant") is None:
        return None
    if not compared["significant"]:
        return "no significant change"
    ratio, change = compared.get("ratio"), compared.get("change")
    if ratio is None and change is None:
        return None
    went_up = ratio > 1 if ratio is not None else change > 0
    return "worse" if went_up == metric.endswith(LOWER_IS_BETTER) else "better"


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


def headline_changes(metrics: dict) -> str:
    """The headline metrics before → after, each gain with its paired 95% interval ("no significant change" when
    that interval includes 0), and the win rate when judged: the line a run ends on."""
    before, after, gains = metrics["before"], metrics["after"], metrics.get("gain", {})
    changes = []
    for key in HEADLINE_METRICS:
        if not (isinstance(before.get(key), float | int) and isinstance(after.get(key), float | int)):
            continue
        change = f"{key} {before[key]:.4f} → {after[key]:.4f}"
        changes.append(f"{change}{describe_gain(gains[key])}" if key in gains else change)
    if "win_rate" in metrics:
        span = metrics.get("win_rate_interval")
        changes.append(f"win rate {metrics['win_rate']:.3f}"
                       + (f" [{span['low']:.3f}, {span['high']:.3f}]" if span else ""))
    return "; ".join(changes)
