"""The runs folder as the board sees it: every run folder's summary and status, and one run's details.

Status comes from the folder's files and the board's own processes:
finished = metrics.json; running = the board's own `tunelab train` works on it, or the folder was written in the
last minute (a run started from a terminal); queued = the board resumes it when the running job ends;
failed = the board saw its process end with an error (ui_error.txt); pruned = a trial of a study that `tunelab tune`
stopped early (pruned.json); interrupted = anything else (killed, stopped, machine restarted):
`tunelab train … --resume` finishes it.

A folder holding recipe.yaml is a run; one holding tune.json is a study (`tunelab tune`, read by ui/studies.py),
listed apart. Of a study's runs, the two final runs (`<study>/final/yours`, `<study>/final/winner`: scored on the
reported split, like any run) are listed among the runs; its trials (`<study>/trials/trial-000`: scored on
validation rows) are listed on the study's page only. Every run folder inside the runs folder opens by its name,
however deep.

Run folders are untrusted input (runs/reading.py parses them typed): a folder, or a file in one, that is a symlink
leading out of the runs folder is neither listed nor found by name, and a folder that cannot be read is left out of
the list rather than failing it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs.folder import METRICS_FILE, RECIPE_FILE
from tunelab.runs.reading import (
    LOG_FILE,
    headline,
    progress,
    read_log,
    read_metrics,
    read_recipe,
    read_text,
    retention_rows,
    run_file,
)
from tunelab.tasks import task_named

UI_ERROR_FILE = "ui_error.txt"
BASELINE_FILE = "baseline.json"
PLAN_FILE = "tune.json"  # a study's settings, written before its first trial (tune/plan.py): it makes a study folder
FINAL_RUNS = "final"  # a study's final runs: final/yours, final/winner (tune/study.py)
TRIALS = "trials"  # a study's trials: trials/trial-000, … (tune/trials.py)
PRUNED_FILE = "pruned.json"  # a trial stopped early by the study's pruner (tune/trials.py)
RECENT_SECONDS = 60.0  # a folder written this recently belongs to a run still going (started elsewhere)
HIDDEN = (".", "_")  # the board's own folder (.studio) and staging folders are not runs
MAX_LISTED_FILES = 2000  # a run folder holds a few dozen; a bigger tree is not the board's to list in full


@dataclass
class RunsIndex:
    """Reads the run folders under `root`; summaries are cached until one of the folder's files changes."""

    root: Path
    _cache: dict[Path, tuple[tuple, dict]] = field(default_factory=dict)

    def run_dirs(self) -> list[Path]:
        """Folders holding a recipe.yaml, at the top or one level down (pipelines: runs/<pipeline>/<stage>), and the
        final runs of the studies there."""
        runs, studies = self.folders()
        return runs + [run for study in studies for run in self.final_runs(study)]

    def study_dirs(self) -> list[Path]:
        """Folders holding a tune.json, at the top or one level down."""
        return self.folders()[1]

    def folders(self) -> tuple[list[Path], list[Path]]:
        """Run folders and study folders, at the top or one level down; neither kind is looked into."""
        runs, studies = [], []
        for entry in scandir(self.root):
            if not self.is_folder_inside(entry):
                continue
            path = Path(entry.path)
            if (path / RECIPE_FILE).is_file():
                runs.append(path)
            elif is_study(path):
                studies.append(path)
            else:
                for sub in scandir(path):
                    if self.is_folder_inside(sub):
                        inner = Path(sub.path)
                        if (inner / RECIPE_FILE).is_file():
                            runs.append(inner)
                        elif is_study(inner):
                            studies.append(inner)
        return runs, studies

    def final_runs(self, study: Path) -> list[Path]:
        """A study's final runs (final/yours, final/winner) that are really inside the runs folder (a symlinked
        final/ may not lead out of it either)."""
        try:
            if not (study / FINAL_RUNS).resolve().is_relative_to(self.root.resolve()):
                return []
        except (OSError, RuntimeError):
            return []
        return [Path(entry.path) for entry in scandir(study / FINAL_RUNS)
                if self.is_folder_inside(entry) and (Path(entry.path) / RECIPE_FILE).is_file()]

    def is_folder_inside(self, entry: os.DirEntry) -> bool:
        """A visible folder that is really inside the runs folder (a symlink may not lead out of it)."""
        try:
            if entry.name.startswith(HIDDEN) or not entry.is_dir():
                return False
            return not entry.is_symlink() or Path(entry.path).resolve().is_relative_to(self.root.resolve())
        except (OSError, RuntimeError):
            return False

    def name_of(self, run_dir: Path) -> str:
        """The run's name in URLs: its path under the runs folder."""
        return run_dir.relative_to(self.root).as_posix()

    def resolve(self, name: str) -> Path:
        """The run folder called `name`, only ever inside the runs folder."""
        try:
            path = (self.root / name).resolve()
            found = path.is_relative_to(self.root.resolve()) and (path / RECIPE_FILE).is_file()
        except (OSError, RuntimeError, ValueError):  # a NUL byte, a symlink loop
            found = False
        if not found:
            raise TunelabError(f"no run {name!r} in {self.root}")
        return path

    def resolve_study(self, name: str) -> Path:
        """The study folder called `name`, only ever inside the runs folder."""
        try:
            path = (self.root / name).resolve()
            found = path.is_relative_to(self.root.resolve()) and is_study(path)
        except (OSError, RuntimeError, ValueError):
            found = False
        if not found:
            raise TunelabError(f"no study {name!r} in {self.root}")
        return path

    def study_of(self, run_dir: Path) -> dict | None:
        """The study a trial or final run belongs to: {"name": the study's, "role": "trial" or "final"}."""
        study = run_dir.parent.parent
        if run_dir.parent.name not in (TRIALS, FINAL_RUNS) or study == self.root \
                or not study.is_relative_to(self.root) or not is_study(study):
            return None
        return {"name": self.name_of(study), "role": "trial" if run_dir.parent.name == TRIALS else "final"}

    def summaries(self, active: set[Path], ended: dict[Path, float],
                  queued: frozenset[Path] = frozenset()) -> list[dict]:
        """One summary per run folder, newest first; a folder that vanished or cannot be read is left out."""
        rows = []
        for path in self.run_dirs():
            try:
                rows.append(self.summary(path, active, ended, queued))
            except (OSError, ValueError):
                continue
        return sorted(rows, key=lambda row: row["started"] or 0, reverse=True)

    def summary(self, run_dir: Path, active: set[Path], ended: dict[Path, float],
                queued: frozenset[Path] = frozenset()) -> dict:
        """Name, task, model, method, status, headline metric before → after, samples/s, start time."""
        stamps = file_stamps(run_dir)
        cached = self._cache.get(run_dir)
        if cached is None or cached[0] != stamps:
            cached = (stamps, static_summary(run_dir, self.name_of(run_dir)))
            self._cache[run_dir] = cached
        return {**cached[1], "status": status(run_dir, stamps, active, ended, queued)}

    def detail(self, name: str, active: set[Path], ended: dict[Path, float],
               queued: frozenset[Path] = frozenset()) -> dict:
        """A run's summary plus its log, progress, metrics, general ability retained (a decoder's, when measured:
        table rows, summary line, seconds), recipe text and files."""
        run_dir = self.resolve(name)
        log = read_log(run_dir)
        try:
            summary = self.summary(run_dir, active, ended, queued)
        except (OSError, ValueError):
            raise TunelabError(f"run {name!r} cannot be read") from None
        metrics = read_metrics(run_dir)
        retained = (metrics or {}).get("retention")
        retention = {"rows": retention_rows(retained), "summary": retained.get("summary"),
                     "seconds": retained.get("seconds")} if retained else None
        return {**summary, "log": log, "progress": progress(log), "metrics": metrics, "retention": retention,
                "recipe": read_recipe(run_dir), "recipe_text": read_text(run_dir, RECIPE_FILE) or "",
                "error": read_text(run_dir, UI_ERROR_FILE), "files": list_files(run_dir),
                "study": self.study_of(run_dir)}


def scandir(path: Path) -> list[os.DirEntry]:
    """The entries of a folder (none when it is missing)."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


def is_study(folder: Path) -> bool:
    """Whether `folder` is a study folder: it holds tune.json (inside it, not a symlink out)."""
    return run_file(folder, PLAN_FILE) is not None


def file_stamps(run_dir: Path) -> tuple:
    """Modification times of the files a status and summary depend on (None: missing)."""
    stamps = []
    for name in (RECIPE_FILE, METRICS_FILE, LOG_FILE, BASELINE_FILE, UI_ERROR_FILE, PRUNED_FILE):
        try:
            stamps.append(os.stat(run_dir / name).st_mtime)
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def static_summary(run_dir: Path, name: str) -> dict:
    """The parts of a summary that change only when a file changes."""
    recipe = read_recipe(run_dir) or {}
    metrics = read_metrics(run_dir)
    model, method = recipe.get("model"), recipe.get("method")
    task = task_named(recipe.get("task"))
    return {"name": name, "task": text_or_none(recipe.get("task")),
            "answers": bool(task and task.answers), "labels": bool(task and task.labels),  # the playground's panels
            "model": text_or_none(model.get("name") if isinstance(model, dict) else None),
            "method": text_or_none(method.get("name") if isinstance(method, dict) else method),
            "headline": headline(metrics),
            "samples_per_second": (metrics or {}).get("train_samples_per_second"),
            "started": os.stat(run_dir / RECIPE_FILE).st_mtime}


def text_or_none(value) -> str | None:
    """A recipe value shown as a word in the table: its text, None when absent (a hand-edited recipe may hold a list
    or a number where a name belongs)."""
    return None if value is None else str(value)


def status(run_dir: Path, stamps: tuple, active: set[Path], ended: dict[Path, float],
           queued: frozenset[Path] = frozenset()) -> str:
    """finished, running, queued, failed, pruned or interrupted (see the module docstring)."""
    _, metrics, *written, ui_error, pruned = stamps
    if metrics is not None:
        return "finished"
    if pruned is not None:
        return "pruned"
    if run_dir in active:
        return "running"
    if run_dir in queued:
        return "queued"
    latest = max((stamp for stamp in written if stamp is not None), default=0.0)
    if latest > ended.get(run_dir, 0.0) and time.time() - latest < RECENT_SECONDS:
        return "running"
    return "failed" if ui_error is not None else "interrupted"


def list_files(run_dir: Path) -> list[dict]:
    """The run folder's files (not checkpoints, not hidden) with their sizes, for links; symlinked folders are not
    entered and a symlinked file is listed only when it stays inside the run folder (as /files serves it)."""
    base = run_dir.resolve()
    files = []
    for folder, subfolders, names in os.walk(run_dir):  # os.walk does not enter symlinked folders
        here = Path(folder)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")
                               and not (here == run_dir and name == "checkpoints"))
        for name in sorted(names):
            path = here / name
            if name.startswith(".") or len(files) >= MAX_LISTED_FILES:
                continue
            try:
                if not path.resolve().is_relative_to(base) or not path.is_file():
                    continue
                size = path.stat().st_size
            except (OSError, RuntimeError):
                continue
            files.append({"path": path.relative_to(run_dir).as_posix(), "bytes": size})
    return sorted(files, key=lambda file: file["path"])
