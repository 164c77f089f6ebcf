"""`tunelab export` on tiny runs: each exported file is loaded back in the runtime it is for and must give the
numbers tunelab gives (hf in a process without tunelab or peft, gguf through transformers' GGUF loader, onnx
through ONNX Runtime and `tunelab predict`), and every refusal is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    make_tokenizer,
    seeded_random_weights,
    toy_recipe,
    toy_rows,
    write_jsonl,
    write_qa_data,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tunelab import api
from tunelab.cli import main
from tunelab.models.precision import bf16_supported
from tunelab.recipe import validate_recipe

# Rendered with the word-level toy tokenizer, so every token is in its vocabulary.
WORD_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% else %} "
                      "{{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %} it{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["the day was sad", "a very lovely day", "this table is it", "it was awful", "the door is fine"]

FRESH_PROCESS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
classifier_dir, sft_dir, texts, prompts, bf16 = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:5]), sys.argv[5]
tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
with torch.no_grad():
    probabilities = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1).tolist()
labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
tokenizer = AutoTokenizer.from_pretrained(sft_dir)
model = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
tokenizer.padding_side = "left"
rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]
batch = tokenizer(rendered, padding=True, return_tensors="pt", add_special_tokens=False)
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 == "1"):
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
answers = [a.strip() for a in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
modules = [m for m in ("peft", "tunelab") if m in sys.modules]
print(json.dumps({"probabilities": probabilities, "labels": labels, "answers": answers,
                  "template": tokenizer.chat_template, "modules": modules}))
"""


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    return write_qa_data(tmp_path_factory.mktemp("qa-data"), train=60, test=12)


def sft_recipe(model, source, method="lora", **extra) -> dict:
    return {"name": "toy-sft", "task": "sft", "model": {"name": str(model), "max_length": 48},
            "data": {"source": str(source), "prompt_template": "{sentence} is", "response_template": "{answer}",
                     **extra.pop("data", {})},
            "method": {"name": method, "r": 4} if method == "lora" else method,
            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "precision": "fp32", "seed": 1,
                      **extra.pop("train", {})},
            "eval": {"generate": {"num_samples": 0}}}


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_llama, toy_data, qa_data, tmp_path_factory):
    """A tiny LoRA classifier run, a tiny LoRA SFT run with its own chat template, a full classifier run."""
    root = tmp_path_factory.mktemp("export-runs")
    lora = toy_recipe(tiny_bert, toy_data, method={"name": "lora", "r": 4},
                      train={"epochs": 3, "batch_size": 16, "learning_rate": 1e-2, "precision": "fp32"})
    full = toy_recipe(tiny_bert, toy_data, train={"epochs": 2, "batch_size": 16, "precision": "fp32"})
    sft = sft_recipe(tiny_llama, qa_data, data={"chat_template": WORD_CHAT_TEMPLATE})
    return {name: api.train(validate_recipe(recipe), str(root / name))[0]
            for name, recipe in [("lora-classifier", lora), ("full-classifier", full), ("lora-sft", sft)]}


def test_hf_export_loads_in_plain_transformers_with_tunelabs_numbers(runs, tmp_path):
    classifier = api.export(str(runs["lora-classifier"]), str(tmp_path / "classifier"))
    sft = api.export(str(runs["lora-sft"]), str(tmp_path / "sft"))
    for folder in (classifier, sft):
        names = {path.name for path in folder.iterdir()}
        assert "model.safetensors" in names and "README.md" in names and "adapter_config.json" not in names
        assert not [name for name in names if name.endswith((".bin", ".pkl", ".pt"))]
    prompts = [f"{text} is" for text in TEXTS]
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(classifier), str(sft), json.dumps(TEXTS),
                           json.dumps(prompts), "1" if bf16_supported() else "0"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    assert plain["modules"] == []  # neither peft nor tunelab was needed
    want = [{row["label"]: row["probability"] for row in [top for top in api.predict(
        str(runs["lora-classifier"]), [text], top_k=3)[0]["top"]]} for text in TEXTS]
    for row, probabilities in zip(want, plain["probabilities"], strict=True):
        for label, probability in row.items():
            assert probabilities[plain["labels"].index(label)] == pytest.approx(probability, abs=1e-4)
    assert plain["answers"] == api.generate(str(runs["lora-sft"]), TEXTS, max_new_tokens=3)
    assert plain["template"] == WORD_CHAT_TEMPLATE
    card = (sft / "README.md").read_text()
    assert "base_model:" in card and "lora" in card and "{sentence} is" in card and "## Recipe" in card


def test_run_folder_model_holds_no_pickle(runs):
    assert not list(runs["lora-classifier"].glob("model/*.bin"))
    assert not list(runs["lora-sft"].glob("model/*.bin"))


def byte_level_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A tiny GPT-2-style byte-level BPE tokenizer (merges learned from `texts`) with ChatML special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def bpe_decoder_run(request, qa_data, tmp_path_factory):
    """A LoRA SFT run on a tiny decoder with a byte-level BPE tokenizer and ChatML: a Llama with grouped-query
    attention, or a Qwen2 (q/k/v biases) with its output head tied to the embeddings."""
    base = tmp_path_factory.mktemp(f"bpe-{request.param}")
    lines = [json.loads(line) for line in (qa_data / "train.jsonl").read_text().splitlines()]
    tokenizer = byte_level_tokenizer([f"{row['sentence']} is {row['answer']}" for row in lines] * 3)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[request.param]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                          tie_word_embeddings=request.param == "qwen2", eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = seeded_random_weights(model_class, config)
    with torch.no_grad():  # sharp attention, so that rotary positions (Llama's permuted q/k rows) show in logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(16)
            layer.self_attn.k_proj.weight.mul_(16)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    recipe = sft_recipe(base, qa_data, train={"max_steps": 3})
    return api.train(validate_recipe(recipe), str(tmp_path_factory.mktemp("runs") / "bpe-sft"))[0]


def gguf_logits(folder, gguf_file: str | None, prompts: list[str]) -> tuple[list[list[int]], np.ndarray]:
    """Token ids and logits of each chat-rendered prompt, from a hf folder or a .gguf file in it."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    ids, logits = [], []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        row = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits.append(model(row).logits[0].numpy())
        ids.append(row[0].tolist())
    return ids, np.concatenate(logits)


def test_gguf_export_reads_back_in_transformers_with_the_same_logits(bpe_decoder_run, tmp_path):
    hf = api.export(str(bpe_decoder_run), str(tmp_path / "hf"))
    f16 = api.export(str(bpe_decoder_run), str(tmp_path / "gguf"), "gguf", "f16")
    q8 = api.export(str(bpe_decoder_run), str(tmp_path / "gguf-q8"), "gguf", "q8_0")
    assert sorted(path.name for path in f16.iterdir()) == ["Modelfile", "README.md", "toy-sft-f16.gguf"]
    assert "FROM ./toy-sft-f16.gguf" in (f16 / "Modelfile").read_text()
    prompts = [f"{text} is" for text in TEXTS]
    want_ids, want = gguf_logits(hf, None, prompts)
    ids, got = gguf_logits(f16, "toy-sft-f16.gguf", prompts)
    assert ids == want_ids  # the tokenizer inside the file (vocabulary, merges, ChatML template) tokenizes the same
    assert AutoTokenizer.from_pretrained(f16, gguf_file="toy-sft-f16.gguf").chat_template == CHATML
    assert np.abs(got - want).max() < 1e-2  # f16 rounding only: permuted q/k and GQA heads come back right
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95
    _, quantized = gguf_logits(q8, "toy-sft-q8_0.gguf", prompts)
    assert np.abs(quantized - want).max() < 0.1 and (quantized.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_onnx_export_predicts_like_the_run_through_onnx_runtime_and_cli(runs, tmp_path, capsys):
    import onnxruntime

    run = runs["full-classifier"]
    folder = api.export(str(run), str(tmp_path / "onnx"), "onnx")
    labels = json.loads((folder / "labels.json").read_text())
    assert labels["labels"] == ["neg", "neu", "pos"] and (folder / "model.onnx").is_file()
    texts = [row["sentence"] for row in toy_rows(12, seed=5)] + ["good"]  # a one-word row: other sequence length
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="np")
    logits = session.run(["logits"], {name: batch[name] for name in labels["inputs"]})[0]
    want = api.predict(str(run), texts)
    assert [labels["labels"][i] for i in logits.argmax(-1)] == [row["label"] for row in want]
    assert main(["predict", str(folder), *texts]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["label"] for row in got] == [row["label"] for row in want]
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(got, want, strict=True)) < 1e-4


def refusal(args: list[str], capsys) -> str:
    """Run the CLI, expect exit code 2 and return the one error line."""
    capsys.readouterr()  # drop what came before (a training run's progress)
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: export: "), lines
    return lines[0]


def test_refusals_are_one_line_and_write_nothing(runs, tiny_bert, toy_data, qa_data, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["full-classifier"], unfinished)
    (unfinished / "metrics.json").unlink()
    assert "has not finished" in refusal(["export", str(unfinished), "--output", str(tmp_path / "a")], capsys)
    existing = tmp_path / "existing"
    existing.mkdir()
    assert "already exists" in refusal(["export", str(runs["full-classifier"]), "--output", str(existing)], capsys)
    (tmp_path / "file.gguf").write_text("mine")
    assert "already exists" in refusal(["export", str(runs["lora-sft"]), "--output", str(tmp_path / "file.gguf"),
                                        "--format", "gguf"], capsys)
    assert (tmp_path / "file.gguf").read_text() == "mine" and not list(existing.iterdir())
    assert "--format gguf takes runs of tasks sft, pretrain, dpo, kto, grpo; " in refusal(
        ["export", str(runs["full-classifier"]), "--output", str(tmp_path / "b"), "--format", "gguf"], capsys)
    assert "is a sft run — export it as hf or gguf" in refusal(
        ["export", str(runs["lora-sft"]), "--output", str(tmp_path / "c"), "--format", "onnx"], capsys)
    prompt = toy_recipe(tiny_bert, toy_data, method={"name": "prompt", "num_virtual_tokens": 2},
                        train={"max_steps": 1, "batch_size": 8, "precision": "fp32"})
    prompt_run = api.train(validate_recipe(prompt), str(tmp_path / "prompt-run"))[0]
    assert "cannot be merged" in refusal(["export", str(prompt_run), "--output", str(tmp_path / "d")], capsys)
    assert not [path.name for path in tmp_path.iterdir() if path.name in "abcd" or path.name.startswith(".")]


def test_gguf_refuses_other_architectures_naming_the_supported_ones(qa_data, tmp_path, capsys):
    tokenizer = make_tokenizer(decoder=True)
    base = tmp_path / "tiny-mistral"
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None)
    seeded_random_weights(MistralForCausalLM, config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = api.train(validate_recipe(sft_recipe(base, qa_data, method="full", train={"max_steps": 1})),
                    str(tmp_path / "mistral-run"))[0]
    line = refusal(["export", str(run), "--output", str(tmp_path / "out"), "--format", "gguf"], capsys)
    assert "LlamaForCausalLM" in line and "Qwen2ForCausalLM" in line and "MistralForCausalLM" in line
    assert "q4_0" in refusal(["export", str(run), "--output", str(tmp_path / "out"), "--format", "gguf",
                              "--quantize", "q4_k_m"], capsys)


def test_reward_run_exports_one_output_that_scores_like_tunelabs_judge(tiny_bert, tmp_path):
    import onnxruntime

    from tunelab.evaluation.judge import load_reward, reward_texts
    from tunelab.recipe import RewardSource

    rows = [{"prompt": " ".join(row["sentence"].split()[:3]), "chosen": " good", "rejected": " awful"}
            for row in toy_rows(40, seed=3)]
    write_jsonl(tmp_path / "train.jsonl", rows[:32])
    write_jsonl(tmp_path / "test.jsonl", rows[32:])
    recipe = {"name": "toy-reward", "task": "reward", "model": {"name": str(tiny_bert), "max_length": 8},
              "data": {"source": str(tmp_path)}, "method": {"name": "lora", "r": 4},
              "train": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-2, "precision": "fp32"}}
    run = api.train(validate_recipe(recipe), str(tmp_path / "reward-run"))[0]
    hf = api.export(str(run), str(tmp_path / "hf"))
    assert json.loads((hf / "config.json").read_text())["id2label"] == {"0": "reward"}
    folder = api.export(str(run), str(tmp_path / "onnx"), "onnx")
    prompts = ["the day was very very long and it was a day", "a door"]  # the first is cut to its last 8 tokens
    completions = [" good", " awful"]
    want = load_reward(RewardSource(model=str(run)), batch_size=8, bf16=False)(prompts=prompts,
                                                                                completions=completions)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.truncation_side == "left"  # a reward model is trained on the end of long transcripts
    batch = tokenizer(reward_texts(prompts, completions), padding=True, truncation=True, max_length=8,
                      return_tensors="np")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    inputs = json.loads((folder / "labels.json").read_text())["inputs"]
    got = session.run(["logits"], {name: batch[name] for name in inputs})
    assert got[0][:, 0] == pytest.approx(want, abs=1e-4)
