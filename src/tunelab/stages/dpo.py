"""Direct preference optimisation and its relatives: a decoder learns to prefer the chosen response of each pair.

load pairs → load decoder → apply method → score before (implicit-reward preference accuracy, reward margin,
log-probs of chosen and rejected on the eval pairs; sample answers) → train with TRL's DPOTrainer → score after.

With an adapter method (LoRA, DoRA, QLoRA, IA3, …) the reference model is the frozen base itself, reached by
switching the adapter off, so no second copy of the model is held; full fine-tuning keeps a frozen copy.
SimPO, CPO and ORPO need no reference model; they run on TRL's (experimental) CPO and ORPO trainers, which log
the same rewards/* metrics (their implicit reward is the policy's own scaled log-prob).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import set_seed
from trl import DPOConfig, DPOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from tunelab.console import say
from tunelab.data.preference import PreferenceData, load_preference_data
from tunelab.evaluation.generation import generate_texts
from tunelab.evaluation.implicit_reward import completion_logps, pair_completions, reference_context, reward_metrics
from tunelab.evaluation.judge import judge_generations
from tunelab.lifecycle import train_and_rescore
from tunelab.methods.apply import count_parameters, load_trainable_decoder
from tunelab.models.loading import ModelSource, check_decoder, existing_model, load_tokenizer
from tunelab.recipe import DPO_LOSSES, PreferenceConfig, Recipe
from tunelab.replay import ReplayLossMixin
from tunelab.runs.artifacts import finish_run, load_or_score_baseline, with_retention, write_samples
from tunelab.trainer import (
    JsonlLogCallback,
    TunelabMixin,
    plan_selection,
    resolve_bf16,
    training_arguments,
)

# SimPO and ORPO reward the policy's mean log-prob per completion token; the others its summed log-prob
LENGTH_NORMALISED_LOSSES = ("simpo", "orpo")


class TunelabDPOTrainer(ReplayLossMixin, TunelabMixin, DPOTrainer):
    """TRL's DPOTrainer with data.replay's language-model loss (ReplayLossMixin) and tunelab's meter and
    training savings (TunelabMixin)."""


class TunelabCPOTrainer(ReplayLossMixin, TunelabMixin, CPOTrainer):
    """TRL's CPOTrainer (CPO and SimPO) with data.replay's language-model loss (ReplayLossMixin) and tunelab's meter and
    training savings (TunelabMixin)."""


class TunelabORPOTrainer(ReplayLossMixin, TunelabMixin, ORPOTrainer):
    """TRL's ORPOTrainer with data.replay's language-model loss (ReplayLossMixin) and tunelab's meter and
    training savings (TunelabMixin)."""


def preference_trainer(preference: PreferenceConfig) -> tuple[type, type, dict]:
    """The TRL trainer, its config class and the loss options for preference.loss."""
    if preference.loss in DPO_LOSSES:
        return TunelabDPOTrainer, DPOConfig, {"loss_type": [DPO_LOSSES[preference.loss]], "beta": preference.beta}
    if preference.loss == "orpo":
        return TunelabORPOTrainer, ORPOConfig, {"beta": preference.beta}
    if preference.loss == "simpo":
        return TunelabCPOTrainer, CPOConfig, {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": preference.beta,
                                              "simpo_gamma": preference.simpo_gamma}
    return TunelabCPOTrainer, CPOConfig, {"loss_type": "sigmoid", "beta": preference.beta}


def pair_loss(loss: str, rewards: np.ndarray) -> float | None:
    """The mean DPO loss over the pairs from their implicit rewards (chosen first, then rejected; β already applied),
    by TRL's formulas: sigmoid −log σ(r_c − r_r), hinge max(0, 1 − (r_c − r_r)); None for the other losses."""
    half = len(rewards) // 2
    margins = torch.as_tensor(rewards[:half] - rewards[half:], dtype=torch.float64)
    if loss == "dpo":
        return float(-torch.nn.functional.logsigmoid(margins).mean())
    if loss == "hinge":
        return float(torch.relu(1 - margins).mean())
    return None


def replay_options(data: PreferenceData, recipe: Recipe) -> dict:
    """The trainer's replay texts and rows per step (data.replay.fraction × batch_size, at least one)."""
    if data.replay is None:
        return {}
    return {"replay": data.replay, "replay_rows": max(1, round(recipe.data.replay.fraction * recipe.train.batch_size))}


def replayed(data: PreferenceData, recipe: Recipe) -> str:
    """' + N replay texts (k a step)' for the run's first line, or nothing."""
    if data.replay is None:
        return ""
    return f" + {len(data.replay)} replay texts ({replay_options(data, recipe)['replay_rows']} a step)"


def single_pass_options(recipe: Recipe) -> dict:
    """One epoch has one checkpoint to pick, and scoring after training evaluates it anyway: skip the epoch-end
    evaluation (on SmolLM2 it costs as much as 20 training steps per 100 eval pairs)."""
    if recipe.train.epochs > 1 or recipe.train.max_steps is not None:
        return {}
    return {"eval_strategy": "no", "load_best_model_at_end": False, "metric_for_best_model": None}


def load_data(recipe: Recipe) -> PreferenceData:
    """Chosen/rejected pairs."""
    return load_preference_data(recipe.data)


def check_model(recipe: Recipe, data: PreferenceData, import_code: bool = True) -> ModelSource:
    """A decoder to tune."""
    source = existing_model(recipe.model.name)
    check_decoder(source, recipe.model.name, "dpo", "use e.g. smollm2-135m (task reward trains encoders too)")
    return source


def run(recipe: Recipe, data: PreferenceData, source: ModelSource, run_dir: Path, resume: bool = False) -> dict:
    """Preference-tune a decoder on chosen/rejected pairs; write the run folder and return metrics.json's content."""
    set_seed(recipe.train.seed)
    bf16 = resolve_bf16(recipe.train.precision)
    tokenizer = load_tokenizer(source.location)
    model = load_trainable_decoder(source.location, recipe.method, bf16)
    params = count_parameters(model)
    say(f"tunelab: {params}; {len(data.train)} train pairs{replayed(data, recipe)}, {len(data.eval)} eval pairs "
        f"({data.eval_split})")
    trainer_class, config_class, loss_options = preference_trainer(recipe.preference)
    trainer = trainer_class(
        model=model,
        args=training_arguments(recipe.train, recipe.eval, run_dir, bf16, args_class=config_class, **loss_options,
                                max_length=recipe.model.max_length, prediction_loss_only=True,
                                selection=plan_selection(data, recipe.eval, can_select=False),
                                **single_pass_options(recipe),
                                train_sampling_strategy="random"),  # pairs have no input_ids to group by length
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(run_dir / "log.jsonl")],
        **replay_options(data, recipe),
    )
    samples = data.eval.select(range(min(recipe.eval.generate.num_samples, len(data.eval))))
    preference = recipe.preference
    prompts, completions = pair_completions(data.eval["prompt"], data.eval["chosen"], data.eval["rejected"])
    per_token = preference.loss in LENGTH_NORMALISED_LOSSES

    def logps(model) -> np.ndarray:
        return completion_logps(model, tokenizer, prompts, completions, recipe.model.max_length,
                                recipe.eval.batch_size, bf16, per_token)

    reference = 0.0
    if preference.loss in DPO_LOSSES:  # the reference never changes: its log-probs are computed once
        reference_model, active = reference_context(trainer)
        with active:
            reference = logps(reference_model)

    def score() -> dict:
        # TRL's evaluation reports a mean of batch means with no per-pair record, so the preference metrics come from
        # tunelab's per-pair scorer (equal to TRL's figures: a test checks it), and with them the per-pair outcomes
        # the confidence intervals resample. The sigmoid and hinge losses follow from the same rewards; the others
        # (length-normalised or with extra terms) still take TRL's evaluation, a second pass over the pairs.
        policy = logps(trainer.model)
        rewards = preference.beta * (policy - reference)
        loss = pair_loss(preference.loss, rewards)
        scores = {"loss": trainer.evaluate()["eval_loss"] if loss is None else loss}
        scores.update(reward_metrics(rewards, policy, None))
        if len(samples):
            scores["generations"] = generate_texts(trainer.model, tokenizer, samples["prompt"],
                                                   recipe.eval.generate, bf16)
        return scores

    # Before, DPO's policy equals its reference, so every implicit reward is 0 (accuracy 0, margin 0) and the
    # log-probs show what the starting model prefers; the reference-free losses score the starting model itself.
    score = with_retention(score, recipe, trainer, tokenizer, bf16)
    before = load_or_score_baseline(run_dir, score)
    metrics = train_and_rescore(trainer, score, before, recipe, data, run_dir, resume, params=params, bf16=bf16)
    after = metrics["after"]
    judged = judge_generations(recipe.eval.judge, samples["prompt"], before, after, recipe.eval.batch_size,
                               bf16) if recipe.eval.judge else {}
    extra = write_samples(run_dir, samples["prompt"], samples["chosen"], before, after)
    metrics = {**metrics, "loss_type": recipe.preference.loss, "beta": recipe.preference.beta, **judged}
    return finish_run(run_dir, recipe, metrics, f"tunelab run: {recipe.name}", extra_sections=extra)
