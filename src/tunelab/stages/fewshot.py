"""Few-shot classification, SetFit-style: load data → load encoder → score before → tune the encoder on
contrastive pairs → fit the head → score after → write run.

From the k examples per class, SetFit draws pairs: same label (positive) and different label (negative),
`fewshot.pairs_per_example` of each per example and epoch, and tunes the whole sentence encoder so that classes
form clusters (`fewshot.loss`: cosine pulls the pairs' cosine similarity to 1 / 0, contrastive pushes negatives
only until they are a margin apart). A logistic-regression head is then fit on the tuned embeddings of the
same k examples.

"Before" is the same head fit on the *untrained* encoder's embeddings of the same examples: the honest baseline,
so the gain shown is what the contrastive tuning adds (not what any head on a pretrained encoder gets).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

from tunelab.console import say
from tunelab.data.labelled import LabelledData, load_labelled_data
from tunelab.evaluation.classification import classification_metrics
from tunelab.evaluation.uncertainty import classification_rows
from tunelab.methods.apply import count_parameters
from tunelab.models.loading import ModelSource, check_encoder, existing_model
from tunelab.models.sentence_encoder import head_parameter_count, load_setfit_model, setfit_probabilities
from tunelab.recipe import Recipe
from tunelab.runs.artifacts import finish_run, load_or_score_baseline, save_folder_atomically, write_predictions
from tunelab.runs.folder import CHECKPOINTS
from tunelab.trainer import JsonlLogCallback, history_from, show_tunelab_progress


def load_data(recipe: Recipe) -> LabelledData:
    """The labelled rows (data.shots of each label to train on)."""
    return load_labelled_data(recipe.data)


def check_model(recipe: Recipe, data: LabelledData, import_code: bool = True) -> ModelSource:
    """The model exists and is a sentence encoder."""
    source = existing_model(recipe.model.name)
    check_encoder(source, f"task fewshot tunes a sentence encoder, but '{recipe.model.name}' is a decoder; use an "
                          f"encoder (minilm, mpnet-base) or task: classify")
    return source


def run(recipe: Recipe, data: LabelledData, source: ModelSource, run_dir: Path,
                resume: bool = False) -> dict:
    """Train a SetFit-style few-shot classifier as the recipe says; write the run folder and return metrics.json's
    content. There are no checkpoints: a resumed run trains again from the start (it takes minutes)."""
    from setfit import Trainer

    set_seed(recipe.train.seed)
    model = load_setfit_model(source.location, data.labels, recipe.model.max_length, recipe.fewshot.head_c,
                              recipe.train.seed)
    texts, gold = list(data.train["text"]), list(data.train["label"])
    pairs, steps = pair_budget(recipe, len(texts))
    trainer = Trainer(model=model, args=setfit_arguments(recipe, run_dir, steps),
                      callbacks=[JsonlLogCallback(run_dir / "log.jsonl")])
    trainer.st_trainer.args.dataloader_pin_memory = torch.cuda.is_available()  # else torch warns on every epoch
    show_tunelab_progress(trainer.st_trainer)
    body = count_parameters(model.model_body)
    say(f"tunelab: the whole encoder trains ({body.total:,} parameters), then a logistic-regression head is fit; "
          f"{len(texts)} train rows → {pairs} pairs, {len(data.eval)} eval rows ({data.eval_split})")

    def score() -> tuple[dict, np.ndarray]:
        probabilities = setfit_probabilities(model, data.eval["text"], len(data.labels), recipe.eval.batch_size)
        predicted = probabilities.argmax(-1)
        return {**classification_metrics(data.eval["label"], predicted, data.labels),
                **classification_rows(data.eval["label"], predicted)}, probabilities

    def score_untrained_encoder() -> dict:
        trainer.train_classifier(texts, gold)
        return score()[0]

    before = load_or_score_baseline(run_dir, score_untrained_encoder)
    say(f"tunelab: before (head on the untrained encoder): accuracy {before['accuracy']:.4f}, "
          f"macro-F1 {before['macro_f1']:.4f}")

    started = time.perf_counter()
    trainer.train_embeddings(texts, gold)  # fp32: see FewshotConfig (bf16 autocast measured to stall the loss)
    encoder_seconds = time.perf_counter() - started
    trainer.train_classifier(texts, gold)
    train_seconds = time.perf_counter() - started

    after, probabilities = score()
    save_folder_atomically(run_dir / "model", model.save_pretrained)
    write_predictions(run_dir, data, probabilities)
    head = head_parameter_count(model)
    metrics = {
        "before": before,
        "after": after,
        "history": [rename_loss(entry) for entry in history_from(trainer.st_trainer.state.log_history)],
        "trainable_params": body.trainable + head,
        "total_params": body.total + head,
        "trainable_percent": 100.0 * (body.trainable + head) / (body.total + head),
        "train_seconds": round(train_seconds, 3),
        "train_samples_per_second": round(pairs / encoder_seconds, 3),  # pairs through the encoder
        "pairs": pairs,
        "train_rows": len(data.train),
        "shots": recipe.data.shots,
        "eval_rows": len(data.eval),
        "eval_split": data.eval_split,
        "reported_on": data.eval_split,
        "selected_on": None,  # one training pass, then the head: no checkpoint to pick
        "labels": data.labels,
        "precision": "fp32",
    }
    return finish_run(run_dir, recipe, metrics, f"tunelab few-shot run: {recipe.name}", data.labels)


def pair_budget(recipe: Recipe, rows: int) -> tuple[int, int]:
    """(pairs the encoder trains on in all epochs, SetFit's max_steps or -1): a positive and a negative pair per
    row and iteration, cut to whole batches of fewshot.max_pairs when there are more."""
    pairs = round(2 * recipe.fewshot.pairs_per_example * rows * recipe.fewshot.epochs)
    cap = recipe.fewshot.max_pairs
    if cap is None or pairs <= cap:
        return pairs, -1
    steps = math.ceil(cap / recipe.train.batch_size)
    return steps * recipe.train.batch_size, steps


def setfit_arguments(recipe: Recipe, run_dir: Path, max_steps: int = -1):
    """SetFit's TrainingArguments from the recipe: the contrastive phase from `fewshot`, the rest from `train`."""
    from sentence_transformers.sentence_transformer import losses
    from setfit import TrainingArguments

    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS),
        batch_size=(recipe.train.batch_size, recipe.train.batch_size),
        num_epochs=(recipe.fewshot.epochs, 1),  # the second entry is for a differentiable head, unused here
        num_iterations=recipe.fewshot.pairs_per_example,
        max_steps=max_steps,
        loss={"cosine": losses.CosineSimilarityLoss, "contrastive": losses.ContrastiveLoss}[recipe.fewshot.loss],
        body_learning_rate=(recipe.fewshot.learning_rate, recipe.fewshot.learning_rate),
        l2_weight=recipe.train.weight_decay,
        warmup_proportion=recipe.train.warmup_ratio,
        max_length=recipe.model.max_length,
        seed=recipe.train.seed,
        logging_steps=recipe.train.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        show_progress_bar=False,
    )


def rename_loss(entry: dict) -> dict:
    """SetFit logs the contrastive loss as `embedding_loss`; the report plots `loss`."""
    return {("loss" if key == "embedding_loss" else key): value for key, value in entry.items()}
