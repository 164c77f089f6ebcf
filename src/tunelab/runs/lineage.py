"""Stage chaining: which models and earlier runs a run started from (pretrain → sft → dpo …)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def run_chain(model_name: str) -> list[str]:
    """The chain that leads to `model_name`: the first base model, then every run folder built on it, in order."""
    path = Path(model_name).expanduser()
    recipe_file, metrics_file = path / "recipe.yaml", path / "metrics.json"
    if not recipe_file.is_file():
        return [model_name]
    if metrics_file.is_file():
        earlier = json.loads(metrics_file.read_text(encoding="utf-8")).get("chain")
        if earlier:
            return [*earlier, model_name]
    recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    return [*run_chain(str(recipe.get("model", {}).get("name", "?"))), model_name]
