"""Shared training plumbing for every stage: precision, HF TrainingArguments from the recipe, logging, resume."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from tunelab.errors import TunelabError
from tunelab.recipe import EvalConfig, TrainConfig
from tunelab.runs.folder import append_jsonl

CHECKPOINTS = "checkpoints"


def bf16_supported() -> bool:
    """Whether bf16 autocast runs natively here (CUDA with bf16, or a CPU with AVX-512 bf16 / AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_bf16(precision: str) -> bool:
    """Turn `train.precision` into a yes/no for bf16 autocast."""
    if precision == "fp32":
        return False
    supported = bf16_supported()
    if precision == "bf16" and not supported:
        raise TunelabError("train.precision is bf16 but this machine cannot run bf16 natively; use auto or fp32")
    return supported


def training_arguments(train: TrainConfig, evaluation: EvalConfig, run_dir: Path, bf16: bool) -> TrainingArguments:
    """HF TrainingArguments for a recipe: evaluate and checkpoint each epoch (or N steps), keep the best."""
    every_steps = train.checkpoint_every is not None
    strategy = "steps" if every_steps else "epoch"
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=evaluation.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        bf16=bf16,
        seed=train.seed,
        data_seed=train.seed,
        eval_strategy=strategy,
        save_strategy=strategy,
        eval_steps=train.checkpoint_every,
        save_steps=train.checkpoint_every,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model=evaluation.best_metric,
        greater_is_better=evaluation.best_metric != "loss",
        logging_steps=train.logging_steps,
        logging_first_step=True,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint of an interrupted run, if any."""
    folder = run_dir / CHECKPOINTS
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


class JsonlLogCallback(TrainerCallback):
    """Append every Trainer log event (loss, lr, eval metrics) to the run's log.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Write one line per log event, stamped with time, step and epoch."""
        if logs:
            append_jsonl(self.path, {"time": round(time.time(), 3), "step": state.global_step,
                                     "epoch": round(state.epoch or 0.0, 4), **logs})


def history_from(log_history: list[dict]) -> list[dict]:
    """The Trainer's log history without its final summary line."""
    return [entry for entry in log_history if "train_runtime" not in entry]
