"""sft, pretrain and seq2seq end to end on tiny random models: learning, run folder, generation, chaining, packing."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from conftest import ANSWERS, toy_rows, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer
from trl import SFTConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tunelab import api
from tunelab.cli import main
from tunelab.methods.apply import load_trainable_decoder
from tunelab.models.loading import load_tokenizer
from tunelab.models.precision import bf16_supported
from tunelab.recipe import validate_recipe
from tunelab.stages.sft import TunelabSFTTrainer


def generative_recipe(model, source, task="sft", **sections) -> dict:
    recipe = {"name": f"toy-{task}", "task": task, "model": {"name": str(model), "max_length": 32},
              "data": {"source": str(source), "prompt_template": "{sentence} is", "response_template": " {answer}"},
              "method": "full",
              "train": {"epochs": 8, "batch_size": 8, "learning_rate": 3e-3, "precision": "fp32", "seed": 1},
              "eval": {"generate": {"max_new_tokens": 3, "num_samples": 30}}}
    if task == "pretrain":
        recipe["data"] = {"source": str(source), "text": "sentence"}
    recipe.update(sections)
    return recipe


@pytest.fixture(scope="module")
def sft_run(tiny_llama, qa_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "sft"
    return api.train(validate_recipe(generative_recipe(tiny_llama, qa_data)), str(run_dir))


def test_sft_learns_the_answers(sft_run):
    run_dir, metrics = sft_run
    before, after = metrics["before"], metrics["after"]
    assert before["exact_match"] <= 0.1 and after["exact_match"] >= 0.7  # chance: 1/3
    assert after["loss"] < before["loss"] / 4 and after["perplexity"] < before["perplexity"]
    assert metrics["data_format"] == "template" and metrics["chat_template"] is False
    for name in ["recipe.yaml", "metrics.json", "samples.jsonl", "report.html", "model/config.json", "log.jsonl"]:
        assert (run_dir / name).is_file(), name
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 30 and set(samples[0]) == {"prompt", "reference", "before", "after"}
    assert "Sample generations" in (run_dir / "report.html").read_text()


def test_generate_answers_through_the_runs_prompt_template(sft_run, capsys):
    run_dir, _ = sft_run
    assert main(["generate", str(run_dir), "the day was sad", "a very lovely day", "--max-new-tokens", "1"]) == 0
    answers = [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]
    assert answers == ["bad", "good"]


def test_response_only_loss_trains_less_of_the_sequence(tiny_llama, qa_data, tmp_path):
    recipe = generative_recipe(tiny_llama, qa_data, train={"epochs": 1, "batch_size": 8, "precision": "fp32"})
    recipe["train"]["completion_only_loss"] = False
    _, whole = api.train(validate_recipe(recipe), str(tmp_path / "whole"))
    # Loss over whole sequences includes the random filler words: far higher than over the answers alone.
    assert whole["after"]["loss"] > 1.0


@pytest.fixture(scope="module")
def pretrain_run(tiny_llama, toy_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "pretrain"
    recipe = generative_recipe(tiny_llama, toy_data, task="pretrain",
                               train={"epochs": 6, "batch_size": 4, "learning_rate": 3e-3, "precision": "fp32"})
    return api.train(validate_recipe(recipe), str(run_dir))


def test_pretrain_lowers_held_out_perplexity(pretrain_run):
    _, metrics = pretrain_run
    # random weights: ~ the vocabulary size (24); the shuffled filler words keep the floor near 8
    assert metrics["after"]["perplexity"] <= 0.7 * metrics["before"]["perplexity"]
    assert metrics["packing"] is True and "exact_match" not in metrics["after"]


def test_sft_chains_from_a_pretrain_run_folder(pretrain_run, qa_data, tmp_path, tiny_llama):
    pretrain_dir, _ = pretrain_run
    recipe = generative_recipe(pretrain_dir, qa_data, train={"epochs": 2, "batch_size": 8, "learning_rate": 3e-3,
                                                             "precision": "fp32"})
    run_dir, metrics = api.train(validate_recipe(recipe), str(tmp_path / "sft-after-pretrain"))
    assert metrics["chain"] == [str(tiny_llama), str(pretrain_dir)]
    assert f"{tiny_llama} → {pretrain_dir} → this run" in (run_dir / "report.html").read_text()
    assert metrics["before"]["loss"] == pytest.approx(score_loss_of(pretrain_dir, recipe, tmp_path), rel=1e-4)
    assert metrics["after"]["loss"] < metrics["before"]["loss"]


def score_loss_of(pretrain_dir, recipe, tmp_path) -> float:
    """The eval loss of the pretrain run's saved weights, with no training: the sft run must start from them."""
    recipe = {**recipe, "train": {**recipe["train"], "max_steps": 1, "learning_rate": 1e-12}}
    _, metrics = api.train(validate_recipe(recipe), str(tmp_path / "no-training"))
    return metrics["before"]["loss"]


def test_lora_sft_saves_an_adapter_that_generate_loads(tiny_llama, qa_data, tmp_path, capsys):
    recipe = generative_recipe(tiny_llama, qa_data, method={"name": "lora", "r": 8},
                               train={"epochs": 8, "batch_size": 8, "learning_rate": 1e-2, "precision": "fp32"})
    run_dir, metrics = api.train(validate_recipe(recipe), str(tmp_path / "lora"))
    assert (run_dir / "model" / "adapter_config.json").is_file()
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    capsys.readouterr()  # drop the training output
    assert main(["generate", str(run_dir), "a the good day", "--max-new-tokens", "1"]) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    assert answer in ANSWERS.values()


def test_seq2seq_warm_started_from_an_encoder_learns(tiny_bert, qa_data, tmp_path):
    recipe = generative_recipe(tiny_bert, qa_data, task="seq2seq",
                               data={"source": str(qa_data), "prompt_template": "{sentence}",
                                     "response_template": "{answer}"},
                               train={"epochs": 15, "batch_size": 8, "learning_rate": 3e-3, "precision": "fp32"},
                               eval={"generate": {"max_new_tokens": 1, "num_samples": 30}})
    run_dir, metrics = api.train(validate_recipe(recipe), str(tmp_path / "seq2seq"))
    assert metrics["after"]["loss"] < metrics["before"]["loss"] / 2
    # chance is 1/3 (three answers); 0.67-0.9 seen after 15 epochs, depending on float summation order
    assert metrics["after"]["exact_match"] >= max(0.6, metrics["before"]["exact_match"] + 0.3)
    # `tunelab generate` on the run folder answers as the evaluation's generations did
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()][:6]
    answers = api.generate(str(run_dir), [sample["prompt"] for sample in samples], max_new_tokens=1)
    assert answers == [sample["after"] for sample in samples]


def test_eval_loss_does_not_depend_on_how_training_batches_are_grouped(tiny_llama, qa_data, tmp_path):
    """HF's Trainer would evaluate in length-grouped batches too, and its eval loss (a mean of batch means) would
    then change with the grouping alone."""
    losses = []
    for grouped in (True, False):
        recipe = generative_recipe(tiny_llama, qa_data, task="pretrain",
                                   train={"max_steps": 1, "batch_size": 8, "precision": "fp32",
                                          "group_by_length": grouped},
                                   eval={"batch_size": 4})
        _, metrics = api.train(validate_recipe(recipe), str(tmp_path / f"grouped-{grouped}"))
        losses.append(metrics["before"]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_packed_and_padded_batches_give_the_same_loss(tiny_llama):
    """Padding-free packing (position ids restart per row) must not let rows attend to each other."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    rows = [[3, 5, 7, 9, 11, 4], [6, 8, 10], [12, 13, 14, 15, 16, 17, 18, 19, 5]]
    examples = [{"input_ids": ids, "labels": [-100, *ids[1:]]} for ids in rows]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert packed["input_ids"].shape == (1, sum(map(len, rows))) and "attention_mask" not in packed
    with torch.no_grad():
        out_padded = model(**padded)
        # use_cache=False as TRL's SFTTrainer.compute_loss passes it: with a cache, transformers does not look for
        # packed rows in the position ids (and the rows would attend to each other).
        out_packed = model(**packed, use_cache=False)
        # Positions that do not restart make one long sequence: rows see each other, so the check can fail.
        contaminated = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False)
    assert out_packed.loss == pytest.approx(out_padded.loss.item(), abs=1e-5)
    unpadded = torch.cat([out_padded.logits[i, :len(ids)] for i, ids in enumerate(rows)])
    assert torch.allclose(out_packed.logits[0], unpadded, atol=1e-4)
    assert (contaminated.logits[0] - unpadded).abs().max() > 1e-3


def test_sft_with_packing_learns(tiny_llama, qa_data, tmp_path):
    recipe = generative_recipe(tiny_llama, qa_data)
    recipe["train"]["packing"] = True
    recipe["train"]["epochs"] = 16  # packing puts ~5 rows in each sequence: fewer, fuller steps
    _, metrics = api.train(validate_recipe(recipe), str(tmp_path / "packed"))
    assert metrics["packing"] is True
    assert metrics["after"]["exact_match"] >= 0.7
    assert metrics["train_padded_tokens"] == metrics["train_tokens"]  # no padding at all


SIMPLE_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %} is{% else %}</s>"
                   "{% endif %}{% endfor %}")


def test_chat_streams_replies_through_the_chat_template(tiny_llama, qa_data, tmp_path, monkeypatch, capsys):
    recipe = generative_recipe(tiny_llama, qa_data)
    recipe["data"]["chat_template"] = SIMPLE_TEMPLATE
    run_dir, metrics = api.train(validate_recipe(recipe), str(tmp_path / "chat"))
    assert metrics["chat_template"] is True and metrics["after"]["exact_match"] >= 0.7
    typed = iter(["the day was sad", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    capsys.readouterr()
    assert main(["chat", str(run_dir), "--max-new-tokens", "1"]) == 0
    replies = [line.removeprefix("model> ").strip() for line in capsys.readouterr().out.splitlines()
               if line.startswith("model> ")]
    assert replies == ["bad"]


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not bf16_supported(), reason="this machine has no native bf16"))])
def test_gradient_checkpointing_trains_the_same_lora_model(tiny_llama, qa_data, tmp_path, precision):
    """Recomputing activations in the backward pass saves memory and must not change what is learned; under bf16
    the recomputed forward pass (run by backward, outside the loss's code) must match the first one too."""
    results = []
    for checkpointing in (False, True):
        recipe = generative_recipe(tiny_llama, qa_data, method={"name": "lora", "r": 8},
                                   train={"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "precision": precision,
                                          "gradient_checkpointing": checkpointing})
        _, metrics = api.train(validate_recipe(recipe), str(tmp_path / f"gc-{checkpointing}"))
        results.append(metrics)
    plain, checkpointed = results
    assert checkpointed["after"]["loss"] == pytest.approx(plain["after"]["loss"], rel=1e-5)
    assert checkpointed["after"]["loss"] < checkpointed["before"]["loss"]


def test_padding_free_batches_train_the_same_model_as_padded_ones(tiny_llama, tmp_path):
    """sft concatenates a batch's rows without padding by default; what it learns must equal padded training."""
    varied = tmp_path / "varied"  # rows of 5 to 8 words, so padded batches do pad
    varied.mkdir()
    for split, count, seed in [("train", 60, 1), ("test", 30, 2)]:
        write_jsonl(varied / f"{split}.jsonl", [{"sentence": " ".join(["very"] * (i % 4) + [row["sentence"]]),
                                                 "answer": ANSWERS[row["sentiment"]]}
                                                for i, row in enumerate(toy_rows(count, seed))])
    results = []
    for padding_free in (False, True):
        # no dropout: its masks are drawn over the batch's shape, which padding-free batches change
        recipe = generative_recipe(tiny_llama, varied, method={"name": "lora", "r": 8, "dropout": 0.0},
                                   train={"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "precision": "fp32",
                                          "padding_free": padding_free, "group_by_length": False})
        _, metrics = api.train(validate_recipe(recipe), str(tmp_path / f"padding-free-{padding_free}"))
        results.append(metrics)
    padded, concatenated = results
    assert (padded["padding_free"], concatenated["padding_free"]) == (False, True)
    assert padded["train_padded_tokens"] > padded["train_tokens"] == concatenated["train_tokens"]
    assert concatenated["train_padded_tokens"] == concatenated["train_tokens"]
    assert concatenated["train_loop_samples"] == padded["train_loop_samples"]
    assert concatenated["after"]["loss"] == pytest.approx(padded["after"]["loss"], rel=1e-4)
    assert concatenated["after"]["loss"] < concatenated["before"]["loss"]


@pytest.mark.parametrize("method", [{"name": "prefix"}, {"name": "prompt"}, {"name": "ia3"}, {"name": "dora"},
                                    {"name": "freeze", "train_top_layers": 1}])
def test_every_method_trains_a_decoder_on_sft(tiny_llama, qa_data, tmp_path, method):
    recipe = generative_recipe(tiny_llama, qa_data, method=method,
                               train={"epochs": 8, "batch_size": 8, "learning_rate": 1e-2, "precision": "fp32"},
                               eval={"generate": {"max_new_tokens": 1, "num_samples": 4}})
    _, metrics = api.train(validate_recipe(recipe), str(tmp_path / method["name"]))
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert metrics["padding_free"] is (method["name"] not in ("prefix", "prompt"))  # peft drops their position ids


def test_shots_take_k_rows_per_answer_for_classification_as_generation(qa_data):
    from tunelab.data.generative import load_generative_data

    recipe = validate_recipe(generative_recipe("unused", qa_data))
    data = load_generative_data(recipe.data.model_copy(update={"shots": 4}))
    assert sorted(data.train["response"]) == sorted([" bad"] * 4 + [" good"] * 4 + [" table"] * 4)
    other = load_generative_data(recipe.data.model_copy(update={"shots": 4, "seed": 5}))
    assert data.train["prompt"] != other.train["prompt"]  # the seed draws other examples


def test_drop_long_leaves_out_rows_whose_prompt_fills_max_length(tiny_llama):
    import datasets

    from tunelab.data.sft_encoding import fit_prompts, prompt_format
    from tunelab.errors import TunelabError
    from tunelab.models.loading import load_tokenizer

    split = datasets.Dataset.from_list([
        {"messages": [], "prompt": "good is", "response": " good"},
        {"messages": [], "prompt": " ".join(["very"] * 12) + " is", "response": " table"}])
    fmt = prompt_format(load_tokenizer(str(tiny_llama)), "none", "template", str(tiny_llama))
    with pytest.raises(TunelabError, match=r"1 of 2 train rows have a prompt of 10\+ tokens.*data.drop_long: true"):
        fit_prompts(fmt, split, 10, "train")
    assert fit_prompts(fmt, split, 10, "train", drop=True)["response"] == [" good"]
    assert fit_prompts(fmt, split, 32, "train") is split


@pytest.mark.skipif(not bf16_supported(), reason="this machine has no native bf16")
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix", "prompt"])
def test_adapters_train_in_fp32_over_a_bf16_base(tiny_llama, qa_data, tmp_path, monkeypatch, method):
    """Under bf16 the frozen base is loaded in bf16 (half the memory, no per-step casts); the adapters that the
    optimizer updates stay fp32, and are saved so."""
    loaded = []

    def spy(*args):
        loaded.append(load_trainable_decoder(*args))
        return loaded[-1]

    monkeypatch.setattr("tunelab.stages.sft.load_trainable_decoder", spy)
    recipe = generative_recipe(tiny_llama, qa_data, method={"name": method},
                               train={"epochs": 4, "batch_size": 8, "learning_rate": 1e-2, "precision": "bf16"},
                               eval={"generate": {"max_new_tokens": 1, "num_samples": 4}})
    run_dir, metrics = api.train(validate_recipe(recipe), str(tmp_path / method))
    trainable = {param.dtype for param in loaded[0].parameters() if param.requires_grad}
    frozen = {param.dtype for param in loaded[0].parameters() if not param.requires_grad}
    assert (trainable, frozen) == ({torch.float32}, {torch.bfloat16})
    assert metrics["precision"] == "bf16" and metrics["after"]["loss"] < metrics["before"]["loss"]
    saved = load_file(run_dir / "model" / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}


def test_loss_only_evaluation_step_gives_the_trainers_own_loss(tiny_llama, tmp_path):
    """tunelab's SFT evaluation skips TRL's second forward pass for full logits; the loss must not change."""
    tokenizer = load_tokenizer(str(tiny_llama))
    rows = datasets.Dataset.from_list([{"input_ids": [4, 5, 6, 7, 8, 9][:length], "completion_mask": [0, 0] +
                                        [1] * (length - 2)} for length in (4, 6, 5)])
    trainer = TunelabSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), train_dataset=rows,
                                eval_dataset=rows, processing_class=tokenizer,
                                args=SFTConfig(output_dir=str(tmp_path), per_device_eval_batch_size=3,
                                               prediction_loss_only=True, report_to="none", use_cpu=True,
                                               padding_free=True, max_length=None))
    batch = next(iter(trainer.get_eval_dataloader()))
    passes = []
    trainer.model.register_forward_hook(lambda *args: passes.append(1))
    ours, logits, labels = trainer.prediction_step(trainer.model, dict(batch), prediction_loss_only=True)
    ours_passes = len(passes)
    theirs = Trainer.prediction_step(trainer, trainer.model, dict(batch), prediction_loss_only=True)[0]
    assert (ours_passes, len(passes) - ours_passes) == (1, 2)
    assert logits is None and labels is None
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6) and ours.item() > 0
