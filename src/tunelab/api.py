"""The library entry points the CLI (and later the UI) call: train, validate, evaluate, predict."""

from __future__ import annotations

from pathlib import Path

from tunelab.data.labelled import load_eval_split, load_labelled_data
from tunelab.evaluation.classification import classification_metrics, predict_probabilities
from tunelab.models.loading import check_model_exists, resolve_model
from tunelab.models.trained import load_trained_classifier
from tunelab.recipe import DataConfig, Recipe
from tunelab.runs.folder import open_run_folder
from tunelab.stages.classify import run_classification


def check_recipe(recipe: Recipe):
    """Everything that can be checked before a run folder exists: data, labels, model. Returns (data, model)."""
    data = load_labelled_data(recipe.data)
    source = resolve_model(recipe.model.name)
    check_model_exists(source)
    return data, source


def train(recipe: Recipe, output: str | None = None, resume: bool = False) -> tuple[Path, dict]:
    """Validate, score the baseline, train, score again and write the run folder; return (run folder, metrics)."""
    data, source = check_recipe(recipe)
    run_dir = open_run_folder(recipe, output, resume)
    print(f"tunelab: run folder {run_dir}")
    return run_dir, run_classification(recipe, data, source, run_dir, resume)


def evaluate(model_path: str, data: DataConfig, split: str) -> dict:
    """Score a trained classifier (run folder or model folder) on one split of any labelled source."""
    trained = load_trained_classifier(model_path)
    rows = load_eval_split(data, split, trained.labels)
    max_length = (trained.recipe or {}).get("model", {}).get("max_length", 256)
    probabilities = predict_probabilities(trained.model, trained.tokenizer, rows["text"],
                                          rows["text_pair"] if "text_pair" in rows.column_names else None,
                                          max_length=max_length)
    return classification_metrics(rows["label"], probabilities.argmax(-1), trained.labels)


def predict(model_path: str, texts: list[str], top_k: int = 1) -> list[dict]:
    """Labels with probabilities for each text, best first."""
    trained = load_trained_classifier(model_path)
    max_length = (trained.recipe or {}).get("model", {}).get("max_length", 256)
    probabilities = predict_probabilities(trained.model, trained.tokenizer, texts, max_length=max_length)
    results = []
    for text, row in zip(texts, probabilities, strict=True):
        best = row.argsort()[::-1][:top_k]
        results.append({"text": text, "label": trained.labels[best[0]], "probability": round(float(row[best[0]]), 6),
                        **({"top": [{"label": trained.labels[i], "probability": round(float(row[i]), 6)}
                                    for i in best]} if top_k > 1 else {})})
    return results
