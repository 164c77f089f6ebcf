"""Kahneman-Tversky optimisation: a decoder learns from responses marked good or bad, paired or not.

load rows (prompt/chosen/rejected pairs, which TRL splits into one good and one bad completion each, or unpaired
prompt/completion/label rows) → load decoder → apply method → score before → train with TRL's KTOTrainer →
score after. Scores are implicit rewards β · (log p_policy − log p_ref) of each held-out completion: on pairs,
preference accuracy and reward margin as for DPO; on unpaired rows, how many good completions get a reward above 0
and bad ones below (label accuracy) and the margin between the two means. With an adapter method the reference is
the frozen starting adapter (or the base), so no second copy of the model is held.
"""

from __future__ import annotations

from pathlib import Path

from transformers import set_seed
from trl import KTOConfig, KTOTrainer
from trl.data_utils import unpair_preference_dataset

from tunelab.console import say
from tunelab.data.preference import PreferenceData, load_preference_data
from tunelab.evaluation.generation import generate_texts
from tunelab.evaluation.implicit_reward import completion_logps, pair_completions, reference_context, reward_metrics
from tunelab.evaluation.judge import judge_generations
from tunelab.lifecycle import train_and_rescore
from tunelab.methods.apply import count_parameters, load_trainable_decoder
from tunelab.models.loading import ModelSource, check_decoder, existing_model, load_tokenizer
from tunelab.recipe import Recipe
from tunelab.replay import ReplayLossMixin
from tunelab.runs.artifacts import finish_run, load_or_score_baseline, with_retention, write_samples
from tunelab.stages.dpo import replay_options, replayed, single_pass_options
from tunelab.trainer import (
    JsonlLogCallback,
    TunelabMixin,
    plan_selection,
    resolve_bf16,
    training_arguments,
)


class TunelabKTOTrainer(ReplayLossMixin, TunelabMixin, KTOTrainer):
    """TRL's KTOTrainer with data.replay's language-model loss (ReplayLossMixin) and tunelab's meter and
    training savings (TunelabMixin)."""


def shuffled_completions(data: PreferenceData, seed: int):
    """The training rows as good/bad completions in one seeded random order (TRL's unpairing would put every good
    completion before every bad one, and KTO trains on a fixed order)."""
    rows = unpair_preference_dataset(data.train) if data.paired else data.train
    return rows.shuffle(seed=seed)


def scored_completions(data: PreferenceData) -> tuple[list[str], list[str], list[bool] | None]:
    """The held-out prompts and completions to score: each pair's chosen then its rejected response (labels None),
    or the unpaired completions with their labels."""
    if data.paired:
        return *pair_completions(data.eval["prompt"], data.eval["chosen"], data.eval["rejected"]), None
    return list(data.eval["prompt"]), list(data.eval["completion"]), list(data.eval["label"])


def load_data(recipe: Recipe) -> PreferenceData:
    """Chosen/rejected pairs, or single completions marked good or bad."""
    return load_preference_data(recipe.data, unpaired_ok=True)


def check_model(recipe: Recipe, data: PreferenceData, import_code: bool = True) -> ModelSource:
    """A decoder to tune."""
    source = existing_model(recipe.model.name)
    check_decoder(source, recipe.model.name, "kto", "use e.g. smollm2-135m (task reward trains encoders too)")
    return source


def run(recipe: Recipe, data: PreferenceData, source: ModelSource, run_dir: Path, resume: bool = False) -> dict:
    """KTO-tune a decoder on good/bad completions; write the run folder and return metrics.json's content."""
    set_seed(recipe.train.seed)
    bf16 = resolve_bf16(recipe.train.precision)
    tokenizer = load_tokenizer(source.location)
    model = load_trainable_decoder(source.location, recipe.method, bf16)
    params = count_parameters(model)
    unit = "pairs" if data.paired else "completions"
    say(f"tunelab: {params}; {len(data.train)} train {unit}{replayed(data, recipe)}, {len(data.eval)} eval {unit} "
        f"({data.eval_split})")
    preference = recipe.preference
    trainer = TunelabKTOTrainer(
        model=model,
        args=training_arguments(recipe.train, recipe.eval, run_dir, bf16, args_class=KTOConfig, beta=preference.beta,
                                desirable_weight=preference.desirable_weight,
                                undesirable_weight=preference.undesirable_weight, max_length=recipe.model.max_length,
                                prediction_loss_only=True, **single_pass_options(recipe),
                                selection=plan_selection(data, recipe.eval, can_select=False),
                                # KTO's KL term pairs each row with its neighbour in a fixed-order batch
                                train_sampling_strategy="sequential"),
        train_dataset=shuffled_completions(data, recipe.train.seed),
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(run_dir / "log.jsonl")],
        **replay_options(data, recipe),
    )
    prompts, completions, labels = scored_completions(data)
    reference_model, active = reference_context(trainer)
    with active:  # the reference never changes: its log-probs are computed once
        reference = completion_logps(reference_model, tokenizer, prompts, completions, recipe.model.max_length,
                                     recipe.eval.batch_size, bf16)
    samples = data.eval if data.paired else data.eval.filter(lambda row: row["label"])
    samples = samples.select(range(min(recipe.eval.generate.num_samples, len(samples)))) if (
        data.has_prompt_column or data.paired) else samples.select([])

    def score() -> dict:
        policy = completion_logps(trainer.model, tokenizer, prompts, completions, recipe.model.max_length,
                                  recipe.eval.batch_size, bf16)
        scores = reward_metrics(preference.beta * (policy - reference), policy, labels)
        if len(samples):
            scores["generations"] = generate_texts(trainer.model, tokenizer, samples["prompt"],
                                                   recipe.eval.generate, bf16)
        return scores

    score = with_retention(score, recipe, trainer, tokenizer, bf16)
    before = load_or_score_baseline(run_dir, score)
    metrics = train_and_rescore(trainer, score, before, recipe, data, run_dir, resume, params=params, bf16=bf16)
    after = metrics["after"]
    judged = judge_generations(recipe.eval.judge, samples["prompt"], before, after, recipe.eval.batch_size,
                               bf16) if recipe.eval.judge and len(samples) else {}
    extra = write_samples(run_dir, samples["prompt"], samples["chosen" if data.paired else "completion"], before,
                          after)
    metrics = {**metrics, "loss_type": "kto", "beta": preference.beta, "paired": data.paired, **judged}
    return finish_run(run_dir, recipe, metrics, f"tunelab run: {recipe.name}", extra_sections=extra)
