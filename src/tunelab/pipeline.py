"""Chained runs: a pipeline file lists stages (recipes), and a stage may start from, or be judged by, the run
folder of an earlier stage — SFT → reward model → DPO or GRPO in one command.

    name: hh-rlhf
    stages:
      sft:
        recipe: hh_sft.yaml          # relative to the pipeline file
      reward:
        recipe: hh_reward.yaml
      dpo:
        recipe: hh_dpo.yaml
        set:                         # dotted-key overrides; {sft} is the sft stage's run folder
          model.name: "{sft}"
          eval.judge.model: "{reward}"

Stages run in order, each into OUTPUT/<stage>. Every recipe is checked before the first stage starts. Running
the same command again skips finished stages and resumes an interrupted one, so a killed chain goes on from where
it stopped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.errors import TunelabError
from tunelab.recipe import Recipe, load_recipe
from tunelab.runs.folder import RunFolder, write_json_atomic

REFERENCE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]*)\}")
SUMMARY_FILE = "pipeline.json"


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str = Field(description="Recipe file of this stage, relative to the pipeline file")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted-key overrides of the recipe; '{stage}' "
                                                                  "in a value is that earlier stage's run folder")


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    stages: dict[str, Stage] = Field(min_length=1, description="Stages in the order they run")


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline file, or raise TunelabError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"pipeline file '{path}' does not exist; give the path to a pipeline .yaml "
                           f"(see examples/rlhf_pipeline.yaml)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "the file"
        raise TunelabError(f"pipeline '{path}': {where}: {problem['msg']} (a pipeline has name and stages: "
                           f"<stage>: {{recipe: FILE, set: {{dotted.key: value}}}})") from None


def stage_recipes(pipeline: Pipeline, base: Path, output: Path) -> dict[str, Recipe]:
    """Every stage's recipe with its overrides applied and earlier stages' run folders filled in, validated."""
    folders: dict[str, str] = {}
    recipes = {}
    for name, stage in pipeline.stages.items():
        overrides = [f"{key}={fill_references(value, folders, name)}" for key, value in stage.set.items()]
        recipes[name] = load_recipe(base / stage.recipe, overrides)
        folders[name] = str(output / name)
    return recipes


def fill_references(value: Any, folders: dict[str, str], stage: str) -> Any:
    """Replace each {earlier_stage} in a string value by that stage's run folder."""
    if not isinstance(value, str):
        return value

    def folder(match: re.Match) -> str:
        if match.group(1) not in folders:
            raise TunelabError(f"stage '{stage}' refers to '{{{match.group(1)}}}', which is not an earlier stage "
                               f"(earlier: {', '.join(folders) or 'none'}); stages may use only the run folders of "
                               f"stages listed before them")
        return folders[match.group(1)]

    return REFERENCE.sub(folder, value)


def run_pipeline(path: str | Path, output: str | None = None) -> dict[str, dict]:
    """Run (or finish) every stage in order; write OUTPUT/pipeline.json and return stage → {run, metrics}."""
    from tunelab import api  # the training stack loads only when a pipeline really runs

    pipeline = load_pipeline(path)
    root = Path(output) if output else Path("runs") / pipeline.name
    recipes = stage_recipes(pipeline, Path(path).parent, root)
    results = {}
    for name, recipe in recipes.items():
        run_dir = root / name
        if RunFolder(run_dir).finished:
            print(f"tunelab: stage {name}: finished earlier, kept ({run_dir})")
            metrics = RunFolder(run_dir).metrics
        else:
            resume = run_dir.exists()
            print(f"tunelab: stage {name}: {'resuming' if resume else 'starting'} {recipe.task} run in {run_dir}")
            _, metrics = api.train(recipe, str(run_dir), resume)
        results[name] = {"run": str(run_dir), "task": recipe.task, "before": metrics["before"],
                         "after": metrics["after"], **({"win_rate": metrics["win_rate"]} if "win_rate" in metrics
                                                       else {})}
        write_json_atomic(root / SUMMARY_FILE, {"pipeline": pipeline.name, "stages": results})
    return results
