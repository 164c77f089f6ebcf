"""End to end on MiniLM / SmolLM2 and Anthropic HH: the preference examples, cut to CI size, really learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab import api
from tunelab.recipe import load_recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hh_reward_run(tmp_path_factory):
    recipe = load_recipe(EXAMPLES / "hh_reward.yaml", ["data.train_size=1000", "train.epochs=1"])
    return api.train(recipe, str(tmp_path_factory.mktemp("e2e") / "reward"))


def test_reward_model_on_hh_scores_the_preferred_answer_higher(hh_reward_run):
    _, metrics = hh_reward_run
    assert metrics["eval_rows"] == 234
    assert metrics["after"]["pairwise_accuracy"] >= max(0.58, metrics["before"]["pairwise_accuracy"] + 0.04)
    assert metrics["after"]["reward_margin"] > 0


def test_dpo_on_hh_prefers_the_chosen_answers_and_is_judged(hh_reward_run, tmp_path):
    reward_dir, _ = hh_reward_run
    # CI time: 2 epochs over 32 training pairs (16 steps) at 5x the example's learning rate, 16 held-out pairs,
    # 4 judged prompts
    recipe = load_recipe(EXAMPLES / "hh_dpo.yaml", ["data.train_size=32", "train.epochs=2", "data.eval_size=16",
                                                    "train.learning_rate=5e-4", "train.logging_steps=4",
                                                    "eval.generate.num_samples=4", f"eval.judge.model={reward_dir}"])
    run_dir, metrics = api.train(recipe, str(tmp_path / "dpo"))
    # So few steps hardly move held-out pairs (32 of them: margin +0.07 when measured, -0.01 after 64 pairs once; the
    # full example: preference accuracy 0.57), so learning is checked on the pairs DPO trains on: by the second
    # epoch their chosen answers' implicit reward is clearly above the rejected ones' (0 for both at the start;
    # measured: margin 2.2, loss 0.18 against ln 2 = 0.693)
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "rewards/margins" in row and "loss" in row]
    assert steps[-1]["step"] == 16 and steps[-1]["rewards/margins"] > 0.5 and steps[-1]["loss"] < 0.5
    assert metrics["before"]["reward_margin"] == 0 and metrics["before"]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert "preference_accuracy" in metrics["intervals"]
    assert metrics["judge"]["judged_prompts"] == 4 and 0 <= metrics["win_rate"] <= 1
    assert "Win rate over the starting model" in (run_dir / "report.html").read_text()
