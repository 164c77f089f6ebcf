"""Completion-only loss on the real SmolLM2 tokenizer and chat template: prompt tokens carry -100, response not."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tunelab.data.generative import normalise_split
from tunelab.data.sft_encoding import IGNORE_INDEX, encode_example, prompt_format
from tunelab.models.aliases import OFFLINE_MODELS
from tunelab.recipe import DataConfig


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    gguf = OFFLINE_MODELS["smollm2-135m"].locate()
    if gguf is None:
        pytest.skip("smollm2-135m is not installed (scripts/setup.sh installs it)")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


ROWS = {
    "instruction": ({"instruction": "Name a colour.", "input": "Pick a warm one.", "output": "Deep red"}, {}),
    "prompt_completion": ({"prompt": "The capital of France is", "completion": "Paris, of course"}, {}),
    "messages": ({"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi!"},
                               {"role": "assistant", "content": "Hello."},
                               {"role": "user", "content": "Two plus two?"},
                               {"role": "assistant", "content": "Four"}]}, {}),
    "template": ({"text": "I sneeze a lot", "label": "allergy"},
                 {"prompt_template": "Symptoms: {text}", "response_template": "Diagnosis: {label}"}),
}


def normalised(fmt: str) -> dict:
    import datasets

    row, options = ROWS[fmt]
    cfg = DataConfig(source="x", format=fmt, **options)
    split, _ = normalise_split(datasets.Dataset.from_list([row]), cfg, fmt, "train")
    return split[0]


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("chat", ["auto", "none"])
def test_only_response_tokens_carry_labels(smollm2_tokenizer, fmt, chat):
    if fmt == "messages" and chat == "none":
        pytest.skip("chat data needs a template (refusal tested in test_sft_errors)")
    row = normalised(fmt)
    prompt = prompt_format(smollm2_tokenizer, chat, fmt, "smollm2-135m")
    encoded = encode_example(prompt, row, completion_only=True, max_length=512)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels)
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    first = trained[0]
    # Every token before the response is masked, every token from it on is trained, with its own id.
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert trained == list(range(first, len(ids)))
    assert [labels[i] for i in trained] == ids[first:]
    prompt_text = smollm2_tokenizer.decode(ids[:first])
    response_text = smollm2_tokenizer.decode(ids[first:])
    assert row["response"] not in prompt_text
    end = "<|im_end|>\n" if chat == "auto" else "<|im_end|>"  # SmolLM2's EOS closes the turn
    assert response_text == row["response"] + end
    if chat == "auto":
        assert prompt_text.endswith("<|im_start|>assistant\n")
        assert smollm2_tokenizer.chat_template is not None


def test_earlier_assistant_turns_are_context_not_targets(smollm2_tokenizer):
    row = normalised("messages")
    prompt = prompt_format(smollm2_tokenizer, "auto", "messages", "smollm2-135m")
    encoded = encode_example(prompt, row, completion_only=True, max_length=512)
    trained = smollm2_tokenizer.decode([t for t in encoded["labels"] if t != IGNORE_INDEX])
    assert "Hello." not in trained and trained.startswith("Four")


def test_full_sequence_loss_when_switched_off(smollm2_tokenizer):
    row = normalised("instruction")
    prompt = prompt_format(smollm2_tokenizer, "auto", "instruction", "smollm2-135m")
    encoded = encode_example(prompt, row, completion_only=False, max_length=512)
    assert encoded["labels"] == encoded["input_ids"]
