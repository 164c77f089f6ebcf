"""tunelab tune's search space: YAML over recipe keys to Optuna distributions, checked by the recipe schema."""

from __future__ import annotations

import optuna
import pytest

from tunelab.errors import TunelabError
from tunelab.recipe import validate_recipe
from tunelab.tune import trials
from tunelab.tune.space import check_space, default_space, parse_space, suggest, with_values

RAW = {"name": "r", "task": "sft", "model": {"name": "m"}, "data": {"source": "s"},
       "method": {"name": "lora", "r": 16}, "train": {"epochs": 3}}


def test_each_kind_becomes_its_optuna_distribution_and_trials_draw_inside_it():
    space = parse_space({"train.learning_rate": {"log_uniform": [1e-5, 1e-3]},
                         "train.warmup_ratio": {"uniform": [0.0, 0.2]}, "train.epochs": {"int": [1, 4]},
                         "method.r": {"choice": [4, 8, 16]}}, "space")
    check_space(RAW, space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = suggest(study.ask(), space)
        assert 1e-5 <= values["train.learning_rate"] <= 1e-3 and 0 <= values["train.warmup_ratio"] <= 0.2
        assert values["train.epochs"] in range(1, 5) and values["method.r"] in (4, 8, 16)
        recipe = validate_recipe(with_values(RAW, values))
        assert recipe.method.r == values["method.r"] and recipe.train.epochs == values["train.epochs"]


@pytest.mark.parametrize(("space", "message"), [
    ({"train.learnin_rate": {"uniform": [0.1, 0.2]}}, "search space key 'train.learnin_rate' = 0.1: unknown key"),
    ({"train.warmup_ratio": {"uniform": [0.0, 1.5]}}, "'train.warmup_ratio' = 1.5 is invalid"),
    ({"method.r": {"int": [0, 8]}}, "search space key 'method.r' = 0"),
    ({"train.epochs": {"between": [1, 2]}}, "'train.epochs' needs one of log_uniform, uniform, int"),
    ({"train.learning_rate": {"log_uniform": [0, 1e-3]}}, "needs low > 0"),
    ({"train.epochs": {"int": [3, 1]}}, "needs [low, high] with low < high"),
])
def test_a_bad_space_is_refused_in_one_line_before_any_trial(space, message):
    with pytest.raises(TunelabError, match=None) as refused:
        check_space(RAW, parse_space(space, "--space s.yaml"))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_default_space_searches_the_rate_and_lora_rank():
    space = default_space(validate_recipe(RAW))
    assert set(space) == {"train.learning_rate", "method.r"}
    rate = validate_recipe(RAW).train.learning_rate
    assert space["train.learning_rate"].low == pytest.approx(rate / 10)
    full = default_space(validate_recipe({**RAW, "method": "full"}))
    assert "method.r" not in full
    check_space(RAW, space)


def run_curve(study: optuna.Study, losses: list[float], yours: bool = False) -> tuple[optuna.trial.TrialState, int]:
    """Feed one trial's per-epoch validation losses to the study's pruner as tune's callback does (signed for a
    maximised objective); the trial's end state and the last epoch it trained."""
    trial = study.ask()
    for epoch, loss in enumerate(losses, start=1):
        trial.report(-loss, epoch)
        if trial.should_prune() and not yours:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return optuna.trial.TrialState.PRUNED, epoch
    study.tell(trial, 1.0 - losses[-1])
    return optuna.trial.TrialState.COMPLETE, len(losses)


def test_the_pruner_stops_a_trial_when_it_falls_behind_the_finished_ones_not_only_at_a_rung():
    study = optuna.create_study(direction="maximize", pruner=trials.pruner())
    yours = [3.0, 2.0, 1.5, 1.2, 1.0, 0.9, 0.85, 0.8]
    assert run_curve(study, yours, yours=True) == (optuna.trial.TrialState.COMPLETE, 8)
    # worse than your trial at epoch 1 (the first rung): successive halving stops it there
    assert run_curve(study, [3.5, 3.0, 2.0]) == (optuna.trial.TrialState.PRUNED, 1)
    # ahead at epochs 1-2 (a higher learning rate), then behind your trial's epoch 3 and never catching up: the
    # percentile check stops it at epoch 3 instead of letting it run to the next rung (epoch 4)
    assert run_curve(study, [2.5, 1.8, 1.6, 1.6, 1.7, 1.8, 1.9, 2.0]) == (optuna.trial.TrialState.PRUNED, 3)
    # the best at the first rung and ahead of your trial at every epoch: it runs whole
    assert run_curve(study, [2.4, 1.9, 1.4, 1.1, 0.9, 0.8, 0.7, 0.6]) == (optuna.trial.TrialState.COMPLETE, 8)
