"""What every export format shares: a finished run read back, its model with any adapter merged, and an output
folder that is staged beside its target and renamed into place, never over something that exists."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.inference.trained import load_classifier_model
from tunelab.models.loading import load_causal_lm, load_tokenizer
from tunelab.runs.folder import RunFolder
from tunelab.tasks import TASKS

HEAD_FAMILIES = ("classifier", "reward")  # a sequence-classification head: labels, or one reward output
UNMERGEABLE_PEFT = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")


def check_format(run: RunFolder, fmt: str) -> None:
    """Refuse a format the run's task does not export to (the registry's `exports`), naming those it does."""
    task = run.task
    if fmt in task.exports:
        return
    takers = ", ".join(name for name, each in TASKS.items() if fmt in each.exports)
    instead = (f" — export it as {' or '.join(task.exports)}" if task.exports
               else " (no format holds its model; e.g. a fewshot run's head is a scikit-learn model)")
    raise TunelabError(f"export: --format {fmt} takes runs of tasks {takers}; '{run.path}' is a {task.name} "
                       f"run{instead}")


def check_mergeable(run: RunFolder) -> None:
    """Refuse what cannot become plain weights: prompt/prefix tuning (virtual tokens)."""
    if run.adapter:
        peft_type = json.loads((run.model_dir / "adapter_config.json").read_text(encoding="utf-8")).get("peft_type")
        if str(peft_type).upper() in UNMERGEABLE_PEFT:
            raise TunelabError(f"export: run '{run.path}' uses method {run.method} ({peft_type}): its learned virtual "
                               f"tokens cannot be merged into the base weights, so no plain model folder can hold "
                               f"it; export a full, freeze, lora, dora or ia3 run")


def load_merged(run: RunFolder) -> tuple[torch.nn.Module, object]:
    """The run's model in fp32 with any adapter merged into its base, and its tokenizer (pad token set)."""
    check_mergeable(run)
    location = str(run.model_dir)
    tokenizer = load_tokenizer(location)
    family = run.task.family
    if family in HEAD_FAMILIES:
        model = load_merged_classifier(location)
        model.config.pad_token_id = tokenizer.pad_token_id
        if family == "reward":
            tokenizer.truncation_side = "left"  # reward models score a transcript's end (the response), as trained
    elif family == "decoder":
        model = load_causal_lm(location)
    elif family == "seq2seq":
        model = load_merged_seq2seq(run, tokenizer)
    else:
        check_format(run, "hf")  # refuses it, naming the tasks that export
    template = run.recipe.data.chat_template
    if run.task.prompts == "template" and template not in ("auto", "none"):
        tokenizer.chat_template = template  # the run trained with its own template: users must render with it
    return model.eval(), tokenizer


def load_merged_classifier(location: str) -> torch.nn.Module:
    """A sequence classifier as `tunelab predict` loads it, in fp32, with a peft adapter merged into the base."""
    model = load_classifier_model(location, dtype=torch.float32)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def load_merged_seq2seq(run: RunFolder, tokenizer) -> torch.nn.Module:
    """An encoder-decoder run (T5/BART, or BERT2BERT warm-started), as `tunelab generate` loads it."""
    from tunelab.models.loading import load_seq2seq

    if run.adapter:
        raise TunelabError(f"export: run '{run.path}' is a seq2seq run with a {run.method} adapter; only full and "
                           f"freeze seq2seq runs are exportable")
    return load_seq2seq(str(run.model_dir), tokenizer)


def check_new_output(output: str | Path) -> Path:
    """The output path, refused when anything (folder or file) is already there: exports never overwrite."""
    path = Path(output)
    if path.exists() or path.is_symlink():
        raise TunelabError(f"export: --output '{path}' already exists; choose a new path (exports never overwrite)")
    return path


def publish_folder(output: Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a hidden staging folder beside `output`, then rename it into place (atomic on one file
    system); a failed export leaves nothing behind, and an output that appeared meanwhile is not replaced."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the export is an ordinary folder
        write(staging)
        check_new_output(output)
        os.rename(staging, output)  # a rename onto an existing non-empty folder fails instead of replacing it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path, data: object) -> None:
    """A JSON file inside a staging folder (the whole folder is published atomically)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
