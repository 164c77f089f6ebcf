"""train.distributed beyond DDP: the FSDP and DeepSpeed options the recipe turns into, and the one-line refusals of
what those engines would not do as asked (fast: nothing here trains; test_distributed.py trains under ZeRO)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import toy_recipe

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.recipe import DistributedConfig, load_recipe
from tunelab.sharding import PRESETS, check_strategy, deepspeed_config, fsdp_loading, training_options


def write_config(tmp_path, config) -> str:
    path = tmp_path / "ds.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


@pytest.fixture
def recipe_file(tiny_bert, toy_data, tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(toy_recipe(tiny_bert, toy_data)))
    return path


@pytest.mark.parametrize("key, value, owner", [("sharding", "hybrid", "fsdp"), ("deepspeed", "zero3", "deepspeed")])
def test_an_option_of_another_strategy_is_refused(recipe_file, key, value, owner):
    with pytest.raises(TunelabError, match=f"train.distributed.{key} applies to strategy {owner}, not ddp"):
        load_recipe(recipe_file, [f"train.distributed.{key}={value}"])


@pytest.mark.parametrize("overrides, nproc, message", [
    (["train.distributed.strategy=fsdp"], "2", "train.distributed.strategy fsdp shards decoders trained in full "
                                                "(tasks sft and pretrain, method full: transformers' FSDP2 takes no "
                                                "peft adapters yet), not task classify with method full"),
    (["train.distributed.strategy=deepspeed"], None, "train.distributed.strategy deepspeed shards the model over "
                                                     "several processes, and this run has one; add --nproc N"),
    (["train.distributed.strategy=deepspeed", "train.distributed.deepspeed=zero3_offload"], "2",
     "DeepSpeed offload moves state from GPU memory to CPU memory, and this run trains on CPU"),
    (["train.distributed.strategy=deepspeed", "train.distributed.deepspeed=zero4"], "2",
     "train.distributed.deepspeed 'zero4' is neither a preset (zero2, zero3, zero3_offload) nor an existing JSON"),
])
def test_a_strategy_that_cannot_run_here_is_refused_in_one_line_before_anything_starts(
        recipe_file, tmp_path, capsys, overrides, nproc, message):
    output = tmp_path / "never"
    launch = ["--nproc", nproc] if nproc else []
    assert main(["train", str(recipe_file), *overrides, "--output", str(output), *launch]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith(f"error: {message}"), error
    assert not output.exists()


def test_an_fsdp_run_is_not_resumed(tiny_llama, toy_data, tmp_path, capsys):
    recipe = toy_recipe(tiny_llama, toy_data, task="sft")
    recipe["data"] = {"source": str(toy_data), "prompt_template": "{sentence}", "response_template": " {sentiment}"}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "train.distributed.strategy=fsdp", "--output", str(tmp_path / "run"),
                 "--nproc", "2", "--resume"]) == 2
    assert capsys.readouterr().err.startswith("error: --resume cannot continue an fsdp run")


def test_hybrid_sharding_needs_several_machines():
    fsdp = DistributedConfig(strategy="fsdp", sharding="hybrid")
    with pytest.raises(TunelabError, match="this run has one machine; use sharding: full"):
        check_strategy(fsdp, world_size=4, nnodes=1, cuda=True)
    check_strategy(fsdp, world_size=4, nnodes=2, cuda=True)  # two machines of two GPUs: allowed


def test_one_gpu_may_shard_under_the_launcher_for_offload():
    offload = DistributedConfig(strategy="deepspeed", deepspeed="zero3_offload")
    check_strategy(offload, world_size=1, nnodes=1, cuda=True, launched=True)  # --nproc 1 on one GPU
    with pytest.raises(TunelabError, match="deepspeed on one GPU: --nproc 1 runs it under the launcher"):
        check_strategy(offload, world_size=1, nnodes=1, cuda=True, launched=False)
    with pytest.raises(TunelabError, match="strategy fsdp shards the model over several processes"):
        check_strategy(DistributedConfig(strategy="fsdp"), world_size=1, nnodes=1, cuda=True, launched=True)


@pytest.mark.parametrize("config, message", [
    ("{not json", "is not valid JSON"),
    ({"zero_optimization": {"stage": 1}}, "has zero_optimization.stage 1; tunelab runs ZeRO stage 2 or 3"),
    ({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}},
     "sets train_micro_batch_size_per_gpu; the recipe decides these"),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, "sets bf16.enabled; the recipe decides"),
    ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}},
     "tunelab saves the trained model whole"),
])
def test_a_users_deepspeed_config_is_checked(tmp_path, config, message):
    with pytest.raises(TunelabError, match=message):
        deepspeed_config(write_config(tmp_path, config))


def test_a_users_deepspeed_config_keeps_its_own_settings(tmp_path):
    config = {"train_batch_size": "auto", "bf16": {"enabled": "auto"},
              "zero_optimization": {"stage": 3, "overlap_comm": True}}
    loaded = deepspeed_config(write_config(tmp_path, config))
    assert loaded["zero_optimization"] == {"stage": 3, "overlap_comm": True,
                                           "stage3_gather_16bit_weights_on_model_save": True}
    assert json.loads((tmp_path / "ds.json").read_text()) == config  # the user's file is left as it was


def test_presets_are_handed_out_as_copies():
    config = deepspeed_config("zero3")
    config["zero_optimization"]["stage"] = 2  # transformers fills in a config's "auto" values in place
    assert PRESETS["zero3"]["zero_optimization"]["stage"] == 3
    assert training_options(DistributedConfig(strategy="deepspeed", deepspeed="zero2")) == {
        "deepspeed": PRESETS["zero2"]}


def test_fsdp_shards_the_model_as_it_loads(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    full = fsdp_loading(DistributedConfig(strategy="fsdp"))["distributed_config"]
    assert (full.fsdp_size, full.dp_replicate_size) == (8, 1)
    hybrid = fsdp_loading(DistributedConfig(strategy="fsdp", sharding="hybrid"))["distributed_config"]
    assert (hybrid.fsdp_size, hybrid.dp_replicate_size) == (4, 2)  # sharded over a machine's 4, replicated over 2
    assert fsdp_loading(DistributedConfig()) == {}  # ddp: every process loads the whole model
    # the Trainer takes the sharded model as it is, and checkpoints it without optimizer state (no resume)
    assert training_options(DistributedConfig(strategy="fsdp")) == {"save_only_model": True}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fsdp_loading(DistributedConfig(strategy="fsdp")) == {}
