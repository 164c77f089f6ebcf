"""The library entry points the CLI (and later the UI) call: train, validate, evaluate, predict."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from tunelab.console import log_to, say
from tunelab.data.generative import GenerativeData, load_generative_data
from tunelab.data.labelled import load_eval_split, load_labelled_data
from tunelab.data.preference import load_preference_data
from tunelab.data.sft_encoding import fit_prompts, prompt_format
from tunelab.distributed import check_plan, current_world, from_main, join
from tunelab.errors import TunelabError
from tunelab.evaluation.classification import classification_metrics
from tunelab.models.loading import (
    ModelSource,
    check_model_exists,
    check_qlora_available,
    is_decoder,
    load_tokenizer,
    resolve_model,
)
from tunelab.models.trained import earlier_run_labels, load_trained, read_run_recipe
from tunelab.recipe import GENERATIVE_TASKS, PREFERENCE_TASKS, DataConfig, GenerateConfig, Recipe, RewardSource
from tunelab.rewards import load_reward_function, locate_reward_function
from tunelab.runs.folder import open_run_folder
from tunelab.runs.tracking import check_trackers
from tunelab.stages.sft import check_context_length
from tunelab.tasks import TASKS, refusal, task_named


def check_recipe(recipe: Recipe, import_code: bool = True):
    """Everything that can be checked before a run folder exists: data, labels, model. Returns (data, model).

    import_code=False (the web board) only locates a reward function's module: it never runs a recipe's code."""
    check_trackers(recipe.train.report_to)
    if recipe.eval.judge is not None:
        check_reward_source(recipe.eval.judge, "eval.judge", import_code)
    data = load_data_for(recipe)
    if TASKS[recipe.task].loader is not None:  # a task with its own loader: the model checks below are all it needs
        source = resolve_model(recipe.model.name)
        check_model_exists(source)
        check_model_fits_task(recipe, source, [])
        return data, source
    if recipe.task in GENERATIVE_TASKS:
        source = resolve_model(recipe.model.name)
        check_model_exists(source)
        check_generative_model(recipe, source, data)
        return data, source
    if recipe.task == "grpo":
        source = resolve_model(recipe.model.name)
        check_model_exists(source)
        if source.origin != "hub" and not is_decoder(source.location):
            raise TunelabError(f"task grpo trains a decoder (causal LM), but '{recipe.model.name}' is not one; use "
                               f"e.g. smollm2-135m or an sft run folder")
        check_reward_source(recipe.reward, "reward", import_code)
        return data, source
    if recipe.task in PREFERENCE_TASKS:
        source = resolve_model(recipe.model.name)
        check_model_exists(source)
        if recipe.task != "reward" and source.origin != "hub" and not is_decoder(source.location):
            raise TunelabError(f"task {recipe.task} trains a decoder (causal LM), but '{recipe.model.name}' is not "
                               f"one; use e.g. smollm2-135m (task reward trains encoders too)")
        return data, source
    source = resolve_model(recipe.model.name)
    check_model_exists(source)
    check_model_fits_task(recipe, source, data.labels)
    return data, source


def load_data_for(recipe: Recipe):
    """The recipe's data, read and checked the way its task reads it (rows, eval split, validation split)."""
    if TASKS[recipe.task].loader is not None:
        return TASKS[recipe.task].load_data()(recipe)
    if recipe.task in GENERATIVE_TASKS:
        return load_generative_data(recipe.data, recipe.task)
    if recipe.task == "grpo":
        return load_generative_data(recipe.data, "sft")
    if recipe.task in PREFERENCE_TASKS:
        return load_preference_data(recipe.data, unpaired_ok=recipe.task == "kto")
    return load_labelled_data(recipe.data)


def check_reward_source(source: RewardSource, field: str, import_code: bool = True) -> None:
    """The reward function imports and has the right signature (with import_code=False: its module can be found),
    or the reward model is a reward run's folder."""
    if source.function is not None:
        (load_reward_function if import_code else locate_reward_function)(source.function)
        return
    earlier = earlier_run_labels(source.model)
    if earlier is None or earlier[0] != "reward":
        raise TunelabError(f"{field}.model '{source.model}' is not a finished reward-model run folder (task "
                           f"reward); train one first, or use {field}.function")


def check_generative_model(recipe: Recipe, source: ModelSource, data: GenerativeData) -> None:
    """sft and pretrain need a decoder; seq2seq an encoder-decoder, or an encoder to warm-start one from. For sft,
    rows whose prompt fills model.max_length are refused, or left out of `data` with data.drop_long."""
    if recipe.method.name == "qlora":
        check_qlora_available()
    if source.origin == "hub":
        return
    decoder = is_decoder(source.location)
    if recipe.task in ("sft", "pretrain") and not decoder:
        raise TunelabError(f"task {recipe.task} trains a decoder (causal LM), but '{recipe.model.name}' is not one; "
                           f"use e.g. smollm2-135m, or task seq2seq for encoder models")
    if recipe.task == "seq2seq" and decoder:
        raise TunelabError(f"task seq2seq needs an encoder-decoder (T5, BART) or an encoder to warm-start one from "
                           f"(e.g. minilm), but '{recipe.model.name}' is a decoder; use task sft for decoders")
    if recipe.task in ("sft", "pretrain"):
        check_context_length(AutoConfig.from_pretrained(source.location), recipe)
    if recipe.task == "sft":
        fmt = prompt_format(load_tokenizer(source.location), recipe.data.chat_template, data.format,
                            recipe.model.name)
        data.train = fit_prompts(fmt, data.train, recipe.model.max_length, "train", recipe.data.drop_long)
        data.eval = fit_prompts(fmt, data.eval, recipe.model.max_length, "eval", recipe.data.drop_long)
        if data.validation is not None:
            data.validation = fit_prompts(fmt, data.validation, recipe.model.max_length, "validation",
                                          recipe.data.drop_long)


def check_model_fits_task(recipe: Recipe, source: ModelSource, labels: list[str]) -> None:
    """Refuse model/task combinations that would fail (or silently mislead) only after the baseline was scored."""
    decoder = source.origin != "hub" and is_decoder(source.location)
    if TASKS[recipe.task].sentence_encoder and decoder:
        raise TunelabError(f"task {recipe.task} tunes a sentence encoder, but '{recipe.model.name}' is a decoder; use "
                           f"an encoder (minilm, mpnet-base)")
    if recipe.eval.in_context_shots and source.origin != "hub" and not decoder:
        raise TunelabError(f"eval.in_context_shots prompts a decoder, but '{recipe.model.name}' is an encoder; "
                           f"use a decoder (e.g. smollm2-135m) or drop eval.in_context_shots")
    earlier = earlier_run_labels(recipe.model.name) if source.origin == "run" else None
    if earlier and earlier[0] == "classify" and recipe.task == "classify" and not recipe.model.new_head \
            and earlier[1] != labels:
        raise TunelabError(f"model.name '{recipe.model.name}' was trained on the labels {earlier[1][:5]}, not this "
                           f"recipe's {labels[:5]}; set model.new_head: true to train a fresh head for the new labels")


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
    return run_dir, TASKS[recipe.task].stage()(recipe, data, source, run_dir, resume)


def device_and_precision(recipe: Recipe) -> str:
    """'cpu, bf16' / 'cuda, fp32': where and how the run trains."""
    import torch

    from tunelab.trainer import resolve_bf16

    bf16 = recipe.task != "fewshot" and resolve_bf16(recipe.train.precision)  # fewshot always trains in fp32
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
    task = task_named((read_run_recipe(Path(model_path)) or {}).get("task"))  # None for model folders and exports
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
    from tunelab.models.generator import load_generator as load

    return load(run_dir)


def generate(run_dir: str, texts: list[str], max_new_tokens: int = 64, temperature: float = 0.0) -> list[str]:
    """Answers of a trained generative run to `texts` (each put into the run's prompt format)."""
    return load_generator(run_dir).generate(texts, generation_settings(max_new_tokens, temperature))
