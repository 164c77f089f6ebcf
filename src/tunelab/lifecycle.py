"""The tail of a run that every Trainer-based stage shares, once it has built its data, model, trainer and its way
to score the eval split, and has scored the baseline: train (from the last complete checkpoint when resuming), score
again with the model that won (the checkpoint the validation split picked, else the last one), save it, and gather
what metrics.json holds for every task. Each stage still reads top to bottom — build, baseline,
`train_and_rescore`, its own extras (predictions, samples, a judge), `finish_run` — and keeps only what is its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tunelab.data.sources import row_count
from tunelab.recipe import Recipe
from tunelab.runs.folder import MODEL_DIR
from tunelab.trainer import last_checkpoint, save_model, training_summary


def train_and_rescore(trainer, score: Callable[[], dict], before: dict, recipe: Recipe, data, run_dir: Path,
                      resume: bool, *, params, bf16: bool, selected_on: str | None = None,
                      train_rows: int | None = None, eval_rows: int | None = None,
                      save: Callable[[Path], None] | None = None) -> dict:
    """Train, score the eval split again, save the model into the run folder (with `save`, else the trainer's own
    save); return metrics.json's shared part: before, after, the training summary and, for tasks that take
    data.replay, how many replay rows trained. `train_rows`/`eval_rows` default to the data's splits (a streamed train
    split has no count: None)."""
    result = trainer.train(resume_from_checkpoint=last_checkpoint(run_dir) if resume else None)
    after = score()
    (save or (lambda target: save_model(trainer, target)))(run_dir / MODEL_DIR)
    metrics = {"before": before, "after": after, **training_summary(
        trainer, result, params, bf16, train_rows=row_count(data.train) if train_rows is None else train_rows,
        eval_rows=len(data.eval) if eval_rows is None else eval_rows, eval_split=data.eval_split,
        model_name=recipe.model.name, selected_on=selected_on)}
    if recipe.entry.replay:
        replay = getattr(data, "replay", None)
        metrics["replay_rows"] = len(replay) if replay is not None else 0
    return metrics
