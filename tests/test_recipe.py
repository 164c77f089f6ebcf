"""The recipe schema: defaults made explicit, shorthands, overrides, and one-line errors."""

from __future__ import annotations

import pytest

from tunelab.errors import TunelabError
from tunelab.recipe import DEFAULT_LEARNING_RATES, LoraMethod, apply_override, load_recipe, validate_recipe

BASE = {"name": "r", "task": "classify", "model": {"name": "minilm"}, "data": {"source": "x.jsonl"}}


def test_method_defaults_are_written_into_the_resolved_recipe():
    recipe = validate_recipe({**BASE, "method": "lora"})
    assert isinstance(recipe.method, LoraMethod)
    assert recipe.method.alpha == 2 * recipe.method.r
    assert recipe.train.learning_rate == DEFAULT_LEARNING_RATES["lora"]
    assert "learning_rate: 0.001" in recipe.to_yaml()


def test_explicit_learning_rate_wins_over_the_method_default():
    recipe = validate_recipe({**BASE, "method": "lora", "train": {"learning_rate": 5e-5}})
    assert recipe.train.learning_rate == 5e-5


def test_resolved_recipe_round_trips_to_the_same_recipe(tmp_path):
    recipe = validate_recipe({**BASE, "method": {"name": "freeze", "train_top_layers": 2}})
    path = tmp_path / "again.yaml"
    path.write_text(recipe.to_yaml())
    assert load_recipe(path) == recipe


def test_overrides_are_parsed_as_typed_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: classify\nmodel: {name: minilm}\ndata: {source: x.jsonl}\nmethod: lora\n")
    recipe = load_recipe(path, ["train.epochs=2.5", "method.r=8", "method.target_modules=[query, value]",
                                "data.labels=null"])
    assert recipe.name == "r"
    assert recipe.train.epochs == 2.5
    assert recipe.method.r == 8 and recipe.method.alpha == 16
    assert recipe.method.target_modules == ["query", "value"]


def test_override_can_switch_the_method_shorthand_into_a_section():
    raw = {**BASE, "method": "lora"}
    apply_override(raw, "method.r=4")
    assert raw["method"] == {"name": "lora", "r": 4}


@pytest.mark.parametrize(("raw", "expected"), [
    ({**BASE, "modle": {}}, "unknown key 'modle'; valid keys here: name, task, model, data"),
    ({**BASE, "train": {"epoch": 3}}, "unknown key 'train.epoch'; valid keys here: epochs"),
    ({**BASE, "method": {"name": "lora", "rank": 8}}, "unknown key 'method.rank'; valid keys here: name, r, alpha"),
    ({**BASE, "method": "adapterz"}, "'method.name' must be one of full, freeze, lora"),
    ({**BASE, "train": {"epochs": "many"}}, "'train.epochs' = 'many' is invalid"),
    ({"task": "classify", "model": {"name": "m"}, "name": "r"}, "'data' is required"),
    ({**BASE, "task": "summarise"}, "'task' = 'summarise' is invalid"),
    ({**BASE, "train": {"precision": "fp8"}}, "'train.precision' = 'fp8' is invalid"),
])
def test_schema_problems_become_one_line_errors_naming_the_field(raw, expected):
    with pytest.raises(TunelabError) as caught:
        validate_recipe(raw)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message
