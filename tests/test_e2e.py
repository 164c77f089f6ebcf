"""End to end on the real bundled models and shared data: the examples as a user runs them must really learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tunelab import api
from tunelab.cli import main
from tunelab.recipe import load_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def symptom_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "symptom"
    assert main(["train", str(EXAMPLES / "symptom_to_diagnosis.yaml"), "--output", str(run_dir)]) == 0
    return run_dir


def test_symptom_full_finetuning_learns_the_22_diagnoses(symptom_run):
    metrics = json.loads((symptom_run / "metrics.json").read_text())
    assert metrics["eval_rows"] == 212
    assert metrics["before"]["accuracy"] <= 0.15
    assert metrics["after"]["accuracy"] >= 0.85


def test_symptom_prediction_reproduces_with_plain_transformers(symptom_run, capsys):
    text = "I have a rash, itchy skin and my joints ache"
    assert main(["predict", str(symptom_run), text]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    model = AutoModelForSequenceClassification.from_pretrained(symptom_run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(symptom_run / "model")
    with torch.no_grad():
        probabilities = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
    assert printed["label"] == model.config.id2label[int(probabilities.argmax())]
    assert printed["probability"] == pytest.approx(float(probabilities.max()), abs=1e-4)
    assert printed["label"] in {"psoriasis", "fungal infection", "allergy", "arthritis", "drug reaction",
                                "chicken pox", "impetigo"}


def test_symptom_lora_learns_with_few_trainable_parameters(tmp_path):
    run_dir, metrics = api.train(load_recipe(EXAMPLES / "symptom_to_diagnosis_lora.yaml"), str(tmp_path / "lora"))
    assert metrics["trainable_percent"] < 10
    assert metrics["after"]["accuracy"] >= 0.80
    assert (run_dir / "model" / "adapter_config.json").is_file()


def test_tweet_sentiment_with_a_decoder_classifier_learns(tmp_path):
    # CI time: 1 of the 3 epochs (accuracy 0.315 → 0.670, gain +0.355 [+0.29, +0.42], when measured; 0.738 after 2,
    # 0.722 after the example's 3 on all 1000 eval tweets), 400 of the 1000 eval tweets, and no gradient
    # checkpointing (memory is not what this test checks)
    recipe = load_recipe(EXAMPLES / "tweet_sentiment.yaml",
                         ["train.epochs=1", "data.eval_size=400", "train.gradient_checkpointing=false"])
    _, metrics = api.train(recipe, str(tmp_path / "tweets"))
    assert (metrics["train_rows"], metrics["eval_rows"]) == (1000, 400)
    assert metrics["after"]["accuracy"] >= 0.60
    assert metrics["after"]["accuracy"] >= metrics["before"]["accuracy"] + 0.25
