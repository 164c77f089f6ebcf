"""Shared training plumbing for every stage: precision, HF TrainingArguments from the recipe, logging, resume."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.optimizers import create_loraplus_optimizer
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import has_length

from tunelab.console import format_seconds, interactive, is_quiet
from tunelab.distributed import backend, current_world, per_process_batch
from tunelab.errors import TunelabError
from tunelab.models.precision import bf16_supported
from tunelab.recipe import MOVED_BASE_INITS, EvalConfig, TrainConfig
from tunelab.runs.folder import CHECKPOINTS, append_jsonl
from tunelab.runs.lineage import run_chain
from tunelab.runs.tracking import prepare_trackers
from tunelab.sharding import name_deepspeed_accelerator, strategy_name, training_options
from tunelab.speedups import speedups_of_this_run

TRAINING_ARGS_FILE = "training_args.bin"  # the pickle Trainer.save_model writes beside the weights
INITIAL_ADAPTER = "initial_adapter"  # in checkpoints/: a PiSSA/OLoRA adapter as initialised, to convert it at save
_callbacks_of_runs: list[list[TrainerCallback]] = []


@contextmanager
def callbacks_for_run(callbacks: list[TrainerCallback]) -> Iterator[None]:
    """Inside the block every trainer a stage builds also calls `callbacks` (`tunelab tune` reports each epoch's
    validation score to Optuna through one, and stops a trial Optuna prunes)."""
    _callbacks_of_runs.append(callbacks)
    try:
        yield
    finally:
        _callbacks_of_runs.remove(callbacks)


def resolve_bf16(precision: str) -> bool:
    """Turn `train.precision` into a yes/no for bf16 autocast."""
    if precision == "fp32":
        return False
    supported = bf16_supported()
    if precision == "bf16" and not supported:
        raise TunelabError("train.precision is bf16 but this machine cannot run bf16 natively; use auto or fp32")
    return supported


@dataclass
class Selection:
    """What the Trainer scores while it trains and whether that picks the checkpoint.

    The split a run reports never picks its checkpoint: picking the best of N epochs on the test rows and then
    reporting those rows' score flatters it (symptom example: best epoch 0.892, last epoch 0.877). A validation
    split (the source's, or data.validation_fraction of train) may pick; without one the last checkpoint is the
    result, and the reported split is scored during training only when eval.each_epoch asks for the curve.
    """

    rows: Any | None  # the raw rows scored after each epoch; None: no evaluation during training
    selected_on: str | None  # the split that picks the checkpoint; None: the last checkpoint is the result


def plan_selection(data, evaluation: EvalConfig, can_select: bool = True) -> Selection:
    """The Selection for a stage's data (which carries `eval`, `validation` and their split names). Stages whose
    final scores come from the Trainer's own eval set (dpo, kto) pass can_select=False: they keep the last one."""
    if can_select and data.validation is not None:
        return Selection(data.validation, data.validation_split if evaluation.select_best else None)
    return Selection(data.eval if evaluation.each_epoch else None, None)


def training_arguments(train: TrainConfig, evaluation: EvalConfig, run_dir: Path, bf16: bool,
                       args_class: type[TrainingArguments] = TrainingArguments, selection: Selection | None = None,
                       **extra) -> TrainingArguments:
    """HF TrainingArguments (or a subclass such as TRL's SFTConfig, with its `extra` options, which override
    these) for a recipe: checkpoint each epoch (or N steps); evaluate then only when `selection` has rows, and
    keep the best checkpoint only when it names a split to select on (else the last one)."""
    # Every Trainer stage builds its arguments here, so this is where trackers are pointed at the run folder.
    prepare_trackers(run_dir, train.report_to)
    every_steps = train.checkpoint_every is not None
    strategy = "steps" if every_steps else "epoch"
    evaluates = selection is not None and selection.rows is not None
    selects = evaluates and selection.selected_on is not None
    world = current_world()
    options = dict(
        output_dir=str(run_dir / CHECKPOINTS),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        # train.batch_size is the batch across all processes: each takes its share (check_plan refused a remainder)
        per_device_train_batch_size=per_process_batch(train.batch_size, train.grad_accum, world.size),
        per_device_eval_batch_size=evaluation.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        bf16=bf16,
        seed=train.seed,
        data_seed=train.seed,
        eval_strategy=strategy if evaluates else "no",
        save_strategy=strategy,
        eval_steps=train.checkpoint_every if evaluates else None,
        save_steps=train.checkpoint_every,
        save_total_limit=2,
        load_best_model_at_end=selects,
        metric_for_best_model=evaluation.best_metric if selects else None,
        greater_is_better=evaluation.best_metric != "loss" if selects else None,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        report_to=list(train.report_to) or "none",
        disable_tqdm=True,  # TunelabMixin shows tunelab's own bar instead
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=train.gradient_checkpointing,
        neftune_noise_alpha=train.neftune_noise_alpha,  # transformers' hook on the input embeddings while training
        # every parameter that trains takes part in each forward pass; True would cost an extra graph traversal
        **({"ddp_backend": backend(), "ddp_find_unused_parameters": False} if world.size > 1 else {}),
        **training_options(train.distributed),  # deepspeed's engine (fsdp: the model comes sharded)
    )
    return args_class(**{**options, **extra})  # a stage's extras win (e.g. no length grouping for pairs)


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest *complete* checkpoint of an interrupted run, if any.

    The Trainer writes trainer_state.json last, so a checkpoint without it was cut off while saving (a kill
    mid-save); transformers' get_last_checkpoint would pick it and then fail to resume.
    """
    complete = [path for path in (run_dir / CHECKPOINTS).glob("checkpoint-*")
                if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda path: int(path.name.split("-")[-1]))) if complete else None


class JsonlLogCallback(TrainerCallback):
    """Append every Trainer log event (loss, lr, eval metrics) to the run's log.jsonl, with the run's total steps
    so that a reader (the web board) can show progress and an ETA."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Write one line per log event, stamped with time, step and epoch (rank 0 only: one run, one log)."""
        if logs and state.is_world_process_zero:
            append_jsonl(self.path, {"time": round(time.time(), 3), "step": state.global_step,
                                     "epoch": round(state.epoch or 0.0, 4), "max_steps": state.max_steps, **logs})


def show_tunelab_progress(trainer) -> None:
    """tunelab's one-line training bar in place of HF's bars, or of the dict HF prints per log when its bars are
    off (PrinterCallback)."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(TrainingProgress())


class TrainingProgress(TrainerCallback):
    """One training bar (step, epoch, loss, learning rate, ETA) and one line per evaluation."""

    WIDTH = 24

    def __init__(self) -> None:
        self.start = 0.0
        self.first_step = 0
        self.loss: float | None = None
        self.lr: float | None = None
        self.printed_quarter = 0
        self.drawn = False

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock (a resumed run counts its ETA from where it resumed)."""
        self.start, self.first_step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Remember the latest training loss and learning rate for the bar."""
        logs = logs or {}
        self.loss = logs.get("loss", logs.get("embedding_loss", self.loss))  # SetFit's name for its loss
        self.lr = logs.get("learning_rate", self.lr)

    def on_step_end(self, args, state, control, **kwargs):
        """Redraw the bar (terminal) or print a plain line at each quarter of training (elsewhere)."""
        if is_quiet() or not state.max_steps:
            return
        if interactive():
            print("\r" + self.line(state) + "\033[K", end="", flush=True)  # K: clear what a longer line left
            self.drawn = True
            return
        quarter = 4 * state.global_step // state.max_steps
        if quarter > self.printed_quarter:
            self.printed_quarter = quarter
            print(self.line(state), flush=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """One line per evaluation during training."""
        if is_quiet() or not metrics:
            return
        self.end_bar()
        shown = ", ".join(f"{key.removeprefix('eval_')} {value:.4f}" for key, value in metrics.items()
                          if isinstance(value, float) and key.removeprefix("eval_") in EVAL_SHOWN)
        print(f"  evaluated at epoch {state.epoch or 0:.2f}: {shown}", flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        """Finish the bar's line."""
        self.end_bar()

    def end_bar(self) -> None:
        """Move off a redrawn bar so the next line starts clean."""
        if self.drawn:
            print(flush=True)
            self.drawn = False

    def line(self, state) -> str:
        """'  [#######-----] step 40/160 · epoch 2.5/10 · loss 0.412 · lr 2.1e-04 · 1m10s left'."""
        done = state.global_step / state.max_steps
        filled = int(done * self.WIDTH)
        elapsed = time.perf_counter() - self.start
        steps = state.global_step - self.first_step
        left = elapsed / steps * (state.max_steps - state.global_step) if steps else 0.0
        parts = [f"  [{'#' * filled}{'-' * (self.WIDTH - filled)}] step {state.global_step}/{state.max_steps}"]
        if state.num_train_epochs < sys.maxsize:  # a stream (data.streaming) has no epoch count: the Trainer's maxsize
            parts.append(f"epoch {state.epoch or 0:.1f}/{state.num_train_epochs:g}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.1e}")
        parts.append(f"{format_seconds(left)} left" if state.global_step < state.max_steps
                     else f"{format_seconds(elapsed)}")
        return " · ".join(parts)


EVAL_SHOWN = ("loss", "accuracy", "macro_f1", "rewards/accuracies", "rewards/margins")


def history_from(log_history: list[dict]) -> list[dict]:
    """The Trainer's log history without its final summary line."""
    return [entry for entry in log_history if "train_runtime" not in entry]


def batch_token_counts(inputs: dict) -> tuple[int, int, int]:
    """(rows, real tokens, padded tokens) of one batch: real tokens are those the attention mask keeps.

    A padding-free batch (one concatenated sequence, no attention mask) holds as many rows as its position ids
    restart at 0.
    """
    if isinstance(inputs, list):  # GRPO's trainer step gets raw prompt rows; their tokens are generated inside it
        return len(inputs), 0, 0
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        return 0, 0, 0
    mask = inputs.get("attention_mask")
    positions = inputs.get("position_ids")
    if mask is None and positions is not None:
        return int((positions == 0).sum()), input_ids.numel(), input_ids.numel()
    real = int(mask.sum()) if mask is not None else input_ids.numel()
    return int(input_ids.shape[0]), real, input_ids.numel()


class TrainingMeter(TrainerCallback):
    """What the training loop itself costs: its seconds without evaluation and checkpointing, rows and tokens.

    The Trainer's own `train_runtime` includes the per-epoch evaluation and checkpoint saving, so it understates
    training speed. Time is summed from training start (or the end of an evaluation / checkpoint save) to the
    end of each optimizer step. Counts cover this `train()` call only (a resumed run counts its second part).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.samples = 0
        self.tokens = 0
        self.padded_tokens = 0
        self._mark: float | None = None
        self._ddp: DistributedDataParallel | None = None
        self.communication_ns = 0  # DDP's gradient all-reduce, from the first bucket sent to the last received
        self.overlapped_ns = 0  # the part of it that ran while the backward pass still computed

    def watch(self, model) -> None:
        """Time DDP's gradient communication on every step, with DDP's own timers (sampled every iteration)."""
        if self._ddp is None and isinstance(model, DistributedDataParallel):
            model._set_ddp_runtime_logging_sample_rate(1)
            self._ddp = model

    def count_batch(self, inputs: dict) -> None:
        """Add one training micro-batch to the row and token counts."""
        rows, real, padded = batch_token_counts(inputs)
        self.samples += rows
        self.tokens += real
        self.padded_tokens += padded

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # queued GPU work belongs to the step that queued it
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock."""
        self._mark = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        """Add the time since the last mark: one optimizer step, with its data loading."""
        now = self._now()
        if self._mark is not None:
            self.seconds += now - self._mark
        self._mark = now
        if self._ddp is not None:  # the step's last micro-batch is the one whose gradients were all-reduced
            timings = self._ddp._get_ddp_logging_data()
            self.communication_ns += timings.get("backward_comm_time", 0)
            self.overlapped_ns += timings.get("backward_compute_comm_overlap_time", 0)

    def on_evaluate(self, args, state, control, **kwargs):
        """Restart the clock: the time since the last step went to evaluation, not training."""
        self._mark = self._now()

    def on_save(self, args, state, control, **kwargs):
        """Restart the clock: the time since the last step or evaluation went to saving a checkpoint."""
        self._mark = self._now()

    def summary(self) -> dict:
        """The meter's figures as metrics.json keys."""
        return {"train_loop_seconds": round(self.seconds, 3), "train_loop_samples": self.samples,
                "train_tokens": self.tokens, "train_padded_tokens": self.padded_tokens,
                "train_tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds else None,
                **({"communication_seconds": round(self.communication_ns / 1e9, 3),
                    "communication_exposed_seconds": round((self.communication_ns - self.overlapped_ns) / 1e9, 3)}
                   if self._ddp is not None else {})}


def unmark_evaluated_model(trainer: Trainer) -> None:
    """Let the Trainer wrap the model in DDP although it was evaluated before training (the "before" scores).

    The Trainer's evaluation prepares the bare model through accelerate, which marks it as prepared; train() then
    gets it back unwrapped, so no gradient was ever averaged: each process trained its own copy on its share of
    each batch (tiny Llama sft on 2 processes: step-1 grad norm 2.99 against 2.16 on one). One process: nothing."""
    if trainer.args.world_size > 1 and trainer.model_wrapped is trainer.model:
        vars(trainer.model).pop("_is_accelerate_prepared", None)


def drop_inference_engine(trainer: Trainer) -> None:
    """Let train() start DeepSpeed's training engine after a ZeRO-3 evaluation (the "before" scores): that
    evaluation left an inference engine in the Trainer's place for the wrapped model, which train() would keep,
    without an optimizer (its first backward pass fails). The weights stay partitioned as ZeRO-3 left them, and
    the training engine takes them as they are."""
    if trainer.is_deepspeed_enabled and trainer.deepspeed is not None and trainer.model_wrapped is not trainer.model:
        trainer.deepspeed = None
        trainer.model_wrapped = trainer.model
        trainer.accelerator._models.clear()


class MeteredMixin:
    """Gives a Trainer (HF's or a TRL subclass) a TrainingMeter (`.meter`) that sees every training batch, and
    evaluation in dataset order. The benchmark's plain ways use it as it is; tunelab's stages use TunelabMixin."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.meter = TrainingMeter()
        self.add_callback(self.meter)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Count the batch's rows and tokens, then run the usual forward and backward pass."""
        self.meter.count_batch(inputs)
        self.meter.watch(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def _get_eval_sampler(self, eval_dataset):
        """Evaluate in dataset order, whatever the training order. The Trainer's eval loss is a mean of per-batch
        means, so the length-grouped batches HF would also use for evaluation change the reported loss by the
        batching alone (SmolLM2 SFT: 2.45 grouped vs 2.32 in order, same model and rows)."""
        if eval_dataset is None or not has_length(eval_dataset) or self.args.world_size > 1:
            return super()._get_eval_sampler(eval_dataset)
        return SequentialSampler(eval_dataset)


class FilledBatches(Sampler[int]):
    """Another sampler's row order with its short last batch filled up to `batch_size` with `filler`, a row that
    adds nothing to the loss: N processes then split every batch of one process's order evenly (accelerate would
    otherwise fill the last one with rows from the epoch's start, which then count twice)."""

    def __init__(self, order: Sampler[int], batch_size: int, filler: int) -> None:
        self.order = order
        self.batch_size = batch_size
        self.filler = filler

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rows = list(self.order)
        yield from rows
        yield from [self.filler] * (-len(rows) % self.batch_size)


class TunelabMixin(MeteredMixin):
    """MeteredMixin plus the run's speed-ups (tunelab.speedups: TRL's fused LM head in CPU-sized tiles, LoRA in one
    pass, padding-free rows attending apart, cheaper dropout masks, batches of similar length over whole groups of
    batches, freed memory kept for reuse while training on a CPU); and tunelab's one-line training bar in place of
    HF's bars and printed dicts.

    `filler_row` (a tokenized row whose label is -100, for a loss that sums over counted rows) lets several
    processes split an epoch's short last batch exactly: it fills that batch up, adding nothing to the loss."""

    def __init__(self, *args, filler_row: dict | None = None, **kwargs) -> None:
        name_deepspeed_accelerator()
        super().__init__(*args, **kwargs)
        self.filler = None
        if filler_row is not None and self.args.world_size > 1 and has_length(self.train_dataset):
            self.filler = len(self.train_dataset)
            self.train_dataset = self.train_dataset.add_item(filler_row)
        self.speedups = speedups_of_this_run()
        rows_apart = self.speedups.fit(self)  # the run's speed-ups, fitted to this trainer's model
        if getattr(self, "padding_free", False) and not rows_apart:
            # A padding-free batch is one long sequence whose attention mask grows with the square of its tokens:
            # scoring 212 symptom rows took 63 s in batches of 64 against 34 s in batches of 8. Score as many rows
            # at once as a training step holds. (Rows attending apart cost the sum of their squares: any will do.)
            self.args.per_device_eval_batch_size = min(self.args.per_device_eval_batch_size,
                                                       self.args.train_batch_size * self.args.world_size)
        show_tunelab_progress(self)
        for callback in _callbacks_of_runs[-1] if _callbacks_of_runs else []:
            self.add_callback(callback)
        self.initial_adapter: Path | None = None
        if moves_base_weights(self.model):  # kept to convert the trained adapter against at save: save_model
            self.initial_adapter = Path(self.args.output_dir) / INITIAL_ADAPTER
            if self.args.should_save:
                self.model.save_pretrained(str(self.initial_adapter))

    def create_optimizer(self, model=None):
        """The Trainer's optimizer or, with LoRA+ (method.loraplus_lr_ratio, left on the model by apply_method),
        peft's: the same optimizer with the B matrices (and 1-D weights) at the ratio times the learning rate. An
        optimizer the stage passed in (method_optimizer's groups) is kept."""
        ratio = getattr(self.model, "loraplus_lr_ratio", None)
        if self.optimizer is not None or ratio is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, options = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = create_loraplus_optimizer(opt_model, optimizer_cls, loraplus_lr_ratio=ratio,
                                                   loraplus_weight_decay=self.args.weight_decay, **options)
        return self.optimizer

    def train(self, *args, **kwargs):
        """Train as the Trainer does (with freed memory kept in the heap for the next step: CPU, glibc)."""
        unmark_evaluated_model(self)
        drop_inference_engine(self)
        with self.speedups.while_training():
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """The Trainer's evaluation. Before training under DeepSpeed, transformers scores through a ZeRO-3
        inference engine (train() drops it again: see `drop_inference_engine`); ZeRO-2 has none, so it scores the
        whole weights every process still holds then, as under DDP."""
        if not self.is_deepspeed_enabled or self.deepspeed is not None or self.is_in_train \
                or self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return super().evaluate(*args, **kwargs)
        self.is_deepspeed_enabled = False
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.is_deepspeed_enabled = True

    def _get_train_sampler(self, train_dataset=None):
        """Length grouping (padded batches) with batches sorted over whole groups of batches, in random order (the
        batch_order speed-up; HF's LengthGroupedSampler without it). Padding-free batches have no padding to save,
        so they keep HF's sampler: sorting them would only make every epoch's batches alike (SmolLM2 SFT: eval loss
        2.188 with it against 2.173, same peak RSS)."""
        sampler = super()._get_train_sampler(train_dataset)
        if not isinstance(sampler, LengthGroupedSampler):
            return sampler
        # Under N processes accelerate deals each run of train_batch_size rows to the next rank, so batches of
        # batch × N rows (sorted over the real rows only) make every optimizer step hold the rows it holds on one
        # process; the filler then fills the short last batch up.
        step_rows = self.args.train_batch_size * self.args.world_size
        lengths = sampler.lengths if self.filler is None else sampler.lengths[:self.filler]
        padded = not getattr(self.args, "padding_free", False)
        order = self.speedups.batch_order(lengths, step_rows) if padded else None
        if order is None and self.filler is not None:  # HF's order in mega-batches of one process's step
            order = LengthGroupedSampler(step_rows * self.args.gradient_accumulation_steps, lengths=lengths)
        if order is None:
            return sampler
        return order if self.filler is None else FilledBatches(order, step_rows, self.filler)


class MeteredTrainer(MeteredMixin, Trainer):
    """The HF Trainer with a TrainingMeter (the benchmark's plain ways)."""


class TunelabTrainer(TunelabMixin, Trainer):
    """The HF Trainer as tunelab's stages train with it."""


def training_summary(trainer: MeteredMixin, result, params, bf16: bool, *, train_rows: int, eval_rows: int,
                     eval_split: str, model_name: str, selected_on: str | None = None) -> dict:
    """The metrics.json keys every Trainer-based stage writes: history, parameter counts, speed, precision, the
    row counts, the split reported and the one that picked the checkpoint (None: the last checkpoint), and the
    chain of run folders the starting model came from."""
    return {
        "history": history_from(trainer.state.log_history),
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": params.percent,
        "train_seconds": result.metrics["train_runtime"],
        "train_samples_per_second": result.metrics["train_samples_per_second"],
        **trainer.meter.summary(),  # training-loop time without evaluation and checkpointing, rows, tokens
        "precision": "bf16" if bf16 else "fp32",
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "eval_split": eval_split,
        "reported_on": eval_split,
        "selected_on": selected_on,
        "chain": run_chain(model_name),
        "world_size": trainer.args.world_size,
        "strategy": strategy_name(trainer),
        "global_batch_size": trainer.args.train_batch_size * trainer.args.world_size
        * trainer.args.gradient_accumulation_steps,
    }


def moves_base_weights(model: torch.nn.Module) -> bool:
    """Whether a peft adapter of `model` was initialised by moving part of each base weight into it (PiSSA, OLoRA)."""
    return any(str(getattr(config, "init_lora_weights", "")).startswith(MOVED_BASE_INITS)
               for config in getattr(model, "peft_config", {}).values())


def save_model(trainer: Trainer, target: Path) -> None:
    """Save weights (or the adapter) and tokenizer into `target` via a temporary folder, then rename."""
    staging = target.with_name(f".{target.name}.partial")
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    # Every rank calls it: under ZeRO-3/FSDP the full weights are gathered from all of them; the Trainer writes
    # on rank 0 only (the run folder's one writer).
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    # Trainer.save_model also pickles the TrainingArguments (training_args.bin); the resolved recipe.yaml already
    # records how the run trained, and a run folder holds no pickles (an export copies none).
    (staging / TRAINING_ARGS_FILE).unlink(missing_ok=True)
    initial = getattr(trainer, "initial_adapter", None)
    if initial is not None:
        # PiSSA/OLoRA moved part of each base weight into the adapter: save what training changed as the plain LoRA
        # adapter (rank 2r) it amounts to on the original base, which every loader applies as it is.
        trainer.model.save_pretrained(str(staging), path_initial_model_for_weight_conversion=str(initial))
    if not (staging / "config.json").is_file():  # an adapter: keep the model config (labels, base) beside it
        trainer.model.config.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
