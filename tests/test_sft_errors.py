"""Bad generative and preference recipes and data are refused before training: exit 2, one `error:` line, no run."""

from __future__ import annotations

import json

import pytest
from conftest import assert_train_refused

QA = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Say bye", "input": "", "output": "bye"}]
PAIRS = [{"prompt": "Say hi", "chosen": " hi", "rejected": " go away"}] * 2
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2


def write(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


CASES = [
    pytest.param({"data": {"prompt_template": "Q: {question}", "response_template": "{output}"}}, QA,
                 ["column 'question'", "data.prompt_template", "columns: instruction, input, output"],
                 id="template-names-a-missing-column"),
    pytest.param({"data": {"format": "prompt_completion"}}, QA,
                 ["column 'prompt'", "prompt_completion format", "columns: instruction, input, output"],
                 id="format-columns-missing"),
    pytest.param({}, [{"question": "a", "answer": "b"}] * 2,
                 ["cannot tell how to build prompts from the columns question, answer", "data.format"],
                 id="unknown-columns-ask-for-a-format"),
    pytest.param({}, [*QA, {"instruction": "Say what?", "input": "", "output": "  "}],
                 ["1 of 3 rows in split 'train' have an empty response", "data.drop_empty"], id="empty-response"),
    pytest.param({"data": {"chat_template": "{{ messages[0]['content'] }}{% generation %}"}}, CHAT,
                 ["data.chat_template cannot render a conversation"], id="broken-chat-template"),
    pytest.param({}, [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}],
                 ["row 1 of split 'train' has a message with role 'bot'", "system, user, assistant"],
                 id="unknown-role"),
    pytest.param({}, [{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}],
                 ["row 1 of split 'train' ends with a 'user' turn", "assistant's response"],
                 id="chat-not-ending-with-the-assistant"),
    pytest.param({}, CHAT, ["the data is chat messages but model", "has no chat template", "data.chat_template"],
                 id="chat-data-on-a-model-without-template"),
    pytest.param({"data": {"chat_template": "none"}}, CHAT, ["data.chat_template is none"],
                 id="chat-data-with-templates-switched-off"),
    pytest.param({"task": "pretrain", "data": {"text": "output"}, "model": {"max_length": 128}}, QA,
                 ["model.max_length 128 is longer than the model's context of 64 tokens"],
                 id="block-size-beyond-context"),
    pytest.param({"task": "pretrain", "data": {"text": "body"}}, QA,
                 ["column 'body' (data.text)", "columns: instruction, input, output"], id="pretrain-text-missing"),
    pytest.param({"model": {"max_length": 8}, "data": {"chat_template": "none"}},
                 [{"instruction": "one two three four five six seven eight nine ten", "input": "", "output": "x"}] * 2,
                 ["2 of 2 train rows have a prompt of 8+ tokens", "raise model.max_length"],
                 id="prompt-fills-max-length"),
    pytest.param({"data": {"shots": 4}, "task": "pretrain"}, QA, ["data.shots", "has no labels"],
                 id="shots-need-labels"),
    pytest.param({"data": {"shots": 1}}, QA, ["data.shots takes k rows per distinct response", "not labels"],
                 id="shots-on-free-text-responses"),
    pytest.param({"eval": {"best_metric": "accuracy"}}, QA, ["eval.best_metric: loss"], id="best-metric-accuracy"),
    pytest.param({"train": {"packing": True}, "task": "seq2seq"}, QA, ["train.packing is for decoders"],
                 id="packing-for-seq2seq"),
    pytest.param({"train": {"packing": True}, "method": {"name": "prompt"}}, QA,
                 ["train.packing needs position ids", "method prompt"], id="packing-with-virtual-tokens"),
    pytest.param({"model": {"name": "ENCODER"}}, QA, ["task sft trains a decoder", "task seq2seq"],
                 id="sft-on-an-encoder"),
    pytest.param({"task": "seq2seq"}, QA, ["task seq2seq needs an encoder-decoder", "is a decoder"],
                 id="seq2seq-on-a-decoder"),
    pytest.param({"method": "qlora"}, QA, ["method qlora needs a CUDA GPU", "Use method lora"],
                 id="qlora-on-cpu", marks=pytest.mark.skipif(__import__("torch").cuda.is_available(),
                                                             reason="a CUDA machine can run QLoRA")),
    pytest.param({"method": "qlora", "task": "seq2seq"}, QA, ["use lora for task seq2seq"], id="qlora-seq2seq"),
    pytest.param({"task": "reward"}, QA, ["column 'chosen' (data.chosen) and 'rejected' (data.rejected) not in split",
                                          "set data.chosen / data.rejected"], id="pairs-missing"),
    pytest.param({"task": "dpo"}, [*PAIRS, {"prompt": "p", "chosen": " same", "rejected": " same"}],
                 ["1 of 3 rows in split 'train' have an empty or identical chosen/rejected", "row 3",
                  "data.drop_empty"], id="identical-pair"),
    pytest.param({"task": "dpo", "model": {"name": "ENCODER"}}, PAIRS, ["task dpo trains a decoder"],
                 id="dpo-on-an-encoder"),
    pytest.param({"task": "reward", "preference": {"beta": 0.2}}, PAIRS,
                 ["section 'preference' configures task dpo, kto, not reward"], id="dpo-options-on-a-reward-model"),
    pytest.param({"task": "kto", "preference": {"loss": "simpo"}}, PAIRS,
                 ["unknown key 'preference.loss'; valid keys here: beta, desirable_weight"], id="kto-loss"),
    pytest.param({"task": "kto", "train": {"batch_size": 1}}, PAIRS, ["set train.batch_size to 2 or more"],
                 id="kto-batch-of-one"),
    pytest.param({"task": "dpo", "preference": {"desirable_weight": 2.0}}, PAIRS,
                 ["unknown key 'preference.desirable_weight'; valid keys here: loss, beta"],
                 id="kto-weights-on-dpo"),
    pytest.param({"task": "kto", "model": {"name": "ENCODER"}}, PAIRS, ["task kto trains a decoder"],
                 id="kto-on-an-encoder"),
    pytest.param({"task": "kto"}, [{"prompt": "p", "completion": " a", "label": "maybe"}],
                 ["label = 'maybe'", "true/false, 1/0 or good/bad"], id="kto-unknown-label"),
    pytest.param({"task": "kto"}, [{"prompt": "p", "completion": " a", "label": True}] * 3,
                 ["has only good completions", "data.label"], id="kto-only-good"),
    pytest.param({"task": "dpo", "data": {"shots": 2}}, PAIRS, ["data.shots", "pairs, not labels"],
                 id="shots-on-pairs"),
    pytest.param({"task": "dpo", "preference": {"loss": "kto"}}, PAIRS, ["'preference.loss' = 'kto' is invalid"],
                 id="unknown-dpo-loss"),
]


@pytest.mark.parametrize(("patch", "rows", "expected"), CASES)
def test_bad_generative_input_is_refused_before_training(tmp_path, capsys, tiny_llama, tiny_bert, patch, rows,
                                                         expected):
    write(tmp_path / "data" / "train.jsonl", rows)
    write(tmp_path / "data" / "test.jsonl", rows)
    recipe = {"task": "sft", "model": {"name": str(tiny_llama), "max_length": 32},
              "data": {"source": str(tmp_path / "data")}}
    for section, value in patch.items():
        recipe[section] = {**recipe.get(section, {}), **value} if isinstance(value, dict) else value
    if recipe["model"]["name"] == "ENCODER":
        recipe["model"]["name"] = str(tiny_bert)
    assert_train_refused(recipe, tmp_path, capsys, expected)
