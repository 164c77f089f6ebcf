"""End to end on SmolLM2 / MiniLM and the shared data: the generative examples as written must really learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab import api
from tunelab.cli import main
from tunelab.recipe import load_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DIAGNOSES = {json.loads(line)["output_text"] for line in
             (Path(__file__).resolve().parents[2] / "shared/data/symptom_to_diagnosis/train.jsonl").read_text()
             .splitlines()}
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def symptom_sft_run(tmp_path_factory):
    # CI time: 1 of the 3 epochs (exact match 0.51 [0.43, 0.60] after it on 106 eval rows when measured, 0.75 after
    # 2, 0.825 after the example's 3), scored on 64 random rows of the 212
    recipe = load_recipe(EXAMPLES / "symptom_sft.yaml", ["train.epochs=1", "data.eval_size=64",
                                                         "eval.generate.num_samples=64"])
    return api.train(recipe, str(tmp_path_factory.mktemp("e2e") / "sft"))


def test_symptom_sft_answers_with_the_right_diagnosis(symptom_sft_run):
    _, metrics = symptom_sft_run
    assert metrics["eval_rows"] == 64
    assert metrics["before"]["exact_match"] <= 0.10
    assert metrics["after"]["exact_match"] >= 0.35
    assert metrics["after"]["loss"] < metrics["before"]["loss"] / 4


def test_generate_answers_a_symptom_prompt_with_a_known_diagnosis(symptom_sft_run, capsys):
    run_dir, _ = symptom_sft_run
    capsys.readouterr()
    prompt = "I have a red, itchy rash with silvery scales on my elbows and my joints hurt."
    assert main(["generate", str(run_dir), prompt, "--max-new-tokens", "16"]) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    assert answer.startswith("Diagnosis: ") and answer.removeprefix("Diagnosis: ") in DIAGNOSES


def test_tweets_pretrain_lowers_held_out_perplexity(tmp_path):
    # CI time: 800 of the 3000 tweets (perplexity 247 → 118 when measured), 200 of the 500 eval tweets
    recipe = load_recipe(EXAMPLES / "tweets_pretrain.yaml", ["data.train_size=800", "data.eval_size=200"])
    _, metrics = api.train(recipe, str(tmp_path / "pretrain"))
    assert metrics["after"]["perplexity"] <= 0.85 * metrics["before"]["perplexity"]


def test_instruction_sft_lowers_response_loss(tmp_path):
    # CI time: 1 of the 2 epochs over 60 of the 175 seed tasks (all 175: response loss 2.32 → 2.16 when
    # measured), the loss on 30 of the 252 eval instructions, answers generated for 8 of them (the report's
    # samples), and no gradient checkpointing (same model, tested in test_generative_tiny; 4 GiB instead of 2,
    # about 40% faster). ROUGE-L is not asserted: on the full example (40 answers) its gain was not significant
    # (+0.027 [-0.020, +0.085]), so on 8 it could go either way.
    recipe = load_recipe(EXAMPLES / "instructions_sft.yaml",
                         ["train.epochs=1", "data.train_size=60", "data.eval_size=30",
                          "train.gradient_checkpointing=false", "eval.generate.num_samples=8"])
    run_dir, metrics = api.train(recipe, str(tmp_path / "instructions"))
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert "Sample generations" in (run_dir / "report.html").read_text()


def test_seq2seq_from_minilm_learns_the_diagnoses(tmp_path):
    # CI time: 8 of the 15 epochs (exact match 0.83 [0.78, 0.88] after 10 when measured; training loss 0.02 by 7.5)
    _, metrics = api.train(load_recipe(EXAMPLES / "seq2seq.yaml", ["train.epochs=8"]), str(tmp_path / "seq2seq"))
    assert metrics["after"]["loss"] < metrics["before"]["loss"] / 2
    assert metrics["after"]["exact_match"] >= metrics["before"]["exact_match"] + 0.3
