"""Rewards from a recipe's source (a reward function or a reward-model run folder), and the win rate of a trained
policy's answers over its starting point's, as such a reward judges them."""

from __future__ import annotations

import numpy as np

from tunelab.console import say
from tunelab.evaluation.classification import predict_logits
from tunelab.evaluation.uncertainty import mean_interval
from tunelab.models.loading import is_decoder, load_classifier, load_tokenizer
from tunelab.recipe import RewardSource
from tunelab.rewards import RewardFunction, load_reward_function
from tunelab.runs.folder import RunFolder

REWARD_LABELS = ["reward"]  # a reward model's one output: the scalar reward


def load_reward(source: RewardSource, batch_size: int, bf16: bool) -> RewardFunction:
    """The source as a TRL-style reward function: the named function, or the reward-model run scoring prompt +
    completion the way it was trained (its own max_length; EOS appended on decoders; long texts keep their end)."""
    if source.function is not None:
        return load_reward_function(source.function)
    run = RunFolder(source.model)
    location = str(run.model_dir)
    tokenizer = load_tokenizer(location)
    model, _ = load_classifier(location, REWARD_LABELS, tokenizer)
    max_length = run.recipe.model.max_length
    ending = tokenizer.eos_token if is_decoder(location) and tokenizer.eos_token else ""

    def reward_model(prompts: list[str], completions: list[str], **_) -> list[float]:
        return predict_logits(model, tokenizer, reward_texts(prompts, completions, ending), None, batch_size,
                              max_length, bf16, keep_end=True)[:, 0].tolist()

    return reward_model


def reward_text(prompt: str, response: str, ending: str = "") -> str:
    """The one text a reward model scores (and is trained on) for a prompt and a response: the two joined, with
    the space put back between a prompt ending in a word (e.g. 'Assistant:') and a response that comes stripped
    (generated answers do; HH's raw responses start with their space), then `ending` (EOS on decoders)."""
    needs_space = prompt and response and not prompt[-1].isspace() and not response[0].isspace()
    return f"{prompt} {response}{ending}" if needs_space else f"{prompt}{response}{ending}"


def reward_texts(prompts: list[str], responses: list[str], ending: str = "") -> list[str]:
    """reward_text of each prompt and its response."""
    return [reward_text(prompt, response, ending) for prompt, response in zip(prompts, responses, strict=True)]


def win_rate(judge: RewardFunction, prompts: list[str], before: list[str], after: list[str],
             columns: dict[str, list] | None = None) -> dict:
    """How often the judge scores the trained answer above the starting answer to the same prompt (a tie, or the
    same answer, counts half), with the counts and the mean judged reward of each side."""
    columns = columns or {}
    before_scores = np.asarray(judge(prompts=prompts, completions=before, **columns), dtype=float)
    after_scores = np.asarray(judge(prompts=prompts, completions=after, **columns), dtype=float)
    same = np.array([b == a for b, a in zip(before, after, strict=True)])  # one answer: a tie, however batched
    wins = int(((after_scores > before_scores) & ~same).sum())
    ties = int((same | (after_scores == before_scores)).sum())
    outcomes = np.where(same | (after_scores == before_scores), 0.5, (after_scores > before_scores).astype(float))
    return {"win_rate": (wins + ties / 2) / len(prompts), "win_rate_interval": mean_interval(outcomes),
            "wins": wins, "ties": ties,
            "losses": len(prompts) - wins - ties, "judged_prompts": len(prompts),
            "judge_reward_before": float(before_scores.mean()), "judge_reward_after": float(after_scores.mean())}


def judge_generations(source: RewardSource, prompts: list[str], before: dict, after: dict, batch_size: int,
                      bf16: bool, columns: dict[str, list] | None = None) -> dict:
    """Judge the answers in before["generations"] against after["generations"]: adds each side's mean judged reward
    to before/after as judge_reward and returns metrics.json's win_rate and judge entries."""
    judge = load_reward(source, batch_size, bf16)
    result = win_rate(judge, prompts, before["generations"], after["generations"], columns)
    before["judge_reward"] = result.pop("judge_reward_before")
    after["judge_reward"] = result.pop("judge_reward_after")
    say(f"tunelab: win rate over the starting model {result['win_rate']:.3f} on {len(prompts)} prompts "
          f"(judge: {source.describe()})")
    return {"win_rate": result.pop("win_rate"), "win_rate_interval": result.pop("win_rate_interval"),
            "judge": {"source": source.describe(), **result}}
