"""RunFolder: the one way commands read a run folder back — its task's typed recipe (also one an older tunelab
wrote), its metrics once finished, its model folder — and the one-line refusals when it is not a finished run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.recipe import KtoRecipe
from tunelab.runs.folder import RunFolder, finished_run, run_folder
from tunelab.tasks import TASKS

FLAT_RECIPES = Path(__file__).parent / "fixtures" / "flat_recipes"


def make_run(path: Path, task: str, metrics: dict | None) -> Path:
    """A run folder as `tunelab train` leaves it, with the recipe.yaml an older (flat-schema) tunelab wrote."""
    (path / "model").mkdir(parents=True)
    shutil.copy(FLAT_RECIPES / f"{task}.yaml", path / "recipe.yaml")
    if metrics is not None:
        (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_a_finished_run_reads_back_typed(tmp_path):
    run = finished_run(make_run(tmp_path / "kto", "kto", {"labels": [], "before": {}, "after": {}}), "export")
    assert isinstance(run.recipe, KtoRecipe) and run.recipe.preference.desirable_weight == 1.0
    assert run.task is TASKS["kto"] and run.method == "lora" and not run.adapter
    assert run.model_dir == tmp_path / "kto" / "model" and run.finished and run.labels == []


def test_labels_come_from_the_metrics(tmp_path):
    run = RunFolder(make_run(tmp_path / "c", "classify", {"labels": ["a", "b"]}))
    assert run.labels == ["a", "b"] and run.task.labels


def test_what_is_not_a_finished_run_is_refused_in_one_line(tmp_path):
    assert run_folder(tmp_path) is None  # a plain folder
    with pytest.raises(TunelabError, match=r"export: '.*' is not a run folder \(no recipe.yaml and model/\)"):
        finished_run(tmp_path, "export")
    unfinished = make_run(tmp_path / "u", "sft", None)
    assert RunFolder(unfinished).metrics == {}
    with pytest.raises(TunelabError, match=r"has not finished \(no metrics.json\); finish it with `tunelab train"):
        finished_run(unfinished, "tunelab serve")


def test_a_recipe_this_tunelab_cannot_read_is_named(tmp_path):
    broken = make_run(tmp_path / "b", "sft", {})
    (broken / "recipe.yaml").write_text("name: b\ntask: summarise\nmodel: {name: x}\ndata: {source: y}\n")
    with pytest.raises(TunelabError, match=r"its recipe.yaml is not a recipe this tunelab reads \('task' = "
                                           r"'summarise' is invalid"):
        _ = RunFolder(broken).task
