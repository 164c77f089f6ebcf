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
import torch
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer
from trl.models import unwrap_model_for_generation

from tunelab.console import say
from tunelab.data.generative import GenerativeData, load_generative_data
from tunelab.data.sft_encoding import PromptFormat, prompt_format
from tunelab.errors import TunelabError
from tunelab.evaluation.generation import generate_texts, generation_metrics
from tunelab.evaluation.judge import judge_generations, load_reward
from tunelab.evaluation.uncertainty import ROWS_KEY
from tunelab.generation.engine import decode_all, decoder_for
from tunelab.generation.sampling import Sampling
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
    """TRL's GRPOTrainer with tunelab's meter and training savings (TunelabMixin), its rollouts decoded by tunelab's
    generation engine (continuous batching: the rows of answers that end early go to the next prompts' answers,
    where `generate` kept decoding padding for them until the longest answer of the batch ended)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        plain = not (self.use_vllm or self.use_transformers_continuous_batching or images or multimodal_fields)
        if not plain or not engine_samples_as(self.generation_config):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                          generation_kwargs=self.generation_kwargs,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
              as model, torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False)):
            training, _ = model.training, model.eval()  # no dropout while answering
            samplings = [rollout_sampling(self.generation_config) for _ in prompt_ids]
            rows = decode_all(decoder_for(model, self._tokenizer, self.args.bf16), [list(p) for p in prompt_ids],
                              samplings, batch_size=len(prompt_ids))
            model.train(training)
        # TRL keeps an answer's end-of-sequence token in its completion ids
        return [row.tokens + ([row.eos] if row.eos is not None else []) for row in rows], None


def engine_samples_as(config) -> bool:
    """Whether tunelab's engine samples as `config` asks: temperature, top-p and top-k only (else TRL's own path)."""
    return (config.num_beams in (None, 1) and config.repetition_penalty in (None, 1.0) and config.min_p is None
            and not config.no_repeat_ngram_size)


def rollout_sampling(config) -> Sampling:
    """One answer's sampling, seeded from torch's random state (which set_seed seeded: a run's rollouts repeat)."""
    return Sampling(max_tokens=config.max_new_tokens, temperature=config.temperature if config.do_sample else 0.0,
                    top_p=config.top_p if config.top_p is not None else 1.0, top_k=config.top_k or -1,
                    seed=int(torch.randint(0, 2**62, ())))


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
