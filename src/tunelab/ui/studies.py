"""Study folders (`tunelab tune`) as the board sees them: a row of the Studies table, and a study's page (its
outcome, its settings and every trial, each linked to its run folder).

A study folder holds tune.json (the settings, written before the first trial: it is what makes a folder a study),
trials/trial-NNN/ (one ordinary run folder per trial; a pruned one keeps its recipe, log and pruned.json),
final/yours/ and final/winner/ (the two final runs) and, once the study ended, study.json (the summary) and
report.html. Trials are searched runs, scored on validation rows: they are listed on their study's page, not among
the runs (whose scores are on the reported split), and open by their nested name, `<study>/trials/trial-000`. The
final runs are ordinary runs scored on the reported split, and are listed among the runs as `<study>/final/winner`.

Study folders are untrusted input, as run folders are (runs/reading.py): tune.json and study.json are read into typed
models where a value of the wrong type is dropped alone (each trial apart, so a bad trial costs only its own values),
a file that is a symlink leading out of the study folder is not read, a run folder that study.json names is linked
only when it lies inside the study folder, and the storage URL (which may carry a database password) is not shown.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from tunelab.runs.folder import RECIPE_FILE
from tunelab.runs.reading import (
    LOG_FILE,
    REPORT_FILE,
    Interval,
    Number,
    json_safe,
    read_json,
    read_metrics,
    read_recipe,
    run_file,
    typed,
)
from tunelab.ui.runs_index import (
    FINAL_RUNS,
    PLAN_FILE,
    PRUNED_FILE,
    RECENT_SECONDS,
    TRIALS,
    RunsIndex,
    text_or_none,
)

# The other names `tunelab tune` writes (tune/study.py; a test keeps them and runs_index's the same). The board does
# not import tune/, which pulls in Optuna and the trainer: these files are read as plain JSON.
STUDY_FILE = "study.json"
BEST_RECIPE = "best_recipe.yaml"
LOWER_IS_BETTER = ("loss", "perplexity")  # tune/plan.py: a study minimises these, maximises anything else
TRIAL_FOLDER = re.compile(r"trial-(\d{1,9})")

Count = Annotated[StrictInt, Field(ge=0, le=10**9)]
Value = StrictBool | StrictInt | Number | StrictStr | None  # a trial's value of one recipe key (Optuna's params)


class Plan(BaseModel):
    """tune.json as the board reads it: the user's recipe (its task and model are shown), the metric, the budget."""

    recipe: dict[str, Any] = Field(default_factory=dict)
    space: dict[StrictStr, Any] = Field(default_factory=dict)
    metric: StrictStr | None = None
    study_name: StrictStr | None = None
    trials: Count | None = None


class Counts(BaseModel):
    complete: Count | None = None
    pruned: Count | None = None
    fail: Count | None = None
    running: Count | None = None
    waiting: Count | None = None


class DataLayout(BaseModel):
    """Which rows the trials were scored on and which the final runs were reported on (tune/data.py)."""

    source: StrictStr | None = None
    validation: StrictStr | None = None
    reported: StrictStr | None = None
    reported_is_split: StrictBool | None = None
    train_rows: Count | None = None
    validation_rows: Count | None = None


class Gain(BaseModel):
    """The winner's score minus yours on the reported rows, with its paired 95% interval."""

    value: Number
    low: Number
    high: Number
    significant: StrictBool
    p_value: Number | None = None


class Final(BaseModel):
    """study.json's `final`: the best trial, and the two final runs compared on the reported split."""

    best_trial: Count | None = None
    best_values: dict[str, Value] = Field(default_factory=dict)
    best_validation_score: Number | None = None
    reported_on: StrictStr | None = None
    runs: dict[str, StrictStr] = Field(default_factory=dict)
    yours: dict[str, Number] = Field(default_factory=dict)
    winner: dict[str, Number] = Field(default_factory=dict)
    intervals: dict[str, dict[str, Interval]] = Field(default_factory=dict)
    gain: dict[str, Gain] = Field(default_factory=dict)
    verdict: dict[str, StrictStr] = Field(default_factory=dict)


class Trial(BaseModel):
    """One of study.json's `trials`: without a number it is not shown."""

    number: Count
    state: StrictStr | None = None
    values: dict[str, Value] = Field(default_factory=dict)
    score: Number | None = None
    last_epoch: Number | None = None
    run: StrictStr | None = None
    yours: StrictBool = False
    seconds: Number | None = None


class Summary(BaseModel):
    """study.json as the board reads it (its `trials` are typed one by one, see Trial; `storage` is left out)."""

    study: StrictStr | None = None
    metric: StrictStr | None = None
    direction: Literal["maximize", "minimize"] | None = None
    recipe: StrictStr | None = None
    data: DataLayout | None = None
    refit: StrictBool | None = None
    counts: Counts | None = None
    trials_seconds: Number | None = None
    wall_seconds: Number | None = None
    final: Final | None = None


@dataclass
class StudiesIndex:
    """The study folders that `runs` finds: a row each (cached until one of the study's files changes) and a study's
    details."""

    runs: RunsIndex
    _cache: dict[Path, tuple[tuple, dict]] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One row per study folder, newest first; a study that vanished or cannot be read is left out."""
        rows = []
        for study_dir in self.runs.study_dirs():
            try:
                rows.append(self.row(study_dir))
            except (OSError, ValueError):
                continue
        return sorted(rows, key=lambda row: row["started"] or 0, reverse=True)

    def row(self, study_dir: Path) -> dict:
        """The Studies table's row: the study, task and model, metric, trials complete/pruned/failed, the best
        validation score, the final verdict on the metric, status and whether report.html is there."""
        stamps = study_stamps(study_dir)
        cached = self._cache.get(study_dir)
        if cached is None or cached[0] != stamps:
            plan, summary = read_plan(study_dir), read_summary(study_dir)
            trials = trials_of(study_dir, plan, summary, with_values=False)
            cached = (stamps, static_row(study_dir, self.runs.name_of(study_dir), plan, summary, trials))
            self._cache[study_dir] = cached
        return {**cached[1], "status": status(study_dir)}

    def detail(self, name: str) -> dict:
        """A study's row plus its data layout, the final comparison (with the final runs' names) and every trial (its
        values, state, score and run name); while it runs, the trials come from their folders."""
        study_dir = self.runs.resolve_study(name)
        name = self.runs.name_of(study_dir)
        plan, summary = read_plan(study_dir), read_summary(study_dir)
        trials, ended = trials_of(study_dir, plan, summary, with_values=True), summary or {}
        final = ended.get("final")
        if final:
            final = {**final, "runs": {which: run_name(study_dir, name, relative)
                                       for which, relative in final.get("runs", {}).items()}}
        keys = list(dict.fromkeys(key for trial in trials for key in trial.get("values", {})))
        return {**static_row(study_dir, name, plan, summary, trials), "status": status(study_dir),
                "data": ended.get("data"), "refit": ended.get("refit"), "wall_seconds": ended.get("wall_seconds"),
                "trials_seconds": ended.get("trials_seconds"), "final": final, "keys": keys,
                "trials": [{**trial, "run": run_name(study_dir, name, trial.get("run"))} for trial in trials],
                "best_recipe": run_file(study_dir, BEST_RECIPE) is not None}


def read_plan(study_dir: Path) -> dict:
    """tune.json, typed (see Plan); {} when it cannot be read."""
    return json_safe(typed(Plan, read_json(study_dir, PLAN_FILE) or {}))


def read_summary(study_dir: Path) -> dict | None:
    """study.json, typed (see Summary, Trial), or None while the study runs (or when it is not a JSON object)."""
    raw = read_json(study_dir, STUDY_FILE)
    if raw is None:
        return None
    summary = json_safe(typed(Summary, {key: value for key, value in raw.items() if key != "trials"}))
    rows = raw.get("trials") if isinstance(raw.get("trials"), list) else []
    trials = [json_safe(typed(Trial, row)) for row in rows if isinstance(row, dict)]
    return {**summary, "trials": [trial for trial in trials if "number" in trial]}


def static_row(study_dir: Path, name: str, plan: dict, summary: dict | None, trials: list[dict]) -> dict:
    """The parts of a study's row that change only when one of its files changes (see StudiesIndex.row)."""
    recipe, ended = plan.get("recipe") or {}, summary or {}
    model, metric = recipe.get("model"), ended.get("metric") or plan.get("metric")
    goal = direction(summary, metric)
    counts = ended.get("counts") or count_states(trials)
    return {"name": name, "study": ended.get("study") or plan.get("study_name") or name,
            "task": text_or_none(recipe.get("task")),
            "model": text_or_none(model.get("name") if isinstance(model, dict) else model),
            "metric": metric, "direction": goal, "planned": plan.get("trials"),
            "counts": {state: counts.get(state) for state in ("complete", "pruned", "fail")},
            "best": best_score(summary, trials, goal),
            "verdict": verdict_on((ended.get("final") or {}).get("verdict") or {}, metric),
            "report": run_file(study_dir, REPORT_FILE) is not None, "started": started(study_dir)}


def status(study_dir: Path) -> str:
    """finished: study.json is there (even when it cannot be read); running: a file the study writes changed in the
    last minute; interrupted: anything else (killed; `tunelab tune --resume --output STUDY` continues it)."""
    if run_file(study_dir, STUDY_FILE) is not None:
        return "finished"
    return "running" if written_lately(study_dir) else "interrupted"


def study_stamps(study_dir: Path) -> tuple:
    """Modification times a study's row depends on: its own files and each trial folder (a trial's metrics.json or
    pruned.json, written atomically, changes its folder's time)."""
    paths = [study_dir / name for name in (PLAN_FILE, STUDY_FILE, REPORT_FILE, TRIALS)]
    stamps = []
    for path in paths + [folder for _, folder in trial_dirs(study_dir)]:
        try:
            stamps.append(os.stat(path).st_mtime)
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def trials_of(study_dir: Path, plan: dict, summary: dict | None, with_values: bool) -> list[dict]:
    """study.json's trials, or while the study runs, its trial folders' (their values only `with_values`: each
    costs reading a recipe)."""
    if summary is not None:
        return summary["trials"]
    return folder_trials(study_dir, plan.get("metric"), list(plan.get("space", {})) if with_values else [])


def run_name(study_dir: Path, name: str, relative: str | None) -> str | None:
    """`<study>/<relative>`, the board's name of a run folder study.json names, when it is one inside the study
    folder; else None (study.json is untrusted: '../other-run' or '/etc' links nothing)."""
    if not relative:
        return None
    path = PurePosixPath(relative)
    if path.is_absolute() or any(part in ("..", ".") for part in path.parts):
        return None
    folder = study_dir.joinpath(*path.parts)
    try:
        inside = folder.resolve().is_relative_to(study_dir.resolve()) and (folder / RECIPE_FILE).is_file()
    except (OSError, RuntimeError, ValueError):
        return None
    return f"{name}/{path.as_posix()}" if inside else None


def trial_dirs(study_dir: Path) -> list[tuple[int, Path]]:
    """The study's trial folders (trials/trial-NNN, inside the study folder: a symlink may not lead out of it) by
    trial number."""
    base = study_dir.resolve()
    found = []
    try:
        if not (study_dir / TRIALS).resolve().is_relative_to(base):
            return []
        with os.scandir(study_dir / TRIALS) as entries:
            for entry in entries:
                match = TRIAL_FOLDER.fullmatch(entry.name)
                try:
                    if match and entry.is_dir() and (not entry.is_symlink()
                                                     or Path(entry.path).resolve().is_relative_to(base)):
                        found.append((int(match.group(1)), Path(entry.path)))
                except (OSError, RuntimeError):
                    continue
    except (OSError, RuntimeError):
        return []
    return sorted(found)


def folder_trials(study_dir: Path, metric: str | None, keys: list[str]) -> list[dict]:
    """The trials of a study that has not written study.json yet, from their folders: complete (metrics.json),
    pruned (pruned.json) or unfinished (running, failed or cut off: only the study's storage tells which), with
    the score on `metric` and the values of the recipe `keys` searched."""
    trials = []
    for number, folder in trial_dirs(study_dir):
        metrics = read_metrics(folder)
        state = "complete" if metrics else "pruned" if run_file(folder, PRUNED_FILE) else "unfinished"
        score = ((metrics or {}).get("after") or {}).get(metric) if metric else None
        recipe = (read_recipe(folder) or {}) if keys else {}
        trials.append({"number": number, "state": state, "score": score,
                       "values": {key: dotted(recipe, key) for key in keys}, "run": f"{TRIALS}/{folder.name}"})
    return trials


def dotted(recipe: dict, key: str) -> Any:
    """A recipe's value at a dotted key (train.learning_rate), None when absent or not a plain value."""
    value: Any = recipe
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if value is None or isinstance(value, bool | int | float | str) else None


def count_states(trials: list[dict]) -> dict:
    return {state: sum(1 for trial in trials if trial.get("state") == state) for state in ("complete", "pruned",
                                                                                         "fail")}


def direction(summary: dict | None, metric: str | None) -> str:
    """maximize or minimize: study.json's, else the rule `tunelab tune` follows (tune/plan.py)."""
    given = (summary or {}).get("direction")
    return given or ("minimize" if metric in LOWER_IS_BETTER else "maximize")


def best_score(summary: dict | None, trials: list[dict], goal: str) -> float | None:
    """The best trial's validation score: study.json's final one, else the best complete trial's so far."""
    final = (summary or {}).get("final") or {}
    if final.get("best_validation_score") is not None:
        return final["best_validation_score"]
    scores = [trial["score"] for trial in trials if trial.get("state") == "complete"
              and isinstance(trial.get("score"), int | float)]
    return (min if goal == "minimize" else max)(scores) if scores else None


def verdict_on(verdicts: dict[str, str], metric: str | None) -> dict | None:
    """The final verdict on the study's metric ('0.8726 → 0.8915 (+0.0189 [+0.005, +0.033])'), else on the first
    metric both final runs report (a loss is optimised on validation, but not reported)."""
    key = metric if metric in verdicts else next(iter(verdicts), None)
    return {"metric": key, "text": verdicts[key]} if key else None


def written_lately(study_dir: Path) -> bool:
    """Whether a file the running study writes changed in the last minute: its settings, its SQLite storage, a
    trial's or a final run's log (never a file out of the study folder: links are not followed)."""
    paths = [study_dir / PLAN_FILE, study_dir / "optuna.db", study_dir / TRIALS]
    paths += [folder / LOG_FILE for _, folder in trial_dirs(study_dir)]  # trial folders inside the study
    final = study_dir / FINAL_RUNS
    try:
        if not final.is_symlink():
            paths += [final / which / LOG_FILE for which in ("yours", "winner") if not (final / which).is_symlink()]
    except OSError:
        pass
    latest = 0.0
    for path in paths:
        try:
            found = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISLNK(found.st_mode):
            latest = max(latest, found.st_mtime)
    return time.time() - latest < RECENT_SECONDS


def started(study_dir: Path) -> float | None:
    try:
        return os.stat(study_dir / PLAN_FILE).st_mtime
    except OSError:
        return None
