"""Encoder-decoder fine-tuning: input text → target text (T5/BART, or a BERT2BERT model warm-started from an encoder).

load data → load or build the encoder-decoder → apply method → score before (loss, perplexity, generations) →
train → score after → write the run folder.
"""

from __future__ import annotations

from pathlib import Path

from peft import TaskType
from transformers import (
    DataCollatorForSeq2Seq,
    set_seed,
)

from tunelab.console import say
from tunelab.data.generative import GenerativeData, load_generative_data
from tunelab.errors import TunelabError
from tunelab.evaluation.generation import generate_texts, score_generative
from tunelab.lifecycle import train_and_rescore
from tunelab.methods.apply import apply_method, count_parameters
from tunelab.models.loading import ModelSource, check_encoder, existing_model, load_seq2seq, load_tokenizer
from tunelab.recipe import Recipe
from tunelab.runs.artifacts import finish_run, load_or_score_baseline, write_samples
from tunelab.trainer import (
    JsonlLogCallback,
    TunelabTrainer,
    plan_selection,
    resolve_bf16,
    training_arguments,
)


def encode_pairs(split, tokenizer, decoder_start: int | None, max_length: int):
    """input_ids from the prompt, labels from the response (without a leading decoder-start token)."""

    def encode(batch: dict) -> dict:
        inputs = tokenizer(batch["prompt"], truncation=True, max_length=max_length)
        targets = tokenizer(text_target=batch["response"], truncation=True, max_length=max_length)["input_ids"]
        labels = [ids[1:] if ids and ids[0] == decoder_start else ids for ids in targets]
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}

    return split.map(encode, batched=True, remove_columns=split.column_names)


def load_data(recipe: Recipe) -> GenerativeData:
    """Input → target rows in the recipe's format."""
    return load_generative_data(recipe.data)


def check_model(recipe: Recipe, data: GenerativeData, import_code: bool = True) -> ModelSource:
    """An encoder-decoder, or an encoder to warm-start one from: not a decoder."""
    source = existing_model(recipe.model.name)
    check_encoder(source, f"task seq2seq needs an encoder-decoder (T5, BART) or an encoder to warm-start one from "
                          f"(e.g. minilm), but '{recipe.model.name}' is a decoder; use task sft for decoders")
    return source


def run(recipe: Recipe, data: GenerativeData, source: ModelSource, run_dir: Path, resume: bool = False) -> dict:
    """Fine-tune an encoder-decoder on prompt → response rows; write the run folder and return metrics."""
    if data.format == "messages":
        raise TunelabError("task seq2seq maps one input text to one target; chat messages need task sft")
    set_seed(recipe.train.seed)
    bf16 = resolve_bf16(recipe.train.precision)
    tokenizer = load_tokenizer(source.location)
    model = load_seq2seq(source.location, tokenizer)
    model = apply_method(model, recipe.method, [], TaskType.SEQ_2_SEQ_LM, bf16)
    params = count_parameters(model)
    start = model.config.decoder_start_token_id
    say(f"tunelab: {params}; {len(data.train)} train rows, {len(data.eval)} eval rows ({data.eval_split})")
    selection = plan_selection(data, recipe.eval)
    reported = encode_pairs(data.eval, tokenizer, start, recipe.model.max_length)
    trainer = TunelabTrainer(
        model=model,
        args=training_arguments(recipe.train, recipe.eval, run_dir, bf16, prediction_loss_only=True,
                                selection=selection),
        train_dataset=encode_pairs(data.train, tokenizer, start, recipe.model.max_length),
        eval_dataset=None if selection.rows is None else encode_pairs(selection.rows, tokenizer, start,
                                                                      recipe.model.max_length),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        processing_class=tokenizer,
        callbacks=[JsonlLogCallback(run_dir / "log.jsonl")],
    )
    samples = data.eval.select(range(min(recipe.eval.generate.num_samples, len(data.eval))))

    def score() -> dict:
        return score_generative(trainer, reported, samples, lambda rows: generate_texts(
            trainer.model, tokenizer, rows["prompt"], recipe.eval.generate, bf16))

    before = load_or_score_baseline(run_dir, score)
    say(f"tunelab: before training: loss {before['loss']:.4f}, exact match {before.get('exact_match', 0):.4f}")
    metrics = train_and_rescore(trainer, score, before, recipe, data, run_dir, resume, params=params, bf16=bf16,
                                selected_on=selection.selected_on)
    extra = write_samples(run_dir, samples["prompt"], samples["response"], before, metrics["after"])
    return finish_run(run_dir, recipe, metrics, f"tunelab run: {recipe.name}", extra_sections=extra)
