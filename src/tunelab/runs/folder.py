"""Run folders: created so that they never overwrite earlier runs, written atomically, and read back (`RunFolder`)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunelab.errors import TunelabError
from tunelab.recipe import Recipe, describe_validation_error, recipe_from
from tunelab.tasks import TASKS, Task

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
PER_ROW_FILE = "per_row.json"  # each eval row's outcome before and after (gold/predicted or 0/1 values)
CHECKPOINTS = "checkpoints"  # the Trainer's checkpoints inside a run folder (removed when it finishes)
MODEL_DIR = "model"


class RunFolder:
    """A run folder read back, the one way every command reads runs (predict, generate and chat, serve, export,
    the judge, earlier-run checks, pipelines): its resolved recipe as its task's typed recipe class, its metrics
    once it finished, its model folder. (The board reads folders it does not trust with runs/reading.py, which
    never raises.)"""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def model_dir(self) -> Path:
        """The run's saved weights (or peft adapter) and tokenizer."""
        return self.path / MODEL_DIR

    @property
    def is_run(self) -> bool:
        """Whether the folder holds a recipe.yaml and a model/ (a plain model folder does not)."""
        return (self.path / RECIPE_FILE).is_file() and self.model_dir.is_dir()

    @property
    def finished(self) -> bool:
        """metrics.json is written last: its presence marks a finished run."""
        return (self.path / METRICS_FILE).is_file()

    @cached_property
    def recipe(self) -> Recipe:
        """The saved recipe, validated again (one written by an older tunelab loads too)."""
        try:
            return recipe_from(yaml.safe_load((self.path / RECIPE_FILE).read_text(encoding="utf-8")))
        except OSError as exc:
            raise TunelabError(f"'{self.path}' is not a run folder: {exc.strerror} reading its {RECIPE_FILE}; give a "
                               f"folder that `tunelab train` wrote") from None
        except (ValidationError, yaml.YAMLError) as exc:
            problem = describe_validation_error(exc) if isinstance(exc, ValidationError) else "not valid YAML"
            raise TunelabError(f"run '{self.path}': its {RECIPE_FILE} is not a recipe this tunelab reads "
                               f"({problem}); fix it, or use the tunelab version that wrote it") from None

    @property
    def task(self) -> Task:
        """The run's task in the registry: what its model can do."""
        return TASKS[self.recipe.task]

    @property
    def method(self) -> str:
        """The recipe's method name (full, lora, …)."""
        return self.recipe.method.name

    @property
    def adapter(self) -> bool:
        """Whether model/ holds a peft adapter rather than full weights."""
        return (self.model_dir / "adapter_config.json").is_file()

    @cached_property
    def metrics(self) -> dict:
        """metrics.json; {} while the run has not finished."""
        if not self.finished:
            return {}
        return json.loads((self.path / METRICS_FILE).read_text(encoding="utf-8"))

    @property
    def labels(self) -> list[str]:
        """The label names a classifier run trained on ([] for other tasks)."""
        return list(self.metrics.get("labels") or [])


def run_folder(path: str | Path) -> RunFolder | None:
    """The run folder at `path`, or None when it is not one (e.g. a plain model folder)."""
    run = RunFolder(path)
    return run if run.is_run else None


def finished_run(path: str | Path, command: str) -> RunFolder:
    """The finished run at `path`, or a one-line refusal naming what `command` needs."""
    run = RunFolder(path)
    if not run.is_run:
        raise TunelabError(f"{command}: '{run.path}' is not a run folder (no {RECIPE_FILE} and {MODEL_DIR}/); give a "
                           f"folder that `tunelab train` wrote")
    if not run.finished:
        raise TunelabError(f"{command}: run '{run.path}' has not finished (no {METRICS_FILE}); finish it with "
                           f"`tunelab train RECIPE --output {run.path} --resume` first")
    return run


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically, indented for people."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line, atomically."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one event to a JSONL log (a line is written whole or not at all on POSIX)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def default_run_path(recipe: Recipe) -> Path:
    """`<output.root>/<recipe name>-<timestamp>`."""
    return Path(recipe.output.root) / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_run_folder(recipe: Recipe, output: str | None, resume: bool) -> Path:
    """Create a new run folder, or reopen an unfinished one to resume; never touch a finished or foreign folder."""
    if resume:
        if output is None:
            raise TunelabError("--resume needs --output RUN_DIR naming the run to resume")
        return reopen_for_resume(Path(output), recipe)
    path = Path(output) if output else default_run_path(recipe)
    if path.exists():
        raise TunelabError(f"output folder '{path}' already exists; choose a new --output "
                           f"(runs are never overwritten) or add --resume to finish an interrupted run")
    path.mkdir(parents=True)
    write_text_atomic(path / RECIPE_FILE, recipe.to_yaml())
    return path


def same_recipe(saved_yaml: str, recipe: Recipe) -> bool:
    """Whether a saved resolved recipe asks for the same run as `recipe`.

    The saved one is validated again with the current schema first, so an option added to tunelab since the run
    started (written out with its default) does not block resuming it.
    """
    if saved_yaml == recipe.to_yaml():
        return True
    try:
        return recipe_from(yaml.safe_load(saved_yaml)).to_yaml() == recipe.to_yaml()
    except (ValueError, yaml.YAMLError):  # not a valid recipe (any more)
        return False


def reopen_for_resume(path: Path, recipe: Recipe) -> Path:
    """Check that `path` is an unfinished run of this same recipe."""
    saved = path / RECIPE_FILE
    if not saved.is_file():
        raise TunelabError(f"cannot resume '{path}': it is not a run folder (no {RECIPE_FILE}); "
                           f"drop --resume to start a new run")
    if (path / METRICS_FILE).is_file():
        raise TunelabError(f"cannot resume '{path}': that run already finished; start a new run with another --output")
    if not same_recipe(saved.read_text(encoding="utf-8"), recipe):
        raise TunelabError(f"cannot resume '{path}': the recipe differs from the one it started with "
                           f"({saved}); resume with that recipe")
    return path
