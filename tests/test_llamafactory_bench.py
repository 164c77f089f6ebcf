"""The LLaMA-Factory way of the SFT benchmark gets tunelab's settings and rows (benchmarks/llamafactory_sft.py)."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

from tunelab.recipe import load_recipe

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llamafactory_sft.py"
spec = importlib.util.spec_from_file_location("llamafactory_sft", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_llamafactory_trains_with_the_recipes_settings(tmp_path):
    recipe = load_recipe(bench.RECIPE, bench.SETTINGS)
    config = bench.llamafactory_config(recipe, "/models/smollm2", tmp_path / "data", tmp_path / "out", train=True)
    assert (recipe.method.r, recipe.method.alpha, recipe.method.dropout) == (16, 32, 0.0)
    assert (config["lora_rank"], config["lora_alpha"], config["lora_dropout"], config["lora_target"]) == (
        16, 32, 0.0, "all")
    assert (config["learning_rate"], config["lr_scheduler_type"], config["warmup_ratio"], config["weight_decay"]) == (
        2e-4, "linear", 0.1, 0.01)
    assert (config["num_train_epochs"], config["per_device_train_batch_size"], config["cutoff_len"]) == (2, 4, 512)
    assert config["bf16"] and config["use_cpu"] and config["disable_gradient_checkpointing"]
    assert not recipe.train.gradient_checkpointing and recipe.train.precision == "bf16"
    scoring = bench.llamafactory_config(recipe, "/models/smollm2", tmp_path / "data", tmp_path / "out", train=False)
    assert scoring["do_eval"] and not scoring["do_train"] and scoring["adapter_name_or_path"] == str(tmp_path / "out")


def test_the_exported_rows_are_tunelabs_rows_in_sharegpt_form(tmp_path):
    chats = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(3)]
    bench.write_dataset(tmp_path, SimpleNamespace(train={"messages": chats}, eval={"messages": chats[:1]}))
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["train"]["formatting"] == "sharegpt" and info["train"]["tags"]["assistant_tag"] == "assistant"
    assert json.loads((tmp_path / "train.json").read_text()) == [{"messages": chat} for chat in chats]
    assert len(json.loads((tmp_path / "eval.json").read_text())) == 1
