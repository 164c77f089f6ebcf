"""Preference tasks on tiny random models: reward models and DPO learn to prefer the chosen responses."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import yaml
from conftest import FILLER, WORDS, write_jsonl

from tunelab import api
from tunelab.cli import main
from tunelab.data.preference import load_preference_data, shared_prefix
from tunelab.errors import TunelabError
from tunelab.evaluation.judge import load_reward, reward_text, win_rate
from tunelab.models.precision import bf16_supported
from tunelab.recipe import DPO_LOSSES, RewardSource, validate_recipe
from tunelab.rewards import exact_match, known_answer
from tunelab.stages.grpo import reward_trend


def preference_rows(count: int, seed: int) -> list[dict]:
    """Prompts of filler words; the chosen response is a positive word, the rejected one a negative word."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.sample(FILLER, 3)), "chosen": " " + rng.choice(WORDS["pos"]),
             "rejected": " " + rng.choice(WORDS["neg"])} for _ in range(count)]


def completion_rows(count: int, seed: int) -> list[dict]:
    """preference_rows as prompt/completion rows (the chosen response): prompts for grpo, answers for sft."""
    return [{"prompt": row["prompt"], "completion": row["chosen"]} for row in preference_rows(count, seed)]


def write_pairs(folder: Path, train: int = 80, test: int = 40) -> Path:
    """`folder` made and filled with train.jsonl and test.jsonl of preference_rows (seeds 1 and 2)."""
    folder.mkdir(parents=True)
    write_jsonl(folder / "train.jsonl", preference_rows(train, seed=1))
    write_jsonl(folder / "test.jsonl", preference_rows(test, seed=2))
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs")


def preference_recipe(model, source, task="reward", **sections) -> dict:
    recipe = {"name": f"toy-{task}", "task": task, "model": {"name": str(model), "max_length": 32},
              "data": {"source": str(source)}, "method": "full",
              "train": {"epochs": 6, "batch_size": 8, "learning_rate": 3e-3, "precision": "fp32"}}
    recipe.update(sections)
    return recipe


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_llama"])
def test_reward_model_learns_to_score_chosen_above_rejected(model, pairs, tmp_path, request):
    run_dir, metrics = api.train(validate_recipe(preference_recipe(request.getfixturevalue(model), pairs)),
                                 str(tmp_path / "reward"))
    before, after = metrics["before"], metrics["after"]
    # a random head may already rank many pairs right (up to 0.9 seen): the margin must grow, accuracy not fall
    assert after["pairwise_accuracy"] >= max(0.9, before["pairwise_accuracy"])
    assert after["reward_margin"] > max(0.0, before["reward_margin"]) + 0.5
    assert (run_dir / "model" / "config.json").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["chain"] == [str(request.getfixturevalue(model))]


def test_transcripts_without_a_prompt_column_split_at_their_shared_prefix(tmp_path):
    rows = [{"chosen": "Human: hi there\n\nAssistant: hello friend", "rejected": "Human: hi there\n\nAssistant: go"}]
    write_jsonl(tmp_path / "train.jsonl", rows * 4)
    recipe = validate_recipe(preference_recipe("unused", tmp_path, data={"source": str(tmp_path),
                                                                           "eval_split": None}))
    data = load_preference_data(recipe.data)
    assert not data.has_prompt_column
    assert data.train[0] == {"prompt": "Human: hi there\n\nAssistant: ", "chosen": "hello friend", "rejected": "go"}
    assert shared_prefix("a b c", "a b d") == "a b "
    assert shared_prefix("abc", "xyz") == ""


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "cpo", "orpo"])
def test_dpo_with_lora_learns_to_prefer_the_chosen_responses(tiny_llama, pairs, tmp_path, loss):
    recipe = preference_recipe(tiny_llama, pairs, task="dpo", method={"name": "lora", "r": 8},
                               preference={"loss": loss, "beta": 0.5 if loss in DPO_LOSSES else None},
                               # CPO and ORPO add an SFT term to a weaker preference term: after 4 epochs they were
                               # 0.85-1.0 over six model seeds (so run-order float noise could flip them), 8 gave 1.0
                               train={"epochs": 8 if loss in ("cpo", "orpo") else 4, "batch_size": 8,
                                      "learning_rate": 1e-2, "precision": "fp32"},
                               eval={"generate": {"max_new_tokens": 2, "num_samples": 5}})
    run_dir, metrics = api.train(validate_recipe(recipe), str(tmp_path / loss))
    before, after = metrics["before"], metrics["after"]
    if loss in DPO_LOSSES:
        assert before["preference_accuracy"] == 0 and before["reward_margin"] == 0  # the policy is its reference
    assert after["preference_accuracy"] >= 0.9 and after["reward_margin"] > max(0, before["reward_margin"])
    assert after["logp_chosen"] - after["logp_rejected"] > before["logp_chosen"] - before["logp_rejected"]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and all(sample["reference"] in {" " + w for w in WORDS["pos"]} for sample in samples)


def answer_is_positive(completions, **kwargs):
    """A rule-based reward for the GRPO tests: 1 when the answer holds a positive word."""
    return [float(any(word in completion.split() for word in WORDS["pos"])) for completion in completions]


def unpaired_rows(count: int, seed: int) -> list[dict]:
    """KTO's layout: one completion per row, a positive word marked good, a negative word bad."""
    return [{"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
            for row in preference_rows(count, seed) for side in ("chosen", "rejected")][::3]


def kto_recipe(model, source) -> dict:
    return preference_recipe(model, source, task="kto", method={"name": "lora", "r": 8}, preference={"beta": 0.5},
                             train={"epochs": 4, "batch_size": 8, "learning_rate": 1e-2, "precision": "fp32"},
                             eval={"generate": {"max_new_tokens": 2, "num_samples": 5}})


def test_kto_on_pairs_learns_to_prefer_the_chosen_responses(tiny_llama, pairs, tmp_path):
    run_dir, metrics = api.train(validate_recipe(kto_recipe(tiny_llama, pairs)), str(tmp_path / "kto"))
    before, after = metrics["before"], metrics["after"]
    assert before["preference_accuracy"] == 0 and before["reward_margin"] == 0  # the policy is its reference
    assert after["preference_accuracy"] >= 0.9 and after["reward_margin"] > 0
    assert after["logp_chosen"] - after["logp_rejected"] > before["logp_chosen"] - before["logp_rejected"]
    assert metrics["paired"] and metrics["train_rows"] == 80
    assert (run_dir / "model" / "adapter_config.json").is_file() and (run_dir / "samples.jsonl").is_file()


def test_kto_on_unpaired_completions_rewards_good_above_and_bad_below_zero(tiny_llama, tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", unpaired_rows(120, seed=1))
    write_jsonl(tmp_path / "data" / "test.jsonl", unpaired_rows(60, seed=2))
    _, metrics = api.train(validate_recipe(kto_recipe(tiny_llama, tmp_path / "data")), str(tmp_path / "kto"))
    before, after = metrics["before"], metrics["after"]
    assert before["label_accuracy"] == 0 and before["reward_margin"] == 0
    assert after["label_accuracy"] >= 0.8 and after["reward_margin"] > 0
    assert after["logp_good"] - after["logp_bad"] > before["logp_good"] - before["logp_bad"]
    assert not metrics["paired"] and metrics["train_rows"] == 80


def test_validate_names_the_preference_layout_it_found(tiny_llama, pairs, tmp_path, capsys):
    (tmp_path / "kto.yaml").write_text(yaml.safe_dump(kto_recipe(tiny_llama, pairs)), encoding="utf-8")
    assert main(["validate", str(tmp_path / "kto.yaml")]) == 0
    assert "# ok: 80 train rows, 40 eval rows (test), chosen/rejected pairs" in capsys.readouterr().out


@pytest.mark.parametrize("loss", ["dpo", "hinge", "simpo"])
def test_per_pair_preference_scores_match_trls_evaluation(loss, tiny_llama, pairs, tmp_path):
    """The per-pair scorer behind DPO's metrics (and their intervals) agrees with TRL's own evaluation figures, which
    the run's log keeps: summed log-prob ratios for DPO, mean log-probs for the reference-free SimPO; and the loss
    tunelab computes from the per-pair rewards (dpo, hinge) equals TRL's (40 eval pairs: whole batches of 8)."""
    recipe = validate_recipe(preference_recipe(tiny_llama, pairs, task="dpo", method={"name": "lora", "r": 8},
                                               preference={"loss": loss, "beta": 0.5},
                                               train={"epochs": 2, "batch_size": 8, "learning_rate": 1e-2,
                                                      "precision": "fp32"},
                                               eval={"each_epoch": True}))  # TRL's evaluation, logged
    run_dir, metrics = api.train(recipe, str(tmp_path / loss))
    logged = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    trls = [row for row in logged if "eval_rewards/accuracies" in row][-1]  # the evaluation after training
    after = metrics["after"]
    for ours, theirs in (("preference_accuracy", "eval_rewards/accuracies"), ("reward_margin", "eval_rewards/margins"),
                         ("logp_chosen", "eval_logps/chosen"), ("logp_rejected", "eval_logps/rejected"),
                         ("loss", "eval_loss")):
        assert after[ours] == pytest.approx(trls[theirs], rel=1e-3, abs=1e-3), ours
    low, high = metrics["intervals"]["preference_accuracy"]["after"]["low"], \
        metrics["intervals"]["preference_accuracy"]["after"]["high"]
    assert low <= after["preference_accuracy"] <= high and "preference_accuracy" in metrics["gain"]


def grpo_recipe(model, tmp_path, method, **train) -> dict:
    """GRPO on 40 prompts whose answers the rule-based reward `answer_is_positive` scores."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    rows = completion_rows(40, seed=3)
    write_jsonl(prompts / "train.jsonl", rows)
    write_jsonl(prompts / "test.jsonl", rows[:16])
    return preference_recipe(model, prompts, task="grpo", method=method,
                             data={"source": str(prompts), "format": "prompt_completion", "chat_template": "none"},
                             reward={"function": "test_preference_tiny:answer_is_positive"},
                             grpo={"num_generations": 4, "max_new_tokens": 2},
                             train={"epochs": 10, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32",
                                    "logging_steps": 1, **train},
                             eval={"generate": {"max_new_tokens": 2, "num_samples": 16}})


def test_grpo_with_a_reward_function_raises_the_reward(tiny_llama, tmp_path, monkeypatch):
    from tunelab.stages import grpo

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rollouts: list[int] = []  # rows per rollout batch decoded by tunelab's generation engine

    def counted(decoder, prompts, *args, **kwargs):
        rollouts.append(len(prompts))
        return decode_all(decoder, prompts, *args, **kwargs)

    decode_all = grpo.decode_all
    monkeypatch.setattr(grpo, "decode_all", counted)
    _, metrics = api.train(validate_recipe(grpo_recipe(tiny_llama, tmp_path, "full")), str(tmp_path / "grpo"))
    assert rollouts and all(rows > 1 for rows in rollouts)  # the rollouts went through the engine, batched
    assert metrics["train_reward_last_fifth"] > metrics["train_reward_first_fifth"] + 0.3
    assert metrics["after"]["mean_reward"] > metrics["before"]["mean_reward"]
    assert metrics["reward_source"] == "test_preference_tiny:answer_is_positive"


@pytest.mark.parametrize(("function", "message"), [
    ("no_such_module:score", "cannot import module 'no_such_module'"),
    ("test_preference_tiny:missing", "has no function 'missing'"),
    ("test_preference_tiny:preference_rows", "must accept `completions` and `**kwargs`"),
    ("score", "neither a built-in"),
])
def test_a_bad_reward_function_is_refused_before_training(function, message, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": " b"}] * 4)
    recipe = preference_recipe(tiny_llama, tmp_path / "train.jsonl", task="grpo", reward={"function": function},
                               data={"source": str(tmp_path / "train.jsonl"), "eval_split": None})
    with pytest.raises(TunelabError, match=re.escape(message)):
        api.train(validate_recipe(recipe), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_built_in_rewards_score_answers_against_the_reference():
    assert exact_match(["Good.", "bad"], reference=["good", "good"]) == [1.0, 0.0]
    assert known_answer(["good", "bad", "blue"], reference=["good", "good", "good"],
                        answers=[["good", "bad"]] * 3) == [1.0, 0.25, 0.0]


@pytest.fixture(scope="module")
def reward_run(tiny_bert, pairs, tmp_path_factory):
    """A finished reward-model run (tiny BERT) that scores positive answers above negative ones."""
    run_dir, metrics = api.train(validate_recipe(preference_recipe(tiny_bert, pairs)),
                                 str(tmp_path_factory.mktemp("judge") / "reward"))
    assert metrics["after"]["pairwise_accuracy"] >= 0.9
    return run_dir


def test_win_rate_counts_wins_and_ties_half():
    def judge(completions, **_):
        return [float(len(c)) for c in completions]
    result = win_rate(judge, ["p"] * 4, before=["aa", "a", "aaa", "a"], after=["aaa", "a", "a", "aaaa"])
    assert result["win_rate"] == (2 + 0.5) / 4
    assert (result["wins"], result["ties"], result["losses"], result["judged_prompts"]) == (2, 1, 1, 4)
    assert result["judge_reward_after"] == 2.25 and result["judge_reward_before"] == 1.75


def test_reward_text_puts_back_one_space_between_a_prompt_and_a_stripped_answer():
    assert reward_text("Assistant:", "hi") == "Assistant: hi"  # a generated answer comes stripped
    assert reward_text("Assistant:", " hi", "</s>") == "Assistant: hi</s>"  # a raw HH response keeps its one space
    assert reward_text("Q\n", "hi") == "Q\nhi" and reward_text("", "hi") == "hi"


def test_dpo_answers_are_judged_by_the_reward_model_run(tiny_llama, pairs, reward_run, tmp_path):
    recipe = preference_recipe(tiny_llama, pairs, task="dpo", method={"name": "lora", "r": 8},
                               preference={"beta": 0.5},
                               train={"epochs": 4, "batch_size": 8, "learning_rate": 1e-2, "precision": "fp32"},
                               eval={"generate": {"max_new_tokens": 2, "num_samples": 20},
                                     "judge": {"model": str(reward_run)}})
    run_dir, metrics = api.train(validate_recipe(recipe), str(tmp_path / "dpo"))
    judge = metrics["judge"]
    assert judge["source"] == str(reward_run) and judge["judged_prompts"] == 20
    assert judge["wins"] + judge["ties"] + judge["losses"] == 20
    # the saved answers, judged again by the reward run, give the reported numbers
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    again = win_rate(load_reward(RewardSource(model=str(reward_run)), 64, bf16=False),
                     [sample["prompt"] for sample in samples], [sample["before"] for sample in samples],
                     [sample["after"] for sample in samples])
    assert metrics["win_rate"] == again["win_rate"]
    assert metrics["after"]["judge_reward"] == pytest.approx(again["judge_reward_after"], abs=1e-4)
    assert metrics["before"]["judge_reward"] == pytest.approx(again["judge_reward_before"], abs=1e-4)
    assert "Win rate over the starting model" in (run_dir / "report.html").read_text()


@pytest.mark.parametrize(("judge", "task", "message"), [
    ({"function": "exact_match"}, "reward", "eval.judge scores the answers of tasks dpo, kto, grpo"),
    ({}, "dpo", "eval.judge needs one source"),
    ({"function": "exact_match", "model": "runs/x"}, "dpo", "eval.judge needs one source"),
])
def test_a_misplaced_or_ambiguous_judge_is_refused(judge, task, message, pairs):
    with pytest.raises(TunelabError, match=re.escape(message)):
        validate_recipe(preference_recipe("m", pairs, task=task, eval={"judge": judge}))


def test_a_judge_that_is_not_a_reward_run_is_refused_before_training(tiny_llama, pairs, tmp_path):
    recipe = preference_recipe(tiny_llama, pairs, task="dpo", method={"name": "lora", "r": 8},
                               eval={"judge": {"model": str(tiny_llama)}})
    with pytest.raises(TunelabError, match=re.escape("eval.judge.model") + ".*not a finished reward-model run"):
        api.train(validate_recipe(recipe), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_reward_trend_weights_each_logged_reward_by_the_steps_it_covers():
    history = [{"step": 1, "reward": 0.0}, {"step": 2, "reward": 1.0}, {"step": 5, "loss": 0.3},
               {"step": 6, "reward": 0.5}]
    assert reward_trend(history) == {"train_reward_first_fifth": 0.0, "train_reward_last_fifth": 0.5}
    assert reward_trend([{"step": 3, "reward": 0.2}]) == {"train_reward_first_fifth": 0.2,
                                                          "train_reward_last_fifth": 0.2}


@pytest.mark.skipif(not bf16_supported(), reason="this machine has no native bf16")
@pytest.mark.parametrize("task", ["dpo", "kto", "grpo"])
def test_lora_preference_training_under_bf16_learns_over_a_bf16_base(task, tiny_llama, pairs, tmp_path, monkeypatch):
    """Under bf16 the frozen base is stored in bf16 while the adapters train in fp32; the reference passes (adapters
    off), GRPO's generation inside the step and the scoring must all still work."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    lora = {"name": "lora", "r": 8}
    if task == "grpo":
        recipe = grpo_recipe(tiny_llama, tmp_path, lora, learning_rate=3e-2, precision="bf16")
    else:
        recipe = preference_recipe(tiny_llama, pairs, task=task, method=lora, preference={"beta": 0.5},
                                   train={"epochs": 4, "batch_size": 8, "learning_rate": 1e-2, "precision": "bf16"},
                                   eval={"generate": {"max_new_tokens": 2, "num_samples": 5}})
    _, metrics = api.train(validate_recipe(recipe), str(tmp_path / task))
    assert metrics["precision"] == "bf16"
    if task == "grpo":
        assert metrics["after"]["mean_reward"] > metrics["before"]["mean_reward"]
    else:
        assert metrics["after"]["preference_accuracy"] >= 0.9 and metrics["after"]["reward_margin"] > 0
