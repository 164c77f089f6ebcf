"""Classification: load data → load model → apply method → score before → train → score after → write run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorWithPadding, set_seed

from tunelab.console import say
from tunelab.data.labelled import LabelledData, load_labelled_data
from tunelab.data.sft_encoding import IGNORE_INDEX
from tunelab.distributed import score_sharded
from tunelab.errors import TunelabError
from tunelab.evaluation.classification import classification_metrics, predict_probabilities
from tunelab.evaluation.in_context import score_in_context
from tunelab.evaluation.uncertainty import classification_rows
from tunelab.inference.trained import load_trained
from tunelab.lifecycle import train_and_rescore
from tunelab.methods.apply import apply_method, count_parameters
from tunelab.methods.freeze import method_callbacks, method_optimizer
from tunelab.models.loading import ModelSource, existing_model, is_decoder, load_classifier, load_tokenizer
from tunelab.recipe import Recipe
from tunelab.runs.artifacts import finish_run, load_or_score_baseline, write_predictions
from tunelab.runs.folder import run_folder
from tunelab.trainer import (
    JsonlLogCallback,
    TunelabTrainer,
    plan_selection,
    resolve_bf16,
    training_arguments,
)

IN_CONTEXT_FILE = "in_context.json"


def load_data(recipe: Recipe) -> LabelledData:
    """The labelled rows: train, eval and validation splits, with their labels checked."""
    return load_labelled_data(recipe.data)


def check_model(recipe: Recipe, data: LabelledData, import_code: bool = True) -> ModelSource:
    """The model exists; an in-context baseline prompts a decoder; an earlier classify run keeps its head only for
    the same labels (what would fail, or silently mislead, only after the baseline was scored)."""
    source = existing_model(recipe.model.name)
    if recipe.eval.in_context_shots and source.origin != "hub" and not is_decoder(source.location):
        raise TunelabError(f"eval.in_context_shots prompts a decoder, but '{recipe.model.name}' is an encoder; "
                           f"use a decoder (e.g. smollm2-135m) or drop eval.in_context_shots")
    earlier = run_folder(recipe.model.name) if source.origin == "run" else None
    if earlier and earlier.finished and earlier.recipe.task == "classify" and not recipe.model.new_head \
            and earlier.labels != data.labels:
        raise TunelabError(f"model.name '{recipe.model.name}' was trained on the labels {earlier.labels[:5]}, not this "
                           f"recipe's {data.labels[:5]}; set model.new_head: true to train a fresh head for the new "
                           f"labels")
    return source


def run(recipe: Recipe, data: LabelledData, source: ModelSource, run_dir: Path, resume: bool = False) -> dict:
    """Fine-tune a sequence classifier as the recipe says; write the run folder and return metrics.json's content."""
    set_seed(recipe.train.seed)
    bf16 = resolve_bf16(recipe.train.precision)
    tokenizer = load_tokenizer(source.location)
    model, fresh_modules = load_classifier(source.location, data.labels, tokenizer, recipe.model.new_head)
    # The loss comes from row_loss below, not from the model (whose forward takes **kwargs, from which the Trainer
    # would conclude that the model sums its loss over num_items_in_batch: it does not).
    model.accepts_loss_kwargs = False
    model = apply_method(model, recipe.method, fresh_modules, bf16=bf16)
    params = count_parameters(model)
    say(f"tunelab: {params}; {len(data.train)} train rows, {len(data.eval)} eval rows ({data.eval_split})")

    def probabilities_of(rows) -> np.ndarray:
        return predict_probabilities(model, tokenizer, rows["text"], rows["text_pair"] if "text_pair" in
                                     rows.column_names else None, recipe.eval.batch_size, recipe.model.max_length, bf16)

    def score(split) -> tuple[dict, np.ndarray]:
        probabilities = score_sharded(split, probabilities_of, np.concatenate)  # one block per process
        predicted = probabilities.argmax(-1)
        return {**classification_metrics(split["label"], predicted, data.labels),
                **classification_rows(split["label"], predicted)}, probabilities

    before = load_or_score_baseline(run_dir, lambda: score(data.eval)[0])
    say(f"tunelab: before training: accuracy {before['accuracy']:.4f}, macro-F1 {before['macro_f1']:.4f}")
    in_context = None
    if recipe.eval.in_context_shots:  # the decoder prompted with examples, no training: what prompting alone gets
        in_context = load_or_score_baseline(run_dir, lambda: score_in_context(
            source.location, data.train, data.eval, data.labels, recipe.eval.in_context_shots, recipe.data.seed),
            IN_CONTEXT_FILE)
        say(f"tunelab: in-context, {in_context['shots']} examples per class: accuracy {in_context['accuracy']:.4f}")

    selection = plan_selection(data, recipe.eval)
    train_rows = tokenize(data.train, tokenizer, recipe.model.max_length)
    trainer = TunelabTrainer(
        model=model,
        args=training_arguments(recipe.train, recipe.eval, run_dir, bf16, selection=selection),
        train_dataset=train_rows,
        eval_dataset=None if selection.rows is None else tokenize(selection.rows, tokenizer, recipe.model.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=lambda pred: scalar_metrics(pred, data.labels),
        compute_loss_func=row_loss,
        filler_row={**train_rows[0], "label": IGNORE_INDEX},  # a real row's tokens that count for nothing
        callbacks=[JsonlLogCallback(run_dir / "log.jsonl"), *method_callbacks(model, recipe.method)],
        optimizers=(method_optimizer(model, recipe.method, recipe.train), None),  # None: the Trainer's default
    )
    scored = {}

    def score_after() -> dict:
        after, scored["probabilities"] = score(data.eval)
        return after

    metrics = train_and_rescore(trainer, score_after, before, recipe, data, run_dir, resume, params=params, bf16=bf16,
                                selected_on=selection.selected_on)
    write_predictions(run_dir, data, scored["probabilities"])
    metrics = {
        **metrics,
        "shots": recipe.data.shots,
        "labels": data.labels,
        **({"in_context": in_context} if in_context else {}),
    }
    return finish_run(run_dir, recipe, metrics, f"tunelab run: {recipe.name}", data.labels)


def score_finished_run(run_dir: Path, recipe: Recipe) -> dict:
    """A finished run's saved model scored on `recipe`'s eval split: accuracy, macro-F1 and the per-row record for
    paired intervals (`tunelab tune` scores two trials' models on the reported split so, without training them
    again)."""
    trained = load_trained(run_dir)
    rows = load_labelled_data(recipe.data.model_copy(update={"labels": trained.labels})).eval
    pairs = list(rows["text_pair"]) if "text_pair" in rows.column_names else None
    predicted = trained.probabilities(list(rows["text"]), pairs).argmax(-1)
    return {**classification_metrics(rows["label"], predicted, trained.labels),
            **classification_rows(rows["label"], predicted), "labels": trained.labels}


def row_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Cross-entropy summed over the rows and divided by the rows of the whole optimizer step (every micro-batch
    of every process: the Trainer counts them), so that N processes and accumulated batches give one process's
    mean even when their shares differ; rows labelled -100 (the short batch's filler) count for nothing."""
    total = torch.nn.functional.cross_entropy(outputs.logits.float(), labels, ignore_index=IGNORE_INDEX,
                                              reduction="sum")
    if num_items_in_batch is None:  # evaluation: a mean over this batch's rows
        return total / labels.ne(IGNORE_INDEX).sum().clamp(min=1)
    return total / num_items_in_batch


def tokenize(split, tokenizer, max_length: int):
    """Token ids for each row (no padding: the collator pads each batch to its longest row)."""
    has_pair = "text_pair" in split.column_names

    def encode(batch: dict) -> dict:
        return tokenizer(batch["text"], batch["text_pair"] if has_pair else None, truncation=True,
                         max_length=max_length)

    return split.map(encode, batched=True, remove_columns=[c for c in split.column_names if c != "label"])


def scalar_metrics(prediction, labels: list[str]) -> dict:
    """Accuracy and macro-F1 for the Trainer's per-epoch evaluation."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    metrics = classification_metrics(prediction.label_ids, np.asarray(logits).argmax(-1), labels)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
