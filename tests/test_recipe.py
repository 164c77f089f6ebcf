"""The recipe schema: defaults made explicit, shorthands, overrides, and one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tunelab.errors import TunelabError
from tunelab.recipe import (
    DEFAULT_LEARNING_RATES,
    FLAT_RECIPE_DEFAULTS,
    RECIPE_CLASSES,
    LoraMethod,
    apply_override,
    load_recipe,
    task_sections,
    validate_recipe,
)

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
    ({**BASE, "grpo": {"beta": 0.5}}, "section 'grpo' configures task grpo, not classify; task classify takes "
                                      "name, task, model, data, method, train, eval, output"),
    ({**BASE, "train": {"precision": "fp8"}}, "'train.precision' = 'fp8' is invalid"),
])
def test_schema_problems_become_one_line_errors_naming_the_field(raw, expected):
    with pytest.raises(TunelabError) as caught:
        validate_recipe(raw)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


FLAT_RECIPES = Path(__file__).parent / "fixtures" / "flat_recipes"


@pytest.mark.parametrize("path", sorted(FLAT_RECIPES.glob("*.yaml")), ids=lambda path: path.stem)
def test_a_run_folders_recipe_written_by_the_flat_schema_still_loads_as_its_tasks_recipe(path):
    """Before each task had its recipe class, recipe.yaml listed every task's sections at their defaults (one file per
    task in fixtures/, written by that version): it loads, keeps what its task takes, and drops only the rest."""
    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe = load_recipe(path)
    assert type(recipe) is RECIPE_CLASSES[path.stem]
    loaded = recipe.model_dump(mode="json")
    assert list(loaded) == task_sections(path.stem)
    for section, value in loaded.items():  # every value written is kept (keys added since take their defaults)
        if isinstance(value, dict):
            assert {key: value[key] for key in written[section] if key in value} == {
                key: item for key, item in written[section].items() if key in value}, section
            assert set(written[section]) - set(value) <= set(FLAT_RECIPE_DEFAULTS.get(section, {})), section
        else:
            assert written[section] == value, section
    assert load_recipe(path).to_yaml() == recipe.to_yaml()


@pytest.mark.parametrize(("task", "section", "value", "expected"), [
    ("kto", "preference", {"loss": "ipo"}, "unknown key 'preference.loss'; valid keys here: beta, desirable_weight"),
    ("dpo", "preference", {"desirable_weight": 2.0}, "unknown key 'preference.desirable_weight'; valid keys here"),
    ("sft", "fewshot", {"epochs": 2}, "section 'fewshot' configures task fewshot, not sft; task sft takes name, task"),
    ("classify", "reward", {"function": "exact_match"}, "section 'reward' configures task grpo, not classify"),
])
def test_a_section_that_is_not_the_tasks_is_refused_even_beside_flat_defaults(task, section, value, expected, tmp_path):
    """Only the flat schema's defaults are dropped: a value someone set in another task's section is refused."""
    written = yaml.safe_load((FLAT_RECIPES / f"{task}.yaml").read_text(encoding="utf-8"))
    written[section] = {**written.get(section, {}), **value}
    with pytest.raises(TunelabError, match=re.escape(expected)):
        validate_recipe(written)


SFT = {**BASE, "task": "sft"}


def test_the_lora_and_neftune_knobs_default_to_plain_lora_without_noise():
    recipe = validate_recipe({**SFT, "method": "lora"})
    method = recipe.method
    assert (method.use_rslora, method.init_lora_weights, method.loraplus_lr_ratio) == (False, "default", None)
    assert recipe.train.neftune_noise_alpha is None and recipe.train.padding_free is True


def test_neftune_trains_sft_in_padded_batches_and_says_so_in_the_resolved_recipe():
    recipe = validate_recipe({**SFT, "train": {"neftune_noise_alpha": 5}})
    assert recipe.train.padding_free is False
    assert validate_recipe(yaml.safe_load(recipe.to_yaml())) == recipe


LORA = {"name": "lora"}


@pytest.mark.parametrize(("changes", "expected"), [
    ({"method": {"name": "dora", "init_lora_weights": "pissa"}},
     "method.init_lora_weights pissa moves part of each base weight into the adapter, and peft's conversion to a "
     "plain adapter drops DoRA's magnitudes; use method lora or init_lora_weights default"),
    ({"method": {"name": "qlora", "init_lora_weights": "olora"}}, "and a 4-bit base quantizes the residual"),
    ({"task": "dpo", "method": {**LORA, "init_lora_weights": "pissa"}},
     "task dpo needs the base as it was (its head or its reference model); use it with tasks sft, pretrain, seq2seq"),
    ({"task": "classify", "method": {**LORA, "init_lora_weights": "olora"}}, "task classify needs the base as it was"),
    ({"method": {**LORA, "init_lora_weights": "pissa"}, "train": {"distributed": {"strategy": "deepspeed"}}},
     "which DeepSpeed may shard (ZeRO-3); use train.distributed.strategy ddp or init_lora_weights default"),
    ({"method": {**LORA, "loraplus_lr_ratio": 16}, "train": {"distributed": {"strategy": "deepspeed"}}},
     "method.loraplus_lr_ratio builds the optimizer's learning-rate groups in the Trainer"),
    ({"method": {**LORA, "loraplus_lr_ratio": 0}}, "'method.loraplus_lr_ratio' = 0 is invalid"),
    ({"method": {**LORA, "init_lora_weights": "loftq"}}, "'method.init_lora_weights' = 'loftq' is invalid"),
    ({"task": "pretrain", "train": {"neftune_noise_alpha": 5}},
     "train.neftune_noise_alpha adds noise to the embeddings in instruction tuning (tasks sft); drop it for task "
     "pretrain"),
    ({"train": {"neftune_noise_alpha": 5, "padding_free": True}}, "train.padding_free makes a batch one row of all "
                                                                  "its rows (far weaker noise); drop "
                                                                  "train.padding_free"),
    ({"train": {"neftune_noise_alpha": 5, "packing": True}}, "drop train.packing"),
    ({"train": {"neftune_noise_alpha": -1}}, "'train.neftune_noise_alpha' = -1 is invalid"),
])
def test_the_lora_and_neftune_knobs_are_refused_where_they_cannot_hold(changes, expected):
    with pytest.raises(TunelabError) as caught:
        validate_recipe({**SFT, **changes})
    assert expected in str(caught.value) and "\n" not in str(caught.value)
