"""Reward models: a scalar head learns to score the chosen response of each pair above the rejected one.

load pairs → load a classifier with one output (encoder or decoder) → apply method → score before (pairwise
accuracy on the eval pairs) → train with TRL's RewardTrainer (Bradley-Terry loss) → score after → run folder.

Tokenization is ours, not TRL's: TRL appends the EOS token as text (encoders such as BERT have none) and cuts long
transcripts on the right, which would cut off the response a reward model must see. Here long pairs keep their end.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from transformers import set_seed
from trl import RewardConfig, RewardTrainer

from tunelab.console import say
from tunelab.data.preference import PreferenceData, load_preference_data
from tunelab.evaluation.classification import predict_logits
from tunelab.evaluation.judge import REWARD_LABELS, reward_texts
from tunelab.evaluation.uncertainty import ROWS_KEY
from tunelab.lifecycle import train_and_rescore
from tunelab.methods.apply import apply_method, count_parameters
from tunelab.models.loading import ModelSource, existing_model, is_decoder, load_classifier, load_tokenizer
from tunelab.recipe import Recipe
from tunelab.runs.artifacts import finish_run, load_or_score_baseline
from tunelab.trainer import (
    JsonlLogCallback,
    TunelabMixin,
    plan_selection,
    resolve_bf16,
    training_arguments,
)


class TunelabRewardTrainer(TunelabMixin, RewardTrainer):
    """TRL's RewardTrainer with tunelab's meter and training savings (TunelabMixin)."""


def load_data(recipe: Recipe) -> PreferenceData:
    """Chosen/rejected pairs."""
    return load_preference_data(recipe.data)


def check_model(recipe: Recipe, data: PreferenceData, import_code: bool = True) -> ModelSource:
    """The model exists (an encoder or a decoder: either gets a one-score head)."""
    return existing_model(recipe.model.name)


def run(recipe: Recipe, data: PreferenceData, source: ModelSource, run_dir: Path, resume: bool = False) -> dict:
    """Train a reward model on chosen/rejected pairs; write the run folder and return metrics.json's content."""
    set_seed(recipe.train.seed)
    bf16 = resolve_bf16(recipe.train.precision)
    tokenizer = load_tokenizer(source.location)
    model, fresh_modules = load_classifier(source.location, REWARD_LABELS, tokenizer, recipe.model.new_head)
    model = apply_method(model, recipe.method, fresh_modules, bf16=bf16)
    params = count_parameters(model)
    ending = tokenizer.eos_token if is_decoder(source.location) and tokenizer.eos_token else ""
    say(f"tunelab: {params}; {len(data.train)} train pairs, {len(data.eval)} eval pairs ({data.eval_split})")

    def score() -> dict:
        return pairwise_scores(model, tokenizer, data.eval, ending, recipe, bf16)

    before = load_or_score_baseline(run_dir, score)
    say(f"tunelab: before training: pairwise accuracy {before['pairwise_accuracy']:.4f}")
    selection = plan_selection(data, recipe.eval)
    trainer = TunelabRewardTrainer(
        model=model,
        args=training_arguments(recipe.train, recipe.eval, run_dir, bf16, args_class=RewardConfig,
                                # pairs have no input_ids column to group by length
                                max_length=None, prediction_loss_only=True, train_sampling_strategy="random",
                                selection=selection),
        train_dataset=encode_pairs(data.train, tokenizer, ending, recipe.model.max_length),
        eval_dataset=None if selection.rows is None else encode_pairs(selection.rows, tokenizer, ending,
                                                                      recipe.model.max_length),
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(run_dir / "log.jsonl")],
    )
    metrics = train_and_rescore(trainer, score, before, recipe, data, run_dir, resume, params=params, bf16=bf16,
                                selected_on=selection.selected_on)
    return finish_run(run_dir, recipe, metrics, f"tunelab run: {recipe.name}")


def encode_pairs(split: datasets.Dataset, tokenizer, ending: str, max_length: int) -> datasets.Dataset:
    """chosen_ids / rejected_ids of prompt + response (+ EOS on decoders), long ones cut from the left."""
    side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        return split.map(lambda batch: {
            f"{key}_ids": tokenizer(reward_texts(batch["prompt"], batch[key], ending), truncation=True,
                                    max_length=max_length)["input_ids"]
            for key in ("chosen", "rejected")}, batched=True, remove_columns=split.column_names)
    finally:
        tokenizer.truncation_side = side


def reward_scores(model, tokenizer, texts: list[str], recipe: Recipe, bf16: bool) -> np.ndarray:
    """The reward of each text (long ones scored on their end)."""
    return predict_logits(model, tokenizer, texts, None, recipe.eval.batch_size, recipe.model.max_length, bf16,
                          keep_end=True)[:, 0]


def pairwise_scores(model, tokenizer, pairs: datasets.Dataset, ending: str, recipe: Recipe, bf16: bool) -> dict:
    """Pairwise accuracy (chosen scored above rejected) and the mean reward margin on the pairs."""
    chosen, rejected = (reward_scores(model, tokenizer, reward_texts(pairs["prompt"], pairs[key], ending), recipe,
                                      bf16) for key in ("chosen", "rejected"))
    return {"pairwise_accuracy": float((chosen > rejected).mean()),
            "reward_margin": float((chosen - rejected).mean()),
            ROWS_KEY: {"pairwise_accuracy": (chosen > rejected).astype(int).tolist()}}
