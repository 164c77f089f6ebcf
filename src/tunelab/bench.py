"""Speed and memory benchmark: each example job trained three ways, side by side, in one invocation.

Ways (each in its own fresh subprocess, so peak memory is per way):
  tutorial      the tutorial's recipe as written: plain transformers (+peft) Trainer, padding='max_length' to the
                recipe's model.max_length, batch 1 x gradient accumulation 4, fp32;
  hand-written  the best a competent user writes without tunelab: transformers (+peft) Trainer (TRL's SFTTrainer for
                SFT), dynamic padding, batch 16 (SFT: 4), bf16 where the CPU/GPU runs it natively, no length
                grouping;
  tunelab       tunelab.api.train on the example recipe (its defaults), capped to the same number of samples.

All three train on the same rows with the example's learning rate, epochs, schedule, warm-up, weight decay, seed
and LoRA config, then score the same eval split. Training speed counts the training loop only (evaluation and
checkpoint saving excluded, see tunelab.trainer.TrainingMeter, which every way uses).

Run: python -m tunelab.bench [--jobs minilm-full,minilm-lora,smollm2-lora-tweets,smollm2-lora-sft] [--samples N]
     [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.tasks import TASKS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WAYS = ("tutorial", "hand-written", "tunelab")
CONVENTION = ("model FLOPs per real (non-padding) token: 6·N for full fine-tuning, 4·N for adapter methods (frozen "
              "base: forward + input-gradient backward), N = non-embedding parameters; attention-score FLOPs and "
              "padding are not counted. MFU = achieved model FLOP/s ÷ the matmul peak measured at start-up.")
FLOPS_PER_PARAM = {"full": 6, "lora": 4, "dora": 4, "qlora": 4, "ia3": 4, "prompt": 4}


@dataclass(frozen=True)
class Job:
    """One benchmark job: an example recipe and what it trains."""

    name: str
    recipe: str  # file name under examples/
    description: str
    overrides: tuple[str, ...] = ()  # recipe overrides (key=value) the benchmark trains with


JOBS = {job.name: job for job in [
    Job("minilm-full", "symptom_to_diagnosis.yaml", "MiniLM full fine-tuning on symptom_to_diagnosis"),
    Job("minilm-lora", "symptom_to_diagnosis_lora.yaml", "MiniLM LoRA on symptom_to_diagnosis"),
    Job("smollm2-lora-tweets", "tweet_sentiment.yaml", "SmolLM2-135M LoRA classification on tweets (1000 rows)"),
    # The setting the LLaMA-Factory and plain-TRL figures in the README were measured in: rows cut at 512 tokens,
    # batch 4; no generation scoring (speed is the point; loss on the eval split shows the quality). The one seed
    # task whose prompt alone is longer than 512 tokens is left out (the plain ways train it with every label
    # masked: nothing to learn from it either).
    Job("smollm2-lora-sft", "instructions_sft.yaml", "SmolLM2-135M LoRA SFT on the 175 self_instruct seed tasks",
        ("model.max_length=512", "data.drop_long=true", "train.gradient_checkpointing=false",
         "eval.generate.num_samples=0")),
]}


@dataclass(frozen=True)
class WaySettings:
    """How a plain-transformers way batches, pads and casts."""

    batch_size: int
    grad_accum: int
    pad_to_max_length: bool
    bf16: bool


# ---------------------------------------------------------------- pure arithmetic (unit-tested)

def flops_per_token(non_embedding_params: int, method: str) -> int:
    """Model FLOPs per trained token under the 6·N (full) / 4·N (adapter) convention."""
    if method not in FLOPS_PER_PARAM:
        raise ValueError(f"no FLOPs convention for method '{method}' (known: {', '.join(FLOPS_PER_PARAM)})")
    return FLOPS_PER_PARAM[method] * non_embedding_params


def mfu(model_flops_per_second: float, peak_flops_per_second: float) -> float | None:
    """Model-FLOPs utilisation: achieved model FLOP/s as a fraction of the measured peak (None without a peak)."""
    return model_flops_per_second / peak_flops_per_second if peak_flops_per_second > 0 else None


def matmul_flops(size: int) -> int:
    """FLOPs of one size × size by size × size matrix product (a multiply and an add per term)."""
    return 2 * size ** 3


def steps_for_samples(samples: int, samples_per_step: int) -> int:
    """Optimizer steps that train at least `samples` rows at `samples_per_step` rows a step."""
    return math.ceil(samples / samples_per_step)


def rounded_samples(samples: int, samples_per_step: list[int]) -> int:
    """`samples` rounded up to a multiple of every way's rows per optimizer step, so each way trains exactly it."""
    step = math.lcm(*samples_per_step)
    return steps_for_samples(samples, step) * step


def derive_figures(raw: dict, method: str, peaks: dict) -> dict:
    """Throughput and MFU figures from a way's raw counts (samples, tokens, seconds, parameters)."""
    seconds = raw["train_seconds"]
    per_token = flops_per_token(raw["non_embedding_params"], method)
    achieved = per_token * raw["tokens"] / seconds if seconds > 0 else 0.0
    return {
        "samples_per_second": raw["samples"] / seconds if seconds > 0 else 0.0,
        "tokens_per_second": raw["tokens"] / seconds if seconds > 0 else 0.0,
        "padded_tokens_per_second": raw["padded_tokens"] / seconds if seconds > 0 else 0.0,
        "padding_fraction": 1 - raw["tokens"] / raw["padded_tokens"] if raw["padded_tokens"] else 0.0,
        "model_flops_per_token": per_token,
        "model_flops_per_second": achieved,
        "mfu_bf16": mfu(achieved, peaks.get("bf16", 0.0)),
        "mfu_fp32": mfu(achieved, peaks.get("fp32", 0.0)),
    }


def compare(ours: dict, theirs: dict) -> dict:
    """tunelab against another way: speed-ups (×), memory ratio (×) and accuracy difference (points)."""
    def ratio(key: str) -> float | None:
        return ours[key] / theirs[key] if theirs.get(key) else None

    memory_key = "peak_cuda_gib" if ours.get("peak_cuda_gib") else "peak_rss_gib"
    return {"samples_per_second": ratio("samples_per_second"), "tokens_per_second": ratio("tokens_per_second"),
            "train_seconds": ratio("train_seconds"), memory_key: ratio(memory_key),
            "accuracy_points": 100 * (ours["accuracy"] - theirs["accuracy"])
            if ours.get("accuracy") is not None and theirs.get("accuracy") is not None else None,
            "eval_loss_change": ours["eval_loss"] / theirs["eval_loss"] - 1 if theirs.get("eval_loss") else None}


def _cell(value, digits: int = 1, percent: bool = False) -> str:
    if value is None:
        return "–"
    if percent:
        return f"{100 * value:.{digits}f}%"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


TABLE_COLUMNS = [  # header, key, digits, percent
    ("way", "way", 0, False), ("samples", "samples", 0, False), ("samples/s", "samples_per_second", 2, False),
    ("real tok/s", "tokens_per_second", 0, False), ("padded tok/s", "padded_tokens_per_second", 0, False),
    ("train s", "train_seconds", 1, False), ("peak RSS GiB", "peak_rss_gib", 2, False),
    ("acc", "accuracy", 3, False), ("acc best ckpt", "accuracy_best_checkpoint", 3, False),
    ("eval loss", "eval_loss", 3, False),
    ("MFU bf16", "mfu_bf16", 1, True), ("MFU fp32", "mfu_fp32", 1, True),
]
CUDA_COLUMN = ("peak CUDA GiB", "peak_cuda_gib", 2, False)


def format_table(rows: list[dict]) -> str:
    """A plain-text table, one line per way; a peak-CUDA column appears when any way ran on CUDA.

    Columns no way has a figure for (accuracy on a generative job, eval loss on a classification job) are left out.
    """
    columns = [column for column in TABLE_COLUMNS if any(row.get(column[1]) is not None for row in rows)]
    if any(row.get("peak_cuda_gib") for row in rows):
        columns.insert(7, CUDA_COLUMN)
    cells = [[header for header, *_ in columns]]
    cells += [[_cell(row.get(key), digits, percent) if key != "way" else row["way"]
               for _, key, digits, percent in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(w) if i == 0 else text.rjust(w)
                       for i, (text, w) in enumerate(zip(line, widths, strict=True))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_comparison(name: str, ratios: dict) -> str:
    """One line: tunelab against another way."""
    memory_key = "peak_cuda_gib" if "peak_cuda_gib" in ratios else "peak_rss_gib"
    memory = "peak CUDA" if memory_key == "peak_cuda_gib" else "peak RSS"
    quality = (f"accuracy {ratios['accuracy_points']:+.1f} points" if ratios.get("accuracy_points") is not None
               else f"eval loss {100 * ratios['eval_loss_change']:+.1f}%")
    return (f"tunelab vs {name}: {_cell(ratios['samples_per_second'], 2)}x samples/s, "
            f"{_cell(ratios['tokens_per_second'], 2)}x real tokens/s, {_cell(ratios[memory_key], 2)}x {memory}, "
            f"{quality}")


# ---------------------------------------------------------------- measurements on this machine

def peak_memory() -> dict:
    """This process's peak resident memory (GiB) and, on CUDA, peak allocated GPU memory (GiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    figures = {"peak_rss_gib": rss_bytes / 2 ** 30, "peak_cuda_gib": None}
    import torch

    if torch.cuda.is_available():
        figures["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return figures


def measure_matmul_peak(dtype_name: str, size: int, burst: int, repeats: int = 5) -> float:
    """Best FLOP/s of `burst` back-to-back size × size matmuls in `dtype_name` (bf16 or fp32) on the training
    device (a burst, so a GPU's launch latency and the timer's overhead do not count as matmul time)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, caches
    timings = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(burst):
            torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return burst * matmul_flops(size) / min(timings)


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


MATMUL_SHAPE = {"cpu": (2048, 1), "cuda": (8192, 10)}  # device → (matrix size, matmuls per timing)


def machine_peaks() -> dict:
    """bf16 and fp32 matmul peaks measured now with all threads, and what machine they were measured on."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    on_cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_cuda else f"cpu: {cpu_name()}, {os.cpu_count()} cores"
    # A GPU runs a 2048² matmul in tens of microseconds, too short to time alone (two H100 runs read 334 and 63
    # TFLOP/s): there the peak is taken on 8192² matmuls, 10 per timing.
    size, burst = MATMUL_SHAPE["cuda" if on_cuda else "cpu"]
    return {"bf16": measure_matmul_peak("bf16", size, burst), "fp32": measure_matmul_peak("fp32", size, burst),
            "matmul": f"{size}², {burst} per timing, best of 5", "threads": torch.get_num_threads(),
            "device": device, "torch": torch.__version__}


def bf16_native() -> bool:
    """Whether this machine runs bf16 natively (what the hand-written baseline checks before setting bf16=True)."""
    from tunelab.models.precision import bf16_supported

    return bf16_supported()


# ---------------------------------------------------------------- one way, inside its own subprocess

def way_settings(way: str, task: str = "classify") -> WaySettings:
    """Batching, padding and precision of the two plain-transformers ways (SFT's rows are long: batch 4)."""
    if way == "tutorial":
        return WaySettings(batch_size=1, grad_accum=4, pad_to_max_length=True, bf16=False)
    if way == "hand-written":
        return WaySettings(batch_size=4 if TASKS[task].decoder else 16, grad_accum=1, pad_to_max_length=False,
                           bf16=bf16_native())
    raise ValueError(f"'{way}' is not a plain-transformers way")


def samples_per_step(way: str, recipe) -> int:
    """Rows one optimizer step trains in a way."""
    if way == "tunelab":
        return recipe.train.batch_size * recipe.train.grad_accum
    settings = way_settings(way, recipe.task)
    return settings.batch_size * settings.grad_accum


def model_size(location: str, num_labels: int | None) -> tuple[int, int]:
    """(total, non-embedding) parameter counts of the classifier (num_labels) or causal LM (None), counted on the
    meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if num_labels is None:
        config, model_class = AutoConfig.from_pretrained(location), AutoModelForCausalLM
    else:
        config = AutoConfig.from_pretrained(location, num_labels=num_labels)
        model_class = AutoModelForSequenceClassification
    with torch.device("meta"):
        model = model_class.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for module in model.modules() if isinstance(module, torch.nn.Embedding)
                    for p in module.parameters(recurse=False))
    return total, total - embedding


def load_job_recipe(job: Job, examples: Path, eval_size: int | None = None, workdir: Path | None = None):
    """The example recipe with the job's overrides, runs written under the work folder and the eval split
    optionally subsampled."""
    from tunelab.recipe import load_recipe

    overrides = list(job.overrides) + ([f"output.root={workdir}"] if workdir else []) + (
        [f"data.eval_size={eval_size}"] if eval_size else [])
    return load_recipe(examples / job.recipe, overrides)


def plain_arguments(args_class, recipe, settings: WaySettings, steps: int | None, workdir: Path, **extra):
    """The plain ways' TrainingArguments (or TRL config): the recipe's schedule, the way's batching and precision."""
    import torch

    return args_class(
        output_dir=str(workdir / "trainer"), num_train_epochs=recipe.train.epochs, max_steps=steps or -1,
        per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
        per_device_eval_batch_size=recipe.eval.batch_size, learning_rate=recipe.train.learning_rate,
        lr_scheduler_type=recipe.train.lr_scheduler, warmup_steps=recipe.train.warmup_ratio,
        weight_decay=recipe.train.weight_decay, bf16=settings.bf16, seed=recipe.train.seed,
        data_seed=recipe.train.seed, eval_strategy="no", save_strategy="no", logging_steps=recipe.train.logging_steps,
        # the recipe's choice, as in tunelab (TRL's SFTConfig would otherwise switch checkpointing on by default)
        activation_checkpointing=recipe.train.gradient_checkpointing,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), **extra)


def plain_lora_config(recipe, task_type):
    """The recipe's LoRA (or DoRA) settings as the peft config a plain user writes."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=recipe.method.r, lora_alpha=recipe.method.alpha,
                      lora_dropout=recipe.method.dropout, target_modules=recipe.method.target_modules,
                      use_dora=recipe.method.name == "dora")


def train_plain(recipe, way: str, steps: int | None, workdir: Path) -> dict:
    """Train the way a plain transformers (+peft) user does; return raw counts, time and final accuracy."""
    import numpy as np
    import torch
    from peft import TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from tunelab.data.labelled import load_labelled_data
    from tunelab.models.loading import resolve_model
    from tunelab.trainer import MeteredTrainer

    if recipe.entry.decoder:
        return train_plain_sft(recipe, way, steps, workdir)
    settings = way_settings(way)
    data = load_labelled_data(recipe.data)  # the same rows tunelab trains and scores
    location = resolve_model(recipe.model.name).location
    set_seed(recipe.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        location, num_labels=len(data.labels), id2label=dict(enumerate(data.labels)),
        label2id={label: i for i, label in enumerate(data.labels)}, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if recipe.method.name in ("lora", "dora"):  # peft's SEQ_CLS task trains the classifier head in full
        model = get_peft_model(model, plain_lora_config(recipe, TaskType.SEQ_CLS))
    elif recipe.method.name != "full":
        raise ValueError(f"the plain ways know full fine-tuning and LoRA, not '{recipe.method.name}'")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def encode(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=recipe.model.max_length,
                         padding="max_length" if settings.pad_to_max_length else False)

    columns = [c for c in data.train.column_names if c != "label"]
    train_set = data.train.map(encode, batched=True, remove_columns=columns)
    eval_set = data.eval.map(encode, batched=True, remove_columns=columns)
    args = plain_arguments(TrainingArguments, recipe, settings, steps, workdir)
    collator = default_data_collator if settings.pad_to_max_length else DataCollatorWithPadding(tokenizer)
    trainer = MeteredTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                             data_collator=collator, processing_class=tokenizer)
    trainer.train()
    predictions = trainer.predict(eval_set)
    logits = predictions.predictions[0] if isinstance(predictions.predictions, tuple) else predictions.predictions
    accuracy = float((np.asarray(logits).argmax(-1) == predictions.label_ids).mean())
    meter = trainer.meter
    return {"samples": meter.samples, "tokens": meter.tokens, "padded_tokens": meter.padded_tokens,
            "train_seconds": meter.seconds, "accuracy": accuracy, "accuracy_best_checkpoint": None,
            "precision": "bf16" if settings.bf16 else "fp32", "batch": f"{settings.batch_size}x{settings.grad_accum}",
            "trainable_params": trainable, "location": location, "labels": len(data.labels),
            "train_rows": len(data.train),
            "eval_rows": len(data.eval)}


def train_plain_sft(recipe, way: str, steps: int | None, workdir: Path) -> dict:
    """SFT the way a plain TRL (+peft) user does: conversational prompt/completion rows, TRL's chat templating,
    loss on the completion only; return raw counts, time and the final eval loss."""
    import datasets
    import torch
    from peft import TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from tunelab.data.generative import load_generative_data
    from tunelab.models.loading import resolve_model
    from tunelab.trainer import MeteredMixin

    class MeteredSFTTrainer(MeteredMixin, SFTTrainer):
        """TRL's SFTTrainer with the meter every way uses, and none of tunelab's training changes."""

    if recipe.method.name not in ("lora", "dora"):
        raise ValueError(f"the plain SFT ways know LoRA, not '{recipe.method.name}'")
    settings = way_settings(way, "sft")
    data = load_generative_data(recipe.data)  # the same rows tunelab trains and scores

    def conversational(split) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"prompt": [row[:-1] for row in split["messages"]],
                                           "completion": [row[-1:] for row in split["messages"]]})

    location = resolve_model(recipe.model.name).location
    set_seed(recipe.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32),
                           plain_lora_config(recipe, TaskType.CAUSAL_LM))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = plain_arguments(SFTConfig, recipe, settings, steps, workdir, max_length=recipe.model.max_length,
                           pad_to_multiple_of=recipe.model.max_length if settings.pad_to_max_length else None)
    trainer = MeteredSFTTrainer(model=model, args=args, train_dataset=conversational(data.train),
                                eval_dataset=conversational(data.eval), processing_class=tokenizer)
    trainer.train()
    meter = trainer.meter
    return {"samples": meter.samples, "tokens": meter.tokens, "padded_tokens": meter.padded_tokens,
            "train_seconds": meter.seconds, "accuracy": None, "accuracy_best_checkpoint": None,
            "eval_loss": trainer.evaluate()["eval_loss"], "precision": "bf16" if settings.bf16 else "fp32",
            "batch": f"{settings.batch_size}x{settings.grad_accum}", "trainable_params": trainable,
            "location": location, "labels": None, "train_rows": len(data.train), "eval_rows": len(data.eval)}


def train_tunelab(recipe, steps: int | None, workdir: Path) -> dict:
    """Train with tunelab.api.train; return raw counts, time and the final and best-checkpoint accuracies."""
    from tunelab import api
    from tunelab.models.loading import resolve_model

    if steps:
        recipe.train.max_steps = steps
    _, metrics = api.train(recipe, str(workdir / "tunelab-run"))
    if recipe.entry.decoder:  # the best checkpoint by eval loss (the last, unless the loss rose again)
        quality = {"accuracy": None, "accuracy_best_checkpoint": None, "eval_loss": metrics["after"]["loss"],
                   "labels": None}
    else:
        evaluations = [entry["eval_accuracy"] for entry in metrics["history"] if "eval_accuracy" in entry]
        quality = {"accuracy": evaluations[-1] if evaluations else metrics["after"]["accuracy"],
                   "accuracy_best_checkpoint": metrics["after"]["accuracy"], "eval_loss": None,
                   "labels": len(metrics["labels"])}
    return {"samples": metrics["train_loop_samples"], "tokens": metrics["train_tokens"],
            "padded_tokens": metrics["train_padded_tokens"], "train_seconds": metrics["train_loop_seconds"],
            **quality, "precision": metrics["precision"],
            "batch": f"{recipe.train.batch_size}x{recipe.train.grad_accum}",
            "trainable_params": metrics["trainable_params"], "location": resolve_model(recipe.model.name).location,
            "train_rows": metrics["train_rows"], "eval_rows": metrics["eval_rows"]}


def run_way(job: Job, way: str, steps: int | None, examples: Path, eval_size: int | None, workdir: Path) -> dict:
    """Train one job one way in this process and return its raw figures (called in the way's subprocess)."""
    import transformers

    transformers.logging.set_verbosity_error()
    recipe = load_job_recipe(job, examples, eval_size, workdir)
    raw = train_tunelab(recipe, steps, workdir) if way == "tunelab" else train_plain(recipe, way, steps, workdir)
    total, non_embedding = model_size(raw.pop("location"), raw["labels"])
    return {**raw, "way": way, "method": recipe.method.name, "steps_cap": steps, "total_params": total,
            "non_embedding_params": non_embedding, **peak_memory()}


# ---------------------------------------------------------------- the suite, in the parent process

def spawn_way(job: Job, way: str, steps: int | None, args: argparse.Namespace, workdir: Path) -> dict:
    """Run one way in a fresh Python process and return what it reports; its output goes to a log file."""
    folder = workdir / f"{job.name}-{way}"
    folder.mkdir(parents=True)
    result, log = folder / "result.json", folder / "log.txt"
    command = [sys.executable, "-m", "tunelab.bench", "--child", f"{job.name}:{way}", "--child-out", str(result),
               "--child-dir", str(folder), "--examples", str(args.examples)]
    command += (["--child-steps", str(steps)] if steps else []) + (["--eval-size", str(args.eval_size)]
                                                                   if args.eval_size else [])
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with open(log, "w") as handle:
        code = subprocess.call(command, stdout=None if args.verbose else handle,
                               stderr=subprocess.STDOUT if not args.verbose else None, env=env)
    if code != 0 or not result.is_file():
        tail = "" if args.verbose else "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{job.name} / {way} failed (exit code {code}); last lines of its log:\n{tail}")
    return json.loads(result.read_text())


def job_schedule(job: Job, args: argparse.Namespace) -> dict[str, int | None]:
    """Each way's max_steps cap so all ways train the same samples (None: the example's full schedule)."""
    if not args.samples:
        return dict.fromkeys(WAYS)
    recipe = load_job_recipe(job, args.examples)
    per_step = {way: samples_per_step(way, recipe) for way in WAYS}
    target = rounded_samples(args.samples, list(per_step.values()))
    return {way: steps_for_samples(target, per_step[way]) for way in WAYS}


def prepare_model(job: Job, args: argparse.Namespace) -> None:
    """Resolve the job's model once here, so no way pays (in time or memory) for a first GGUF dequantization."""
    from tunelab.models.loading import resolve_model

    resolve_model(load_job_recipe(job, args.examples).model.name)


def run_job(job: Job, args: argparse.Namespace, peaks: dict, workdir: Path) -> dict:
    """Run every way of a job, derive its figures, print its table and return its JSON section."""
    prepare_model(job, args)
    schedule = job_schedule(job, args)
    rows = []
    for way in WAYS:
        print(f"bench: {job.name} / {way} ...", flush=True)
        started = time.perf_counter()
        raw = spawn_way(job, way, schedule[way], args, workdir)
        rows.append({**raw, **derive_figures(raw, raw["method"], peaks),
                     "process_seconds": time.perf_counter() - started})
        print(f"bench: {job.name} / {way}: {raw['samples']} samples in {raw['train_seconds']:.1f} s of training "
              f"({rows[-1]['process_seconds']:.0f} s in all), {quality_text(raw)}", flush=True)
    by_way = {row["way"]: row for row in rows}
    ratios = {other: compare(by_way["tunelab"], by_way[other]) for other in ("tutorial", "hand-written")}
    first = rows[0]
    print(f"\n{job.name}: {job.description}; {first['train_rows']} train rows, {first['eval_rows']} eval rows, "
          f"{first['labels'] or 'no'} labels; N = {first['non_embedding_params']:,} non-embedding parameters")
    print(format_table(rows))
    for other, ratio in ratios.items():
        print(format_comparison(other, ratio))
    print("acc: the final model; acc best ckpt: tunelab's reported 'after' (best epoch's checkpoint); eval loss: "
          "on the response tokens of the eval split\n", flush=True)
    return {"description": job.description, "recipe": job.recipe, "ways": by_way, "tunelab_vs": ratios}


def quality_text(raw: dict) -> str:
    """'accuracy 0.812' for a classification way, 'eval loss 2.345' for an SFT way."""
    if raw.get("accuracy") is not None:
        return f"accuracy {raw['accuracy']:.3f}"
    return f"eval loss {raw['eval_loss']:.3f}"


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's command-line options (shared by `python -m tunelab.bench` and `tunelab bench`)."""
    parser.add_argument("--jobs", default=",".join(JOBS),
                        help=f"comma-separated jobs (default: all: {', '.join(JOBS)})")
    parser.add_argument("--samples", type=positive_int,
                        help="train this many samples per way (rounded up to a multiple of every way's rows per "
                             "step); default: the example's full schedule")
    parser.add_argument("--eval-size", type=positive_int,
                        help="score a stratified subsample of this many eval rows (default: the example's eval split)")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--examples", type=Path, default=EXAMPLES, help="folder holding the example recipes")
    parser.add_argument("--verbose", action="store_true", help="show each way's own output instead of logging it")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m tunelab.bench`, with the hidden options its subprocesses take."""
    parser = argparse.ArgumentParser(prog="python -m tunelab.bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    for hidden in ("--child", "--child-out", "--child-dir", "--child-steps"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, type=int if hidden == "--child-steps" else str)
    return parser


def selected_jobs(text: str) -> list[Job]:
    """The jobs a --jobs value names, or a TunelabError listing the valid names."""
    from tunelab.errors import TunelabError

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in JOBS]
    if unknown or not names:
        raise TunelabError(f"--jobs {text!r} names unknown jobs ({', '.join(unknown)}); choose from {', '.join(JOBS)}")
    return [JOBS[name] for name in names]


def run(args: argparse.Namespace) -> int:
    """Run the suite: measure the matmul peaks, run each job's ways, print the tables, write the JSON."""
    jobs = selected_jobs(args.jobs)
    if not (args.examples / jobs[0].recipe).is_file():
        from tunelab.errors import TunelabError

        raise TunelabError(f"--examples '{args.examples}' holds no {jobs[0].recipe}; point it at the examples folder")
    peaks = machine_peaks()
    print(f"bench: {peaks['device']}, {peaks['threads']} threads, torch {peaks['torch']}: matmul peak "
          f"{peaks['bf16'] / 1e9:.0f} GFLOP/s bf16, {peaks['fp32'] / 1e9:.0f} GFLOP/s fp32 ({peaks['matmul']})")
    print(f"bench: {CONVENTION}", flush=True)
    report = {"machine": peaks, "convention": CONVENTION, "samples": args.samples or "full schedule",
              "eval_size": args.eval_size, "jobs": {}}
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as workdir:
        for job in jobs:
            report["jobs"][job.name] = run_job(job, args, peaks, Path(workdir))
            if args.json:  # written after every job, so a long suite leaves its finished part behind
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def child(args: argparse.Namespace) -> int:
    """Subprocess entry: train one job one way and write its raw figures to --child-out."""
    job_name, way = args.child.split(":")
    figures = run_way(JOBS[job_name], way, args.child_steps, args.examples, args.eval_size, Path(args.child_dir))
    Path(args.child_out).write_text(json.dumps(figures, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m tunelab.bench`: run the suite (or, with the hidden --child option, one way of one job)."""
    from tunelab.errors import TunelabError

    args = build_parser().parse_args(argv)
    try:
        return child(args) if args.child else run(args)
    except TunelabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
