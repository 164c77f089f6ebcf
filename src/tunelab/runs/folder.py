"""Create run folders that never overwrite earlier runs, and write files into them atomically."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import TunelabError
from tunelab.recipe import Recipe

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"


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
        return Recipe.model_validate(yaml.safe_load(saved_yaml)).to_yaml() == recipe.to_yaml()
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
