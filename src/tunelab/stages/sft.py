"""Decoder training on text: sft (prompt → response) and pretrain (continued pre-training on raw domain text).

load data → load decoder → apply method → score before (loss, perplexity; sft also generations) → train with
TRL's SFTTrainer (truncation, packing, padding-free batches) → score after → write the run folder.

With data.streaming the train rows are a stream (datasets' IterableDataset): shuffled through a buffer, tokenized
as the Trainer reads them and, for pretrain, cut into blocks by TRL's wrapped packing, which packs a stream as it
packs rows in memory (a batched map: each 1,000 texts end in one short block). Nothing holds the whole split, so
memory does not grow with the file; the Trainer runs train.max_steps steps, starting the stream again when it ends.
Under several processes accelerate deals each one its share of every batch read from the same seeded stream.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, set_seed
from trl import SFTConfig, SFTTrainer

from tunelab.console import say
from tunelab.data.generative import GenerativeData, load_generative_data, shuffle_stream
from tunelab.data.sft_encoding import (
    IGNORE_INDEX,
    PromptFormat,
    encode_split,
    encode_text_split,
    fit_prompts,
    mix_in_replay,
    prompt_format,
)
from tunelab.data.sources import row_count
from tunelab.errors import TunelabError
from tunelab.evaluation.generation import generate_texts, generation_metrics, score_generative
from tunelab.inference.generator import load_generator
from tunelab.lifecycle import train_and_rescore
from tunelab.methods.apply import count_parameters, load_trainable_decoder
from tunelab.models.loading import (
    ModelSource,
    check_decoder,
    check_qlora_available,
    context_length,
    existing_model,
    load_tokenizer,
)
from tunelab.recipe import VIRTUAL_TOKEN_METHODS, Recipe
from tunelab.runs.artifacts import finish_run, load_or_score_baseline, with_retention, write_samples
from tunelab.sharding import fsdp_loading
from tunelab.trainer import (
    JsonlLogCallback,
    TunelabMixin,
    plan_selection,
    resolve_bf16,
    training_arguments,
)


class TunelabSFTTrainer(TunelabMixin, SFTTrainer):
    """TRL's SFTTrainer with tunelab's meter and training savings (TunelabMixin)."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """A loss-only evaluation step in one forward pass. HF's step asks `compute_loss` for the outputs as well,
        and TRL then runs the model a second time for the full logits (tokens × vocabulary: 1 GiB for SmolLM2 on
        1,800 tokens), which a loss-only evaluation throws away. The loss is the same."""
        if not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return loss.detach().mean(), None, None


def load_data(recipe: Recipe) -> GenerativeData:
    """sft: prompt → response rows in the recipe's format; pretrain: plain text rows."""
    return load_generative_data(recipe.data, plain_text=recipe.task == "pretrain")


def check_model(recipe: Recipe, data: GenerativeData, import_code: bool = True) -> ModelSource:
    """A decoder whose context holds model.max_length; sft rows whose prompt alone fills model.max_length are
    refused, or left out of `data` with data.drop_long."""
    source = existing_model(recipe.model.name)
    if recipe.method.name == "qlora":
        check_qlora_available()
    if source.origin == "hub":
        return source
    check_decoder(source, recipe.model.name, recipe.task, "use e.g. smollm2-135m, or task seq2seq for encoder models")
    check_context_length(AutoConfig.from_pretrained(source.location), recipe)
    if recipe.task == "sft":
        fmt = prompt_format(load_tokenizer(source.location), recipe.data.chat_template, data.format,
                            recipe.model.name)
        data.train = fit_prompts(fmt, data.train, recipe.model.max_length, "train", recipe.data.drop_long)
        data.eval = fit_prompts(fmt, data.eval, recipe.model.max_length, "eval", recipe.data.drop_long)
        if data.validation is not None:
            data.validation = fit_prompts(fmt, data.validation, recipe.model.max_length, "validation",
                                          recipe.data.drop_long)
    return source


def run(recipe: Recipe, data: GenerativeData, source: ModelSource, run_dir: Path, resume: bool = False) -> dict:
    """Fine-tune a decoder on prompt → response rows (task sft) or raw text (task pretrain); return metrics."""
    set_seed(recipe.train.seed)
    bf16 = resolve_bf16(recipe.train.precision)
    tokenizer = load_tokenizer(source.location)
    model = load_trainable_decoder(source.location, recipe.method, bf16, fsdp_loading(recipe.train.distributed))
    fmt = prompt_format(tokenizer, recipe.data.chat_template, data.format, recipe.model.name) \
        if recipe.task == "sft" else None
    params = count_parameters(model)
    selection = plan_selection(data, recipe.eval)
    # A stream has no sampler to shuffle it: its order comes from the buffer, drawn from the training seed.
    train = shuffle_stream(data.train, recipe.train.seed) if recipe.data.streaming else data.train
    train_rows, eval_rows = encode(recipe, train, tokenizer, fmt), encode(recipe, data.eval, tokenizer, fmt)
    if data.replay is not None:  # general text against forgetting; pretrain's blocks are cut after mixing
        train_rows = mix_in_replay(train_rows, data.replay, tokenizer, recipe.model.max_length if fmt else None)
    epoch_rows = None if selection.rows is None else encode(recipe, selection.rows, tokenizer, fmt)
    replayed = f" + {len(data.replay)} replay rows" if data.replay is not None else ""
    say(f"tunelab: {params}; {row_count(data.train) or 'streamed'} train rows{replayed}, {len(data.eval)} eval rows "
        f"({data.eval_split})")

    trainer = TunelabSFTTrainer(
        model=model,
        args=training_arguments(recipe.train, recipe.eval, run_dir, bf16, args_class=SFTConfig,
                                selection=selection, **sft_options(recipe)),
        train_dataset=train_rows,
        eval_dataset=epoch_rows,
        processing_class=tokenizer,
        filler_row=filler_row(recipe, train_rows),
        callbacks=[JsonlLogCallback(run_dir / "log.jsonl")],
    )
    samples = data.eval.select(range(min(recipe.eval.generate.num_samples, len(data.eval)))) if fmt else None

    def score() -> dict:
        return score_generative(trainer, eval_rows, samples, lambda rows: generate_answers(
            trainer.model, tokenizer, fmt, rows, recipe, bf16))

    score = with_retention(score, recipe, trainer, tokenizer, bf16)
    # Before: the model with the method applied but untrained (LoRA/IA3 start as the identity, so this is the
    # base model; prompt/prefix tuning start from random virtual tokens).
    before = load_or_score_baseline(run_dir, score)
    say(f"tunelab: before training: {summary(before)}")
    metrics = train_and_rescore(trainer, score, before, recipe, data, run_dir, resume, params=params, bf16=bf16,
                                selected_on=selection.selected_on)
    extra = write_samples(run_dir, [sample_prompt(row, fmt) for row in samples], samples["response"], before,
                          metrics["after"]) if samples is not None else []
    metrics = {
        **metrics,
        "shots": recipe.data.shots,
        "data_format": data.format,
        "chat_template": fmt.uses_chat_template if fmt else None,
        "packing": recipe.train.packing or recipe.task == "pretrain",
        "padding_free": recipe.task == "sft" and uses_padding_free(recipe),
        "streaming": recipe.data.streaming,  # train_rows is then null: train_loop_samples counts what trained
    }
    return finish_run(run_dir, recipe, metrics, f"tunelab run: {recipe.name}", extra_sections=extra)


def score_finished_run(run_dir: Path, recipe: Recipe) -> dict | None:
    """An sft run's saved model scored on `recipe`'s generation samples as the run scored its own (exact match,
    ROUGE-L, the per-row record; same settings and precision), or None for pretrain (`tunelab tune` scores two
    trials' models on the reported split so, without training them again)."""
    if recipe.task != "sft" or not recipe.eval.generate.num_samples:
        return None
    generator = load_generator(run_dir)
    data = load_data(recipe)
    samples = data.eval.select(range(min(recipe.eval.generate.num_samples, len(data.eval))))
    answers = generate_answers(generator.model, generator.tokenizer, generator.prompt, samples, recipe,
                               resolve_bf16(recipe.train.precision))
    return generation_metrics(answers, samples["response"])


def filler_row(recipe: Recipe, train_rows) -> dict | None:
    """A real row's tokens with no token to predict, for TunelabMixin to fill the short batch of N processes (the
    loss sums token losses over the step's counted tokens, so it adds nothing). None where the training order is
    not length-grouped rows (packing, pretrain's blocks, a random order): those keep the Trainer's own order."""
    if recipe.task != "sft" or recipe.train.packing or not recipe.train.group_by_length:
        return None
    row = train_rows[0]
    return {**row, "labels": [IGNORE_INDEX] * len(row["labels"])}


def check_context_length(config, recipe: Recipe) -> None:
    """Refuse a block/sequence length beyond what the model's position embeddings cover."""
    limit = context_length(config)
    if limit is not None and recipe.model.max_length > limit:
        raise TunelabError(f"model.max_length {recipe.model.max_length} is longer than the model's context of "
                           f"{limit} tokens; set model.max_length to {limit} or less")


def encode(recipe: Recipe, rows, tokenizer, fmt: PromptFormat | None):
    """Token ids and labels of some rows (raw text for pretrain)."""
    if fmt is None:
        return encode_text_split(tokenizer, rows)
    return encode_split(fmt, rows, recipe.train.completion_only_loss, recipe.model.max_length)


def sft_options(recipe: Recipe) -> dict:
    """SFTConfig options: sequence length, packing, loss-only evaluation.

    pretrain chunks the concatenated texts into max_length blocks (TRL's "wrapped" packing), train and eval alike,
    so perplexity is measured on the same kind of blocks the model trains on. sft with packing uses best-fit
    decreasing packing without padding: rows stay whole and position ids restart at each row. (Padding-free
    batches are scored at most a training batch at a time unless their rows attend apart: see TunelabMixin.)
    """
    # prediction_loss_only: evaluation needs the loss, not every token's logits over the vocabulary (GiBs).
    if recipe.task == "pretrain":
        return {"max_length": recipe.model.max_length, "packing": True, "packing_strategy": "wrapped",
                "eval_packing": True, "padding_free": False, "prediction_loss_only": True}
    if recipe.train.packing:
        return {"max_length": recipe.model.max_length, "packing": True, "packing_strategy": "bfd",
                "eval_packing": False, "prediction_loss_only": True}
    # Padding-free without packing: each batch's rows concatenated, position ids restarting per row. The rows are
    # already cut to max_length by encode_example (TRL refuses a max_length it would not enforce here).
    padding_free = uses_padding_free(recipe)
    return {"max_length": None if padding_free else recipe.model.max_length, "packing": False,
            "padding_free": padding_free, "prediction_loss_only": True}


def uses_padding_free(recipe: Recipe) -> bool:
    """Whether an sft run's batches are concatenated rows without padding (packing always is)."""
    return recipe.train.packing or (recipe.train.padding_free and recipe.method.name not in VIRTUAL_TOKEN_METHODS)


def generate_answers(model, tokenizer, fmt: PromptFormat, rows, recipe: Recipe, bf16: bool) -> list[str]:
    """The model's answers to the prompts of `rows`."""
    prompts = [fmt.prompt_text(row) for row in rows]
    return generate_texts(model, tokenizer, prompts, recipe.eval.generate, bf16,
                          add_special_tokens=not fmt.uses_chat_template)


def sample_prompt(row: dict, fmt: PromptFormat) -> str:
    """The prompt as samples.jsonl shows it: the user's last turn in chat mode, else the plain prompt."""
    return row["messages"][-2]["content"] if fmt.uses_chat_template else row["prompt"]


def summary(scores: dict) -> str:
    """'loss 2.31, perplexity 10.1, exact_match 0.12, …' for the console."""
    return ", ".join(f"{key} {value:.4g}" for key, value in scores.items() if isinstance(value, float))
