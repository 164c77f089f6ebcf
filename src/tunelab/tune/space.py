"""`tunelab tune`'s search space: recipe keys mapped to Optuna distributions.

A space is YAML over dotted recipe keys, one kind per key:

    train.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}
    train.warmup_ratio: {uniform: [0.0, 0.2]}
    train.epochs: {int: [1, 10]}
    method.r: {choice: [4, 8, 16, 32]}

Every key is checked against the recipe schema before any trial runs: the recipe is validated with each end of each
range and each choice put in, so a key that is no recipe key, or a range the schema refuses, stops the search in one
line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from tunelab.errors import TunelabError
from tunelab.recipe import Recipe, set_dotted, validate_recipe

KINDS = ("log_uniform", "uniform", "int", "int_log", "choice")


def read_space(path: str | Path) -> dict[str, BaseDistribution]:
    """The space of a YAML file (see the module's docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"--space '{path}' does not exist; give a YAML file of recipe keys and ranges")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TunelabError(f"--space '{path}' is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_space(raw, f"--space '{path}'")


def parse_space(raw: object, source: str) -> dict[str, BaseDistribution]:
    """Optuna distributions of a space mapping {key: {kind: bounds or choices}}."""
    if not isinstance(raw, dict) or not raw:
        raise TunelabError(f"{source} must map recipe keys to ranges, e.g. train.learning_rate: "
                           f"{{log_uniform: [1.0e-5, 1.0e-3]}}")
    return {str(key): distribution(str(key), spec, source) for key, spec in raw.items()}


def distribution(key: str, spec: object, source: str) -> BaseDistribution:
    """One key's distribution; a malformed spec is refused naming the key and the kinds."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise TunelabError(f"{source}: '{key}' needs one of {', '.join(KINDS)} (e.g. {{log_uniform: [1.0e-5, "
                           f"1.0e-3]}} or {{choice: [4, 8, 16]}}), got {spec!r}")
    kind, bounds = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(bounds, list) or not bounds:
            raise TunelabError(f"{source}: '{key}' choice needs a non-empty list of values")
        return CategoricalDistribution(bounds)
    numbers = isinstance(bounds, list) and len(bounds) == 2 and all(
        isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
    if not numbers or bounds[0] >= bounds[1]:
        raise TunelabError(f"{source}: '{key}' {kind} needs [low, high] with low < high, got {bounds!r}")
    low, high = bounds
    if kind in ("log_uniform", "int_log") and low <= 0:
        raise TunelabError(f"{source}: '{key}' {kind} needs low > 0 (a log scale), got {low}")
    if kind in ("int", "int_log"):
        if low != int(low) or high != int(high):
            raise TunelabError(f"{source}: '{key}' {kind} needs whole numbers, got {bounds!r}")
        return IntDistribution(int(low), int(high), log=kind == "int_log")
    return FloatDistribution(float(low), float(high), log=kind == "log_uniform")


def corners(dist: BaseDistribution) -> list[Any]:
    """The values a space check tries: both ends of a range, every choice."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def with_values(raw_recipe: dict, values: dict[str, Any]) -> dict:
    """A copy of the raw recipe with each dotted key set to its value."""
    raw = copy.deepcopy(raw_recipe)
    for key, value in values.items():
        set_dotted(raw, key, value, f"search space key '{key}'")
    return raw


# Keys that decide which rows are trained on, picked on or reported, or what is scored: a search over them would
# compare trials on different rows (or move the reported split), so they stay as the recipe sets them.
FIXED_KEYS = ("name", "task", "output", "eval", "data.source", "data.train_split", "data.eval_split",
              "data.eval_size", "data.holdout_fraction", "data.validation_split", "data.validation_fraction",
              "data.seed", "data.streaming", "data.text", "data.text_pair", "data.label", "data.labels")


def check_space(raw_recipe: dict, space: dict[str, BaseDistribution]) -> None:
    """Refuse, before any trial, a key that is no recipe key, one that moves the rows or the score (FIXED_KEYS), or a
    value of a range the schema rejects."""
    for key in space:
        fixed = next((prefix for prefix in FIXED_KEYS if key == prefix or key.startswith(f"{prefix}.")), None)
        if fixed is not None:
            raise TunelabError(f"search space key '{key}' cannot be searched: it changes which rows are trained, "
                               f"picked or reported on, or what is scored; set it in the recipe and search "
                               f"train.*, method.* or the task's own section")
    for key, dist in space.items():
        for value in corners(dist):
            try:
                validate_recipe(with_values(raw_recipe, {key: value}), source="recipe")
            except TunelabError as exc:
                raise TunelabError(f"search space key '{key}' = {value!r}: {exc}".replace(": recipe: ", ": ")) \
                    from None


def default_space(recipe: Recipe) -> dict[str, BaseDistribution]:
    """What to search when no --space is given: the learning rate (log scale, from a tenth to three times the
    recipe's: the knob that matters most) and for LoRA-family methods the rank. Not the epochs: each trial keeps its
    best epoch's checkpoint on validation, so their number is chosen inside every trial, and trials of one length
    stay comparable epoch by epoch, which is what pruning compares (a schedule of 4 epochs has decayed by epoch 3,
    one of 15 has not)."""
    rate = recipe.train.learning_rate
    space: dict[str, BaseDistribution] = {"train.learning_rate": FloatDistribution(rate / 10, rate * 3, log=True)}
    if recipe.method.name in ("lora", "dora", "qlora"):
        space["method.r"] = CategoricalDistribution([4, 8, 16, 32])
    return space


def suggest(trial, space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """One trial's values, asked of Optuna through its public suggest_* calls."""
    values: dict[str, Any] = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            values[key] = trial.suggest_categorical(key, list(dist.choices))
        elif isinstance(dist, IntDistribution):
            values[key] = trial.suggest_int(key, dist.low, dist.high, log=dist.log)
        else:
            values[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log)
    return values


def space_as_yaml(space: dict[str, BaseDistribution]) -> dict[str, dict]:
    """The space in its YAML form again (tune.json, space.yaml, the report)."""
    written: dict[str, dict] = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            written[key] = {"choice": list(dist.choices)}
        elif isinstance(dist, IntDistribution):
            written[key] = {"int_log" if dist.log else "int": [dist.low, dist.high]}
        else:
            written[key] = {"log_uniform" if dist.log else "uniform": [dist.low, dist.high]}
    return written


def values_in(recipe: Recipe, space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """The recipe's own value of each space key that lies in its range (the first trial runs them)."""
    resolved = recipe.model_dump(mode="json")
    values = {}
    for key, dist in space.items():
        node: Any = resolved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        inside = node in dist.choices if isinstance(dist, CategoricalDistribution) else (
            isinstance(node, int | float) and not isinstance(node, bool) and dist.low <= node <= dist.high)
        if inside and isinstance(dist, IntDistribution):
            inside, node = float(node).is_integer(), int(node)  # epochs are floats in the schema
        if inside:
            values[key] = node
    return values
