"""Classification: load data → load model → apply method → score before → train → score after → write run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from transformers import DataCollatorWithPadding, Trainer, set_seed

from tunelab.data.labelled import LabelledData
from tunelab.evaluation.classification import classification_metrics, predict_probabilities
from tunelab.methods.apply import apply_method, count_parameters
from tunelab.models.loading import ModelSource, load_classifier, load_tokenizer
from tunelab.recipe import Recipe
from tunelab.runs.folder import METRICS_FILE, write_json_atomic, write_jsonl_atomic
from tunelab.runs.report import write_report
from tunelab.trainer import (
    CHECKPOINTS,
    JsonlLogCallback,
    history_from,
    last_checkpoint,
    resolve_bf16,
    training_arguments,
)

BASELINE_FILE = "baseline.json"


def run_classification(recipe: Recipe, data: LabelledData, source: ModelSource, run_dir: Path,
                       resume: bool = False) -> dict:
    """Fine-tune a sequence classifier as the recipe says; write the run folder and return metrics.json's content."""
    set_seed(recipe.train.seed)
    bf16 = resolve_bf16(recipe.train.precision)
    tokenizer = load_tokenizer(source.location)
    model, fresh_modules = load_classifier(source.location, data.labels, tokenizer)
    model = apply_method(model, recipe.method, fresh_modules)
    params = count_parameters(model)
    print(f"tunelab: {params}; {len(data.train)} train rows, {len(data.eval)} eval rows ({data.eval_split})")

    def score(split) -> tuple[dict, np.ndarray]:
        probabilities = predict_probabilities(model, tokenizer, split["text"], split["text_pair"]
                                              if "text_pair" in split.column_names else None,
                                              recipe.eval.batch_size, recipe.model.max_length, bf16)
        return classification_metrics(split["label"], probabilities.argmax(-1), data.labels), probabilities

    before = load_or_score_baseline(run_dir, lambda: score(data.eval)[0])
    print(f"tunelab: before training: accuracy {before['accuracy']:.4f}, macro-F1 {before['macro_f1']:.4f}")

    trainer = Trainer(
        model=model,
        args=training_arguments(recipe.train, recipe.eval, run_dir, bf16),
        train_dataset=tokenize(data.train, tokenizer, recipe.model.max_length),
        eval_dataset=tokenize(data.eval, tokenizer, recipe.model.max_length),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=lambda pred: scalar_metrics(pred, data.labels),
        callbacks=[JsonlLogCallback(run_dir / "log.jsonl")],
    )
    result = trainer.train(resume_from_checkpoint=last_checkpoint(run_dir) if resume else None)

    after, probabilities = score(data.eval)  # the best checkpoint is loaded at the end of training
    print(f"tunelab: after training: accuracy {after['accuracy']:.4f}, macro-F1 {after['macro_f1']:.4f}")
    save_model(trainer, run_dir / "model")
    write_predictions(run_dir, data, probabilities)
    metrics = {
        "before": before,
        "after": after,
        "history": history_from(trainer.state.log_history),
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": params.percent,
        "train_seconds": result.metrics["train_runtime"],
        "train_samples_per_second": result.metrics["train_samples_per_second"],
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "eval_split": data.eval_split,
        "labels": data.labels,
        "precision": "bf16" if bf16 else "fp32",
    }
    write_report(run_dir, f"tunelab run: {recipe.name}", metrics, recipe.to_yaml(), data.labels)
    write_json_atomic(run_dir / METRICS_FILE, metrics)  # written last: its presence marks a finished run
    if not recipe.output.keep_checkpoints:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    return metrics


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


def load_or_score_baseline(run_dir: Path, score) -> dict:
    """Score the untrained model once; a resumed run reuses the score its first attempt saved."""
    path = run_dir / BASELINE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    before = score()
    write_json_atomic(path, before)
    return before


def save_model(trainer: Trainer, target: Path) -> None:
    """Save weights (or the adapter) and tokenizer into `target` via a temporary folder, then rename."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    if not (staging / "config.json").is_file():  # an adapter: keep the label names beside it
        trainer.model.config.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def write_predictions(run_dir: Path, data: LabelledData, probabilities: np.ndarray) -> None:
    """predictions.jsonl: text, gold, predicted label and its probability, for every eval row."""
    rows = []
    for i, row in enumerate(data.eval):
        best = int(probabilities[i].argmax())
        rows.append({"text": row["text"], **({"text_pair": row["text_pair"]} if "text_pair" in row else {}),
                     "gold": data.labels[row["label"]], "predicted": data.labels[best],
                     "probability": round(float(probabilities[i, best]), 6)})
    write_jsonl_atomic(run_dir / "predictions.jsonl", rows)
