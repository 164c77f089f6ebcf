"""Online RL with GRPO: the decoder samples several answers per prompt, a reward scores them, and each answer is
pushed up or down by how it compares with its group's mean (TRL's GRPOTrainer).

load prompts (any sft data format) → load decoder (e.g. an sft run folder) → apply method → score before (mean
reward, exact match and ROUGE-L of greedy answers on the eval prompts) → train → score after → run folder.
Rewards come from a function (built-in or the user's `module:function`) or from a reward-model run folder.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer

from tunelab.console import say
from tunelab.data.generative import GenerativeData, load_generative_data
from tunelab.data.sft_encoding import PromptFormat, prompt_format
from tunelab.errors import TunelabError
from tunelab.evaluation.generation import generate_texts, generation_metrics
from tunelab.evaluation.judge import judge_generations, load_reward
from tunelab.evaluation.uncertainty import ROWS_KEY
from tunelab.lifecycle import train_and_rescore
from tunelab.methods.apply import count_parameters, load_trainable_decoder
from tunelab.models.loading import ModelSource, check_decoder, existing_model, load_tokenizer
from tunelab.recipe import Recipe, RewardSource
from tunelab.rewards import load_reward_function, locate_reward_function
from tunelab.runs.artifacts import finish_run, load_or_score_baseline, with_retention, write_samples
from tunelab.runs.folder import run_folder
from tunelab.trainer import (
    JsonlLogCallback,
    TunelabMixin,
    resolve_bf16,
    training_arguments,
)


class TunelabGRPOTrainer(TunelabMixin, GRPOTrainer):
    """TRL's GRPOTrainer with tunelab's meter and training savings (TunelabMixin)."""


def load_data(recipe: Recipe) -> GenerativeData:
    """Prompts (and the columns a reward function reads), in sft's formats."""
    return load_generative_data(recipe.data)


def check_model(recipe: Recipe, data: GenerativeData, import_code: bool = True) -> ModelSource:
    """A decoder to tune, and a reward source that loads."""
    source = existing_model(recipe.model.name)
    check_decoder(source, recipe.model.name, "grpo", "use e.g. smollm2-135m or an sft run folder")
    check_reward_source(recipe.reward, "reward", import_code)
    return source


def check_reward_source(source: RewardSource, field: str, import_code: bool = True) -> None:
    """The reward function imports and has the right signature (with import_code=False: its module can be found),
    or the reward model is a reward run's folder."""
    if source.function is not None:
        (load_reward_function if import_code else locate_reward_function)(source.function)
        return
    earlier = run_folder(source.model)
    if earlier is None or not earlier.finished or not earlier.task.scores:
        raise TunelabError(f"{field}.model '{source.model}' is not a finished reward-model run folder (task "
                           f"reward); train one first, or use {field}.function")


def run(recipe: Recipe, data: GenerativeData, source: ModelSource, run_dir: Path, resume: bool = False) -> dict:
    """Improve a decoder's answers to the prompts by reward; write the run folder and return metrics.json's content."""
    set_seed(recipe.train.seed)
    bf16 = resolve_bf16(recipe.train.precision)
    tokenizer = load_tokenizer(source.location)
    tokenizer.padding_side = "left"  # TRL generates the completions of a batch of prompts together
    fmt = prompt_format(tokenizer, recipe.data.chat_template, data.format, recipe.model.name)
    model = load_trainable_decoder(source.location, recipe.method, bf16)
    params = count_parameters(model)
    reward = load_reward(recipe.reward, recipe.eval.batch_size, bf16)
    train_rows, eval_rows = prompt_rows(data.train, fmt), prompt_rows(data.eval, fmt)
    say(f"tunelab: {params}; {len(train_rows)} train prompts, {len(eval_rows)} eval prompts ({data.eval_split})")
    trainer = TunelabGRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=training_arguments(
            recipe.train, recipe.eval, run_dir, bf16, args_class=GRPOConfig,
            num_generations=recipe.grpo.num_generations, max_completion_length=recipe.grpo.max_new_tokens,
            temperature=recipe.grpo.temperature, beta=recipe.grpo.beta,
            eval_strategy="no", load_best_model_at_end=False, metric_for_best_model=None,  # no eval loss in RL
            train_sampling_strategy="random"),
        train_dataset=train_rows,
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(run_dir / "log.jsonl")],
    )
    samples = eval_rows.select(range(min(recipe.eval.generate.num_samples, len(eval_rows))))

    def score() -> dict:
        answers = generate_texts(trainer.model, tokenizer, samples["prompt"], recipe.eval.generate, bf16,
                                 add_special_tokens=not fmt.uses_chat_template)
        rewards = reward(prompts=samples["prompt"], completions=answers,
                         **{key: samples[key] for key in samples.column_names if key != "prompt"})
        scores = generation_metrics(answers, samples["reference"])
        scores.setdefault(ROWS_KEY, {})["mean_reward"] = [float(value) for value in rewards]
        return {"mean_reward": float(np.mean(rewards)), **scores,
                "generations": answers}

    score = with_retention(score, recipe, trainer, tokenizer, bf16)
    before = load_or_score_baseline(run_dir, score)
    say(f"tunelab: before training: mean reward {before['mean_reward']:.4f}")
    metrics = train_and_rescore(trainer, score, before, recipe, data, run_dir, resume, params=params, bf16=bf16,
                                train_rows=len(train_rows), eval_rows=len(eval_rows))
    after = metrics["after"]
    judged = judge_generations(recipe.eval.judge, samples["prompt"], before, after, recipe.eval.batch_size, bf16,
                               {key: samples[key] for key in samples.column_names if key != "prompt"}
                               ) if recipe.eval.judge else {}
    extra = write_samples(run_dir, samples["prompt"], samples["reference"], before, after)
    metrics = {
        **metrics,
        **reward_trend(trainer.state.log_history),
        "reward_source": recipe.reward.function or recipe.reward.model,
        "data_format": data.format,  # how `tunelab generate` and `serve` put a prompt into the trained shape
        **judged,
    }
    return finish_run(run_dir, recipe, metrics, f"tunelab run: {recipe.name}", extra_sections=extra)


def prompt_rows(split: datasets.Dataset, fmt: PromptFormat) -> datasets.Dataset:
    """prompt (as the model reads it), reference (the data's response) and, when the responses are labels, the
    list of valid answers (for the known_answer reward)."""
    references = split["response"]
    columns = {"prompt": [fmt.prompt_text(row) for row in split], "reference": references}
    distinct = sorted(set(references))
    if len(distinct) <= len(references) / 2:
        columns["answers"] = [distinct] * len(references)
    return datasets.Dataset.from_dict(columns)


def reward_trend(history: list[dict]) -> dict:
    """Mean training reward over the first and the last fifth of the training steps: did reward rise? Each logged
    reward is TRL's mean since the previous log, so it stands for every step it covers."""
    per_step: list[float] = []
    for entry in history:
        if "reward" in entry:
            per_step += [entry["reward"]] * max(1, entry["step"] - (len(per_step)))
    if len(per_step) < 2:
        return {}
    fifth = max(1, len(per_step) // 5)
    return {"train_reward_first_fifth": float(np.mean(per_step[:fifth])),
            "train_reward_last_fifth": float(np.mean(per_step[-fifth:]))}
