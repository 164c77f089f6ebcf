"""The library entry points the CLI (and later the UI) call: train, validate, evaluate, predict."""

from __future__ import annotations

from pathlib import Path

from tunelab.console import log_to, say
from tunelab.data.labelled import load_eval_split, load_labelled_data
from tunelab.distributed import check_plan, current_world, from_main, join
from tunelab.errors import TunelabError
from tunelab.evaluation.classification import classification_metrics
from tunelab.inference.trained import load_trained
from tunelab.models.loading import check_model_exists, resolve_model
from tunelab.recipe import DataConfig, GenerateConfig, Recipe, RewardSource
from tunelab.runs.folder import open_run_folder, run_folder
from tunelab.runs.tracking import check_trackers
from tunelab.speedups import speedups_for_run
from tunelab.stages.grpo import check_reward_source
from tunelab.tasks import refusal


def check_recipe(recipe: Recipe, import_code: bool = True):
    """Everything that can be checked before a run folder exists: data, labels, model. Returns (data, model).

    Each task's stage reads its data and checks its model (`load_data`, `check_model`). import_code=False (the web
    board) only locates a reward function's module: it never runs a recipe's code."""
    check_trackers(recipe.train.report_to)
    if recipe.eval.judge is not None:
        check_reward_source(recipe.eval.judge, "eval.judge", import_code)
    stage = recipe.entry.stage()
    data = stage.load_data(recipe)
    return data, stage.check_model(recipe, data, import_code)


def load_data_for(recipe: Recipe):
    """The recipe's data, read and checked the way its task reads it (rows, eval split, validation split)."""
    return recipe.entry.stage().load_data(recipe)


def train(recipe: Recipe, output: str | None = None, resume: bool = False) -> tuple[Path, dict]:
    """Validate, score the baseline, train, score again and write the run folder; return (run folder, metrics).

    Under several processes (torchrun) rank 0 validates and creates the folder first; the others, waiting for
    its name, load the same data after it (a recipe that fails on rank 0 ends the job before they do)."""
    world = current_world()
    check_plan(recipe, world.size, resume=resume)
    join(world, recipe.train.distributed.strategy)
    if world.is_main:
        data, source = check_recipe(recipe)
        run_dir = open_run_folder(recipe, output, resume)
        log_to(run_dir / "log.jsonl")  # library warnings land there, not on the console
    run_dir = from_main(run_dir if world.is_main else None)
    if not world.is_main:
        data, source = check_recipe(recipe)
    say(f"tunelab: {recipe.task} · {recipe.model.name} · method {recipe.method.name} · {device_and_precision(recipe)} "
        f"→ {run_dir}")
    with speedups_for_run(recipe.train.speedups):  # library patches last as long as the run
        return run_dir, recipe.entry.stage().run(recipe, data, source, run_dir, resume)


def device_and_precision(recipe: Recipe) -> str:
    """'cpu, bf16' / 'cuda, fp32': where and how the run trains."""
    import torch

    from tunelab.trainer import resolve_bf16

    bf16 = not recipe.entry.fp32_only and resolve_bf16(recipe.train.precision)
    return f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {'bf16' if bf16 else 'fp32'}"


def evaluate(model_path: str, data: DataConfig, split: str) -> dict:
    """Score a trained classifier (run folder or model folder, classify or fewshot) on one split of any source."""
    trained = load_trained(model_path)
    rows = load_eval_split(data, split, trained.labels)
    probabilities = trained.probabilities(rows["text"], rows["text_pair"] if "text_pair" in rows.column_names
                                          else None)
    return classification_metrics(rows["label"], probabilities.argmax(-1), trained.labels)


def evaluate_in_context(model_name: str, data: DataConfig, shots: int) -> dict:
    """Score a decoder prompted with `shots` examples per class (from data's train split) on its eval split."""
    from tunelab.evaluation.in_context import score_in_context

    source = resolve_model(model_name)
    check_model_exists(source)
    rows = load_labelled_data(data)
    return score_in_context(source.location, rows.train, rows.eval, rows.labels, shots, data.seed)


def predict(model_path: str, texts: list[str], top_k: int = 1) -> list[dict]:
    """Labels with probabilities for each text, best first; for a reward run, its score of each text."""
    run = run_folder(model_path)
    task = run.task if run is not None else None  # None for model folders and exports
    if task is not None and task.scores:
        return score_texts(model_path, texts)
    if task is not None and not task.labels:
        raise TunelabError(refusal(f"'{model_path}'", task.name, ("labels", "scores"), "`tunelab predict`"))
    return label_texts(load_trained(model_path), texts, top_k)


def score_texts(run_dir: str, texts: list[str]) -> list[dict]:
    """A reward run's score of each whole text (higher = preferred), as the run scored its pairs and as
    `tunelab serve`'s /v1/score answers."""
    from tunelab.evaluation.judge import load_reward

    reward = load_reward(RewardSource(model=run_dir), batch_size=16, bf16=False)
    scores = reward(prompts=texts, completions=[""] * len(texts))
    return [{"text": text, "score": round(float(score), 6)} for text, score in zip(texts, scores, strict=True)]


def label_texts(trained, texts: list[str], top_k: int = 1) -> list[dict]:
    """`predict`'s rows for a loaded classifier: the server's /v1/classify answers with these very numbers."""
    probabilities = trained.probabilities(texts)
    results = []
    for text, row in zip(texts, probabilities, strict=True):
        best = row.argsort()[::-1][:top_k]
        results.append({"text": text, "label": trained.labels[best[0]], "probability": round(float(row[best[0]]), 6),
                        **({"top": [{"label": trained.labels[i], "probability": round(float(row[i]), 6)}
                                    for i in best]} if top_k > 1 else {})})
    return results


def export(run_dir: str, output: str, fmt: str = "hf", quantize: str | None = None, verify: bool = False,
           verify_size: int | None = None) -> Path:
    """Write a finished run as a plain Hugging Face folder, a GGUF file or an ONNX graph into the new `output`.
    With `verify` (classify and sft runs), score the run's eval split (its first `verify_size` rows) through the
    export in its runtime and through the run: the paired comparison lands in `output`/verify.json and the card."""
    from tunelab.export import export_run

    return export_run(run_dir, output, fmt, quantize, verify, verify_size)


def verify_export(run_dir: str, folder: str, size: int | None = None) -> dict:
    """Score an existing export `folder` of `run_dir` against the run (what `export --verify` does after writing);
    returns what it writes to `folder`/verify.json."""
    from tunelab.export.verify import verify_export as verify

    return verify(run_dir, folder, size)


def generation_settings(max_new_tokens: int = 64, temperature: float = 0.0) -> GenerateConfig:
    """Generation options for `generate` and `chat`."""
    return GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature)


def load_generator(run_dir: str):
    """A trained run of a task that answers prompts (sft, pretrain, seq2seq, dpo, kto, grpo), ready to answer."""
    from tunelab.inference.generator import load_generator as load

    return load(run_dir)


def generate(run_dir: str, texts: list[str], max_new_tokens: int = 64, temperature: float = 0.0) -> list[str]:
    """Answers of a trained generative run to `texts` (each put into the run's prompt format)."""
    return load_generator(run_dir).generate(texts, generation_settings(max_new_tokens, temperature))
