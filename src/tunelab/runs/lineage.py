"""Stage chaining: which models and earlier runs a run started from (pretrain → sft → dpo …)."""

from __future__ import annotations

from pathlib import Path

from tunelab.runs.folder import RECIPE_FILE, RunFolder


def run_chain(model_name: str) -> list[str]:
    """The chain that leads to `model_name`: the first base model, then every run folder built on it, in order."""
    run = RunFolder(Path(model_name).expanduser())
    if not (run.path / RECIPE_FILE).is_file():
        return [model_name]
    earlier = run.metrics.get("chain")
    if earlier:
        return [*earlier, model_name]
    return [*run_chain(run.recipe.model.name), model_name]
