"""The runs folder as the board sees it: every run folder's summary and status, and one run's details.

Status comes from the folder's files and the board's own processes:
finished = metrics.json; running = the board's own `tunelab train` works on it, or the folder was written in the
last minute (a run started from a terminal); queued = the board resumes it when the running job ends;
failed = the board saw its process end with an error (ui_error.txt); interrupted = anything else (killed,
stopped, machine restarted): `tunelab train … --resume` finishes it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.runs.folder import METRICS_FILE, RECIPE_FILE
from tunelab.runs.reading import LOG_FILE, headline, progress, read_log, read_metrics, read_recipe

UI_ERROR_FILE = "ui_error.txt"
BASELINE_FILE = "baseline.json"
RECENT_SECONDS = 60.0  # a folder written this recently belongs to a run still going (started elsewhere)
HIDDEN = (".", "_")  # the board's own folder (.studio) and staging folders are not runs


@dataclass
class RunsIndex:
    """Reads the run folders under `root`; summaries are cached until one of the folder's files changes."""

    root: Path
    _cache: dict[Path, tuple[tuple, dict]] = field(default_factory=dict)

    def run_dirs(self) -> list[Path]:
        """Folders holding a recipe.yaml, at the top or one level down (pipelines: runs/<pipeline>/<stage>)."""
        found = []
        for entry in scandir(self.root):
            if not entry.is_dir() or entry.name.startswith(HIDDEN):
                continue
            path = Path(entry.path)
            if (path / RECIPE_FILE).is_file():
                found.append(path)
                continue
            found += [Path(sub.path) for sub in scandir(path) if sub.is_dir() and not sub.name.startswith(HIDDEN)
                      and (Path(sub.path) / RECIPE_FILE).is_file()]
        return found

    def name_of(self, run_dir: Path) -> str:
        """The run's name in URLs: its path under the runs folder."""
        return run_dir.relative_to(self.root).as_posix()

    def resolve(self, name: str) -> Path:
        """The run folder called `name`, only ever inside the runs folder."""
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root.resolve()) or not (path / RECIPE_FILE).is_file():
            raise TunelabError(f"no run '{name}' in {self.root}")
        return path

    def summaries(self, active: set[Path], ended: dict[Path, float],
                  queued: frozenset[Path] = frozenset()) -> list[dict]:
        """One summary per run folder, newest first."""
        rows = [self.summary(path, active, ended, queued) for path in self.run_dirs()]
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
        """A run's summary plus its log, progress, metrics, recipe text and files."""
        run_dir = self.resolve(name)
        log = read_log(run_dir)
        error = run_dir / UI_ERROR_FILE
        return {**self.summary(run_dir, active, ended, queued), "log": log, "progress": progress(log),
                "metrics": read_metrics(run_dir), "recipe": read_recipe(run_dir),
                "recipe_text": (run_dir / RECIPE_FILE).read_text(encoding="utf-8"),
                "error": error.read_text(encoding="utf-8") if error.is_file() else None,
                "files": list_files(run_dir)}


def scandir(path: Path) -> list[os.DirEntry]:
    """The entries of a folder (none when it is missing)."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


def file_stamps(run_dir: Path) -> tuple:
    """Modification times of the files a status and summary depend on (None: missing)."""
    stamps = []
    for name in (RECIPE_FILE, METRICS_FILE, LOG_FILE, BASELINE_FILE, UI_ERROR_FILE):
        try:
            stamps.append(os.stat(run_dir / name).st_mtime)
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def static_summary(run_dir: Path, name: str) -> dict:
    """The parts of a summary that change only when a file changes."""
    recipe = read_recipe(run_dir) or {}
    metrics = read_metrics(run_dir)
    method = recipe.get("method")
    return {"name": name, "task": recipe.get("task"), "model": (recipe.get("model") or {}).get("name"),
            "method": method.get("name") if isinstance(method, dict) else method,
            "headline": headline(metrics),
            "samples_per_second": (metrics or {}).get("train_samples_per_second"),
            "started": os.stat(run_dir / RECIPE_FILE).st_mtime}


def status(run_dir: Path, stamps: tuple, active: set[Path], ended: dict[Path, float],
           queued: frozenset[Path] = frozenset()) -> str:
    """finished, running, queued, failed or interrupted (see the module docstring)."""
    _, metrics, *written, ui_error = stamps
    if metrics is not None:
        return "finished"
    if run_dir in active:
        return "running"
    if run_dir in queued:
        return "queued"
    latest = max((stamp for stamp in written if stamp is not None), default=0.0)
    if latest > ended.get(run_dir, 0.0) and time.time() - latest < RECENT_SECONDS:
        return "running"
    return "failed" if ui_error is not None else "interrupted"


def list_files(run_dir: Path) -> list[dict]:
    """The run folder's files (not checkpoints) with their sizes, for links."""
    files = []
    for path in sorted(run_dir.rglob("*")):
        relative = path.relative_to(run_dir)
        if path.is_file() and relative.parts[0] != "checkpoints" and not relative.name.startswith("."):
            files.append({"path": relative.as_posix(), "bytes": path.stat().st_size})
    return files
