"""Few-shot: k shots per class, the SetFit-style fewshot task on a tiny encoder, and the in-context baseline."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from conftest import toy_recipe
from sentence_transformers import SentenceTransformer
from setfit import SetFitModel
from sklearn.linear_model import LogisticRegression
from transformers import AutoModelForCausalLM

from tunelab import api
from tunelab.cli import main
from tunelab.data.labelled import load_labelled_data
from tunelab.data.subsets import sample_shots
from tunelab.errors import TunelabError
from tunelab.evaluation.in_context import build_prompt, label_log_likelihoods, order_examples
from tunelab.models.loading import load_tokenizer
from tunelab.recipe import load_recipe, validate_recipe
from tunelab.stages.fewshot import pair_budget

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LABELS = ["neg", "neu", "pos"]


def fewshot_recipe(model, data, shots=4, **sections) -> dict:
    raw = toy_recipe(model, data, task="fewshot", fewshot={"pairs_per_example": 10, "epochs": 1,
                                                           "learning_rate": 2e-3}, **sections)
    raw["data"]["shots"] = shots
    return raw


# --- data.shots ---------------------------------------------------------------------------------------------

def labelled(labels: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(len(labels))], "label": labels})


def test_shots_takes_exactly_k_rows_of_every_class_seeded():
    rows = labelled([0] * 10 + [1] * 6 + [2] * 3)
    chosen = sample_shots(rows, 3, seed=7, labels=LABELS)
    assert Counter(chosen["label"]) == {0: 3, 1: 3, 2: 3}
    assert chosen["text"] == sample_shots(rows, 3, seed=7, labels=LABELS)["text"]
    assert chosen["text"] != sample_shots(rows, 3, seed=8, labels=LABELS)["text"]


def test_shots_refuses_a_class_with_too_few_rows_naming_it_and_its_count():
    rows = labelled([0] * 10 + [1] * 6 + [2] * 3)
    with pytest.raises(TunelabError) as caught:
        sample_shots(rows, 4, seed=0, labels=LABELS)
    assert "class 'pos' has only 3 training rows" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_shots_reach_the_training_split_and_the_resolved_recipe(tiny_bert, toy_data):
    raw = toy_recipe(tiny_bert, toy_data)
    raw["data"]["shots"] = 5
    recipe = validate_recipe(raw)
    data = load_labelled_data(recipe.data)
    assert Counter(data.train["label"]) == {0: 5, 1: 5, 2: 5}
    assert len(data.eval) == 45, "the eval split is never sampled by shots"
    assert yaml.safe_load(recipe.to_yaml())["data"]["shots"] == 5


def test_shots_and_train_size_together_are_refused(tiny_bert, toy_data):
    raw = toy_recipe(tiny_bert, toy_data)
    raw["data"].update(shots=5, train_size=20)
    with pytest.raises(TunelabError, match="set only one of them"):
        validate_recipe(raw)


# --- task: fewshot ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fewshot_run(tiny_bert, toy_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "fewshot"
    recipe = validate_recipe(fewshot_recipe(tiny_bert, toy_data, shots=20))
    return recipe, *api.train(recipe, str(run_dir))


def test_fewshot_run_folder_holds_every_artifact(fewshot_run):
    _, run_dir, metrics = fewshot_run
    for name in ["recipe.yaml", "metrics.json", "log.jsonl", "predictions.jsonl", "report.html",
                 "model/model_head.pkl", "model/modules.json", "model/model.safetensors", "model/tokenizer.json"]:
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["shots"] == 20 and saved["train_rows"] == 60 and saved["eval_rows"] == 45
    assert saved["pairs"] == 2 * 10 * 60  # a positive and a negative pair per row and iteration, one epoch
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(saved["after"])
    assert any("loss" in entry for entry in saved["history"])
    page = (run_dir / "report.html").read_text()
    assert "Before and after training" in page and "20 examples per class" in page


def test_fewshot_contrastive_tuning_learns_the_task(fewshot_run):
    _, _, metrics = fewshot_run
    # on the random tiny encoder "before" varied between 0.6 and 0.93 across thread counts: compare loosely
    assert metrics["after"]["accuracy"] >= max(0.8, metrics["before"]["accuracy"] - 0.05)
    losses = [entry["loss"] for entry in metrics["history"] if "loss" in entry]
    assert losses[-1] < losses[0] / 2, "the contrastive loss falls"


def test_fewshot_before_is_a_head_fit_on_the_untrained_encoder_with_the_same_shots(fewshot_run, tiny_bert):
    recipe, _, metrics = fewshot_run
    data = load_labelled_data(recipe.data)
    encoder = SentenceTransformer(str(tiny_bert))
    head = LogisticRegression(C=recipe.fewshot.head_c, max_iter=1000, random_state=recipe.train.seed)
    head.fit(encoder.encode(data.train["text"]), data.train["label"])
    accuracy = float(np.mean(head.predict(encoder.encode(data.eval["text"])) == np.asarray(data.eval["label"])))
    assert metrics["before"]["accuracy"] == pytest.approx(accuracy)


def test_fewshot_predict_and_eval_route_by_the_run_task(fewshot_run, toy_data, capsys):
    _, run_dir, metrics = fewshot_run
    assert main(["predict", str(run_dir), "this day was awful", "--top-k", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    reloaded = SetFitModel.from_pretrained(str(run_dir / "model"))
    probabilities = reloaded.predict_proba(["this day was awful"], as_numpy=True)[0]
    assert printed["label"] == LABELS[int(probabilities.argmax())]
    assert printed["probability"] == pytest.approx(float(probabilities.max()), abs=1e-5)
    assert main(["eval", str(run_dir), "--data", str(toy_data)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(metrics["after"]["accuracy"])


def test_fewshot_prints_plain_lines_and_the_gain_with_its_interval(tiny_bert, toy_data, tmp_path, capsys):
    recipe = tmp_path / "fewshot.yaml"
    recipe.write_text(yaml.safe_dump(fewshot_recipe(tiny_bert, toy_data, train={"logging_steps": 1})))
    capsys.readouterr()
    assert main(["train", str(recipe), "--output", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.lstrip().startswith("{") for line in lines), lines  # SetFit's trainer printed one per step
    assert any("step" in line and "loss" in line and "epoch" in line for line in lines), lines
    assert any(line.startswith("tunelab: after training: accuracy") and "[" in line for line in lines), lines
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["gain"]) == {"accuracy", "macro_f1"} and "accuracy" in metrics["intervals"]


def test_max_pairs_caps_the_contrastive_pairs_in_whole_batches(tiny_bert, toy_data):
    raw = fewshot_recipe(tiny_bert, toy_data)  # 10 pairs per row and kind, batch 8
    raw["fewshot"]["epochs"] = 2
    assert pair_budget(validate_recipe(raw), rows=30) == (1200, -1)
    raw["fewshot"]["max_pairs"] = 100
    assert pair_budget(validate_recipe(raw), rows=30) == (104, 13)  # 13 steps of 8 pairs
    raw["fewshot"]["max_pairs"] = 5000
    assert pair_budget(validate_recipe(raw), rows=30) == (1200, -1)


def test_fewshot_refuses_a_decoder_before_creating_the_run_folder(tiny_llama, toy_data, tmp_path):
    recipe = validate_recipe(fewshot_recipe(tiny_llama, toy_data))
    with pytest.raises(TunelabError, match="is a decoder"):
        api.train(recipe, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"method": "lora"}, "use method: full"),
    ({"method": {"name": "full", "freeze_embeddings": True}}, "use method: full"),
    ({"train": {"precision": "bf16"}}, "trains in fp32"),
])
def test_fewshot_refuses_what_it_cannot_honour(change, message, tiny_bert, toy_data):
    with pytest.raises(TunelabError, match=message):
        validate_recipe({**fewshot_recipe(tiny_bert, toy_data), **change})


# --- in-context baseline ------------------------------------------------------------------------------------

def test_in_context_examples_interleave_the_classes():
    shots = labelled([0, 0, 1, 1, 2, 2])
    examples = order_examples(shots, LABELS, seed=3)
    assert len(examples) == 6
    assert {label for _, label in examples[:3]} == set(LABELS) == {label for _, label in examples[3:]}


def test_in_context_scores_equal_a_plain_forward_pass_per_label(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    labels = ["good day", "bad", "the chair"]  # one label of two tokens: scored token by token
    prompt = build_prompt([("a good day", "good day"), ("it was bad", "bad")], labels)
    texts = ["this is lovely", "the door is ugly very"]
    scores = label_log_likelihoods(model, tokenizer, prompt, texts, labels)
    for row, text in enumerate(texts):
        context = tokenizer(prompt).input_ids + tokenizer(f"Text: {text}\nLabel:", add_special_tokens=False).input_ids
        for column, label in enumerate(labels):
            label_ids = tokenizer(" " + label, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(torch.tensor([context + label_ids])).logits[0]
            log_probs = torch.log_softmax(logits, dim=-1)
            expected = sum(float(log_probs[len(context) - 1 + i, token]) for i, token in enumerate(label_ids))
            assert scores[row, column] == pytest.approx(expected, abs=1e-4)


def test_in_context_baseline_is_reported_beside_fine_tuning(tiny_llama, toy_data, tmp_path):
    raw = toy_recipe(tiny_llama, toy_data, eval={"in_context_shots": 1},
                     train={"epochs": 1, "batch_size": 16, "precision": "fp32"})
    run_dir, metrics = api.train(validate_recipe(raw), str(tmp_path / "llama"))
    in_context = metrics["in_context"]
    assert in_context["shots"] == 1 and in_context["prompt_tokens"] > 0
    assert sum(map(sum, in_context["confusion_matrix"])) == 45
    assert json.loads((run_dir / "in_context.json").read_text())["accuracy"] == in_context["accuracy"]
    assert "In-context baseline" in (run_dir / "report.html").read_text()


def test_in_context_from_the_command_line_needs_no_training(tiny_llama, toy_data, capsys):
    command = ["eval", str(tiny_llama), "--data", str(toy_data), "--text", "sentence", "--label", "sentiment"]
    assert main([*command, "--in-context", "1"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["shots"] == 1 and 0 <= scores["accuracy"] <= 1
    assert main([*command, "--in-context", "4"]) == 2  # the tiny model reads 64 positions
    assert "give fewer examples" in capsys.readouterr().err


def test_in_context_refuses_an_encoder(tiny_bert, toy_data, tmp_path):
    raw = toy_recipe(tiny_bert, toy_data, eval={"in_context_shots": 1})
    with pytest.raises(TunelabError, match="prompts a decoder"):
        api.train(validate_recipe(raw), str(tmp_path / "never"))


# --- end to end on the real encoder -------------------------------------------------------------------------

@pytest.mark.e2e
def test_symptom_fewshot_with_8_examples_per_class_reaches_075(tmp_path):
    run_dir, metrics = api.train(load_recipe(EXAMPLES / "symptom_fewshot.yaml"), str(tmp_path / "symptom-fewshot"))
    assert (metrics["shots"], metrics["train_rows"], metrics["eval_rows"]) == (8, 176, 212)
    assert metrics["after"]["accuracy"] >= 0.75
    assert metrics["after"]["accuracy"] > metrics["before"]["accuracy"]
    assert (run_dir / "model" / "model_head.pkl").is_file()
