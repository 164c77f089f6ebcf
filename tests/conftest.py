"""Shared fixtures: tiny random models built from a config (no network), a small learnable dataset, and a throwaway
PostgreSQL server (postgres_server.py)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml
from postgres_server import postgres_url  # noqa: F401  (a session fixture: imported here, every test can ask for it)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORDS = {"pos": ["good", "great", "lovely", "happy", "fine"], "neg": ["bad", "awful", "sad", "poor", "ugly"],
         "neu": ["table", "chair", "paper", "window", "door"]}
FILLER = ["the", "a", "is", "was", "this", "day", "it", "very"]


@pytest.fixture(autouse=True)
def _offline_and_isolated(tmp_path_factory, monkeypatch):
    """Every test runs offline, with the shared data on the search path and a private tunelab cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TUNELAB_DATA_PATH", os.environ.get("TUNELAB_DATA_PATH", str(SHARED_DATA)))
    monkeypatch.setenv("TUNELAB_CACHE", os.environ.get("TUNELAB_CACHE_FOR_TESTS",
                                                       str(tmp_path_factory.getbasetemp() / "cache")))


def seeded_random_weights(model_class: type, config: PretrainedConfig) -> torch.nn.Module:
    """`model_class(config)` with random weights drawn from a fixed seed, so the weights (and the learning
    thresholds tests assert on them) are the same whichever tests ran, and drew random numbers, before. Seeded here,
    not in a pytest_fixture_setup hook: pytest calls that hook of a session fixture on the session, which never sees
    hooks of tests/conftest.py, so the weights came out different in every pytest process."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        return model_class(config)


def make_tokenizer(decoder: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the toy vocabulary; the decoder one has no pad token, like many real ones."""
    specials = ["[UNK]", "</s>"] if decoder else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate(specials + FILLER + sorted(w for ws in WORDS.values() for w in ws))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if decoder:
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT encoder with random weights and no classification head, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = make_tokenizer(decoder=False)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    seeded_random_weights(BertModel, config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama decoder with random weights (causal-LM checkpoint, tokenizer without pad token)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_tokenizer(decoder=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None)
    seeded_random_weights(LlamaForCausalLM, config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def toy_rows(count: int, seed: int) -> list[dict]:
    """Sentences whose label is given away by one keyword: a tiny model can learn them in a few epochs."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = list(WORDS)[i % len(WORDS)]
        words = rng.sample(FILLER, 4) + [rng.choice(WORDS[label])]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "sentiment": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSONL and return the path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


ANSWERS = {label: words[0] for label, words in WORDS.items()}  # one in-vocabulary answer word per label


def write_qa_data(folder: Path, train: int = 90, test: int = 30) -> Path:
    """Toy sentences whose answer (good / bad / table) follows from one keyword: train.jsonl and test.jsonl."""
    for split, count, seed in [("train", train, 1), ("test", test, 2)]:
        write_jsonl(folder / f"{split}.jsonl", [{"sentence": row["sentence"], "answer": ANSWERS[row["sentiment"]]}
                                                for row in toy_rows(count, seed)])
    return folder


@pytest.fixture(scope="session")
def qa_data(tmp_path_factory) -> Path:
    """90 train and 30 test rows of toy questions and answers (write_qa_data)."""
    return write_qa_data(tmp_path_factory.mktemp("qa-data"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """A folder with train.jsonl (90 rows) and test.jsonl (45 rows), columns sentence/sentiment."""
    folder = tmp_path_factory.mktemp("toy-data")
    write_jsonl(folder / "train.jsonl", toy_rows(90, seed=1))
    write_jsonl(folder / "test.jsonl", toy_rows(45, seed=2))
    return folder


def toy_recipe(model: Path, data: Path, **sections) -> dict:
    """A raw recipe dict for the toy task; keyword arguments replace whole sections."""
    recipe = {"name": "toy", "task": "classify", "model": {"name": str(model), "max_length": 32},
              "data": {"source": str(data), "text": "sentence", "label": "sentiment"},
              "method": "full", "train": {"epochs": 20, "batch_size": 8, "learning_rate": 5e-3, "warmup_ratio": 0.0,
                                          "precision": "fp32", "logging_steps": 5}}
    recipe.update(sections)
    return recipe


def assert_train_refused(recipe: dict, tmp_path: Path, capsys, fragments, run_folder_possible: bool = False) -> None:
    """`tunelab train` on `recipe` ends with exit 2 and one `error:` line holding every one of `fragments`, before
    any run folder (unless `run_folder_possible`: a problem that only shows while the data is read)."""
    from tunelab.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    capsys.readouterr()
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0]
    assert run_folder_possible or not (tmp_path / "run").exists()
