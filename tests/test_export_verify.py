"""`tunelab export --verify` on tiny runs: the exported file is scored on the run's eval rows in its own runtime and
compared with the run's model; an export that matches shows no difference, and a gguf whose EOS or chat template
is wrong shows a significant drop with a warning naming the cause."""

from __future__ import annotations

import json
import sys
import types

import pytest
from conftest import seeded_random_weights, toy_recipe, write_jsonl, write_qa_data
from test_export import CHATML, byte_level_tokenizer, refusal, sft_recipe
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab import api
from tunelab.cli import main
from tunelab.export import run as export_run_module
from tunelab.recipe import validate_recipe


@pytest.fixture(scope="module")
def classifier_run(tiny_bert, toy_data, tmp_path_factory):
    """A LoRA classifier trained for two steps: its new head gives each eval row its own mix of labels."""
    recipe = toy_recipe(tiny_bert, toy_data, method={"name": "lora", "r": 4},
                        train={"max_steps": 2, "batch_size": 16, "learning_rate": 1e-2, "precision": "fp32"})
    return api.train(validate_recipe(recipe), str(tmp_path_factory.mktemp("verify") / "classifier"))[0]


@pytest.fixture(scope="module")
def chatml_sft_run(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer and ChatML, fully fine-tuned until it answers every eval row
    right: each answer is 'good' and then <|im_end|>, so whether generation stops there decides exact match. The
    loss covers the whole conversation, so the model also learned that the assistant's header follows the user's
    turn: a prompt rendered without it gets the header back as (wrong) answer text."""
    root = tmp_path_factory.mktemp("verify-sft")
    data = write_qa_data(tmp_path_factory.mktemp("verify-qa"), train=48, test=16)
    for split in ("test", "train"):
        rows = [{**json.loads(line), "answer": "good"} for line in (data / f"{split}.jsonl").read_text().splitlines()]
        write_jsonl(data / f"{split}.jsonl", rows)
    tokenizer = byte_level_tokenizer([f"{row['sentence']} is good" for row in rows] * 3)  # the train rows
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    seeded_random_weights(LlamaForCausalLM, config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    recipe = sft_recipe(root / "base", data, method="full", train={"epochs": 2, "batch_size": 8,
                                                                   "learning_rate": 1e-2,
                                                                   "completion_only_loss": False})
    recipe["eval"] = {"generate": {"num_samples": 0, "max_new_tokens": 6}}
    return api.train(validate_recipe(recipe), str(root / "run"))[0]


def verified(folder) -> dict:
    return json.loads((folder / "verify.json").read_text())


def test_classifier_exports_score_exactly_like_the_run(classifier_run, toy_data, tmp_path, capsys):
    texts = [json.loads(line)["sentence"] for line in (toy_data / "test.jsonl").read_text().splitlines()]
    assert len({row["label"] for row in api.predict(str(classifier_run), texts)}) > 1  # not one label for all
    for fmt in ("hf", "onnx"):
        out = tmp_path / fmt
        assert main(["export", str(classifier_run), "--output", str(out), "--format", fmt, "--verify"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        result = verified(out)
        assert result["metric"] == "accuracy" and result["rows"] == 45
        assert result["file"]["value"] == result["run"]["value"]
        assert result["difference"]["value"] == 0 and not result["difference"]["significant"]
        assert result["same_outputs"] == 1.0 and result["warnings"] == []
        runtime = "transformers in a fresh process" if fmt == "hf" else "ONNX Runtime"
        assert result["fresh_process_imported"] == ([] if fmt == "hf" else None)  # neither tunelab nor peft
        assert lines[-1] == result["summary"] and f"verify ({fmt} via {runtime}, 45 rows): accuracy run" in lines[-1]
        assert "no significant change" in lines[-1] and not any(line.startswith("warning") for line in lines)
        card = (out / "README.md").read_text()
        assert "## Verified" in card and card.index("## Verified") < card.index("## Recipe") and runtime in card


def test_gguf_f16_through_transformers_matches_the_run(chatml_sft_run, tmp_path, capsys):
    out = tmp_path / "gguf"
    assert main(["export", str(chatml_sft_run), "--output", str(out), "--format", "gguf", "--verify",
                 "--verify-size", "12"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = verified(out)
    assert line.startswith("verify (gguf f16 via transformers' GGUF loader, 12 rows): exact_match run 1.000 → file")
    assert result["run"]["value"] == 1.0  # the run learned the answer and to stop after it
    assert result["file"]["value"] >= 0.9 and not result["difference"]["significant"] and result["warnings"] == []
    assert result["template_and_eos"] == {"checked": True, "differ": []}
    assert "transformers' GGUF loader" in (out / "README.md").read_text()


@pytest.mark.parametrize("broken", ["eos", "template"])
def test_a_gguf_with_a_wrong_eos_or_template_scores_lower_and_says_why(chatml_sft_run, broken, tmp_path,
                                                                       monkeypatch, capsys):
    # The file is written from a tokenizer whose EOS is the pad token (generation then runs past <|im_end|>), or
    # whose chat template renders the prompt without the assistant header the run trained behind. Verify must
    # render and stop with what the file says, not with the run's tokenizer, to see the drop.
    load_merged = export_run_module.load_merged

    def with_broken_tokenizer(run):
        model, tokenizer = load_merged(run)
        if broken == "eos":
            tokenizer.eos_token = "<|endoftext|>"
        else:
            tokenizer.chat_template = CHATML.replace("<|im_start|>assistant\n", "")
        return model, tokenizer

    monkeypatch.setattr(export_run_module, "load_merged", with_broken_tokenizer)
    out = tmp_path / "broken"
    assert main(["export", str(chatml_sft_run), "--output", str(out), "--format", "gguf", "--verify-size", "12"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = verified(out)
    assert result["run"]["value"] == 1.0 and result["file"]["value"] <= 0.5
    assert result["difference"]["significant"] and result["difference"]["high"] < 0
    assert "significant drop" in lines[-2] and lines[-1].startswith("warning: the gguf f16 file scores exact_match −")
    assert ("EOS token ('<|endoftext|>' in the file, '<|im_end|>' in the run)" if broken == "eos"
            else "chat template") in lines[-1]
    assert "**warning:" in (out / "README.md").read_text()


class FakeLlama:
    """Stands in for llama_cpp.Llama (not installed in CI): answers every chat with 'good', as the run does."""

    calls: list = []

    def __init__(self, model_path: str, **options) -> None:
        self.calls.append(("load", model_path, options))

    def create_chat_completion(self, messages: list[dict], **options) -> dict:
        self.calls.append(("chat", messages, options))
        return {"choices": [{"message": {"role": "assistant", "content": " good"}}]}


def test_gguf_runs_in_llama_cpp_when_it_is_installed(chatml_sft_run, tmp_path, monkeypatch):
    # The wiring only: which runtime is named, what it is asked, and that the template / EOS compared with the
    # run's come from the file's own metadata when llama.cpp (not a transformers tokenizer) renders the turns.
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    monkeypatch.setattr("tunelab.export.verify.llama_cpp_available", lambda: True)
    folder = api.export(str(chatml_sft_run), str(tmp_path / "gguf"), "gguf", "q8_0")
    result = api.verify_export(str(chatml_sft_run), str(folder), size=3)
    assert result["summary"].startswith("verify (gguf q8_0 via llama.cpp (llama-cpp-python), 3 rows): exact_match "
                                        "run 1.000 → file 1.000")
    assert result["template_and_eos"] == {"checked": True, "differ": []}
    load, *chats = FakeLlama.calls
    assert load[1] == str(folder / "toy-sft-q8_0.gguf") and len(chats) == 3
    assert chats[0][1][-1]["role"] == "user" and chats[0][2]["temperature"] == 0.0
    assert chats[0][2]["repeat_penalty"] == 1.0  # greedy means no repetition penalty either


def test_verify_refuses_other_tasks_in_one_line_before_exporting(tiny_llama, toy_data, tmp_path, capsys):
    recipe = {"name": "toy-pretrain", "task": "pretrain", "model": {"name": str(tiny_llama), "max_length": 16},
              "data": {"source": str(toy_data), "text": "sentence"}, "method": "full",
              "train": {"max_steps": 1, "batch_size": 8, "precision": "fp32"}}
    run = api.train(validate_recipe(recipe), str(tmp_path / "pretrain"))[0]
    line = refusal(["export", str(run), "--output", str(tmp_path / "out"), "--verify"], capsys)
    assert "--verify scores tasks classify and sft" in line and "pretrain run" in line
    assert not (tmp_path / "out").exists()
