"""`tunelab export … --verify`: score the run's eval rows through the exported file in the runtime it is for, score
the same rows through the run's own model, and say whether the file lost anything (paired 95% interval).

The file's side runs where a user would run it: an hf folder in a fresh `python` process that imports transformers
and nothing of tunelab or peft; an onnx graph in ONNX Runtime; a gguf file in llama.cpp (llama-cpp-python) when it
is installed, else transformers' GGUF loader (fresh process, dequantized to fp32). Decoder runs generate greedily
with the chat template and EOS read from the exported file itself, so a file whose template or EOS differs from
what the run trained with scores lower here instead of passing unnoticed. Both sides score in fp32 and in the same
batches, so an hf export of an unchanged model differs by exactly nothing.

The difference file − run is a paired bootstrap over the rows (evaluation/uncertainty.py): both scores share the
rows' difficulty, so the interval is far tighter than two separate ones, and McNemar's exact test counts the rows
that changed. It goes to verify.json in the export folder and a "Verified" section of its model card.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.console import say, signed
from tunelab.errors import TunelabError
from tunelab.evaluation.generation import generate_texts
from tunelab.evaluation.uncertainty import mcnemar_p_value, mean_interval, mean_of, paired_gain
from tunelab.export.model_card import with_verified_section
from tunelab.export.run import write_json
from tunelab.inference.trained import ONNX_MODEL_FILE
from tunelab.recipe import GenerateConfig
from tunelab.rewards import normalise_answer
from tunelab.runs.folder import RunFolder, finished_run, write_text_atomic
from tunelab.tasks import tasks_that

VERIFY_FILE = "verify.json"
QUANTIZED = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # a drop after these is first the weights' rounding
SHOWN_DIFFERENCES = 5  # rows where file and run answer differently, kept in verify.json to look at

# The file's side for hf folders and transformers' GGUF loader: a fresh interpreter that imports transformers and
# torch only (no tunelab, no peft), reads a request and writes its answers. What it renders, it renders with the
# tokenizer read from the file (chat template, EOS, pad); it reports which of tunelab/peft got imported anyway.
FRESH_PROCESS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
request = json.load(open(sys.argv[1], encoding="utf-8"))
torch.set_num_threads(request["threads"])
options = {"gguf_file": request["gguf_file"]} if request["gguf_file"] else {}
tokenizer = AutoTokenizer.from_pretrained(request["folder"], **options)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
result = {"template": tokenizer.chat_template, "eos": tokenizer.eos_token}
if request["kind"] == "classifier":
    model = AutoModelForSequenceClassification.from_pretrained(request["folder"], dtype=torch.float32).eval()
    texts, pairs = request["texts"], request["pairs"]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]) + (len(pairs[i]) if pairs else 0))
    labels = [None] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            encoded = tokenizer([texts[i] for i in batch], [pairs[i] for i in batch] if pairs else None,
                                truncation=True, max_length=request["max_length"], padding=True, return_tensors="pt")
            for i, best in zip(batch, model(**encoded).logits.argmax(-1).tolist()):
                labels[i] = model.config.id2label[best]
    result["labels"] = labels
else:
    model = AutoModelForCausalLM.from_pretrained(request["folder"], dtype=torch.float32, **options).eval()
    stop = {"eos_token_id": tokenizer.eos_token_id} if options else {}  # a gguf's EOS: its tokenizer metadata
    chat, prompts = request["chat"], request["prompts"]
    if chat and not tokenizer.chat_template:
        result["answers"] = [""] * len(prompts)  # nothing to render the turns with: every answer is missing
    else:
        if chat:
            prompts = [tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
                       for turns in prompts]
        tokenizer.padding_side = "left"
        answers, size = [], request["batch_size"]
        with torch.inference_mode():
            for start in range(0, len(prompts), size):
                batch = tokenizer(prompts[start:start + size], return_tensors="pt", padding=True,
                                  add_special_tokens=not chat)
                out = model.generate(**batch, max_new_tokens=request["max_new_tokens"], do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, **stop)
                answers += [text.strip() for text in tokenizer.batch_decode(
                    out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
        result["answers"] = answers
result["modules"] = sorted(name for name in ("tunelab", "peft") if name in sys.modules)
json.dump(result, open(sys.argv[2], "w", encoding="utf-8"))
"""


@dataclass(frozen=True)
class ExportedFile:
    """What an export folder holds: its format, the .gguf inside (gguf), and the weight type (gguf)."""

    folder: Path
    fmt: str
    gguf: Path | None = None
    quantize: str | None = None

    @property
    def label(self) -> str:
        """'hf', 'onnx', 'gguf q8_0': how the summary line names the file."""
        return f"{self.fmt} {self.quantize}" if self.quantize else self.fmt


@dataclass
class Scores:
    """Per-row outcomes of one side: right (1) / wrong (0), and the answers or labels it gave."""

    right: np.ndarray
    outputs: list[str]


@dataclass
class FileScores(Scores):
    """The file's side, with the runtime that produced it and the template / EOS the file carries (decoders)."""

    runtime: str = ""
    template: str | None = None
    eos: str | None = None
    imports: list[str] | None = None  # which of tunelab / peft the fresh process imported (None: no such process)


@dataclass
class Paired:
    """Both sides scored on the same rows, and what the run trained with (decoders: chat template, EOS)."""

    rows: int
    metric: str
    run: Scores
    file: FileScores
    template: str | None = None
    eos: str | None = None


def check_verifiable(run: RunFolder) -> None:
    """`--verify` scores classify runs (accuracy) and sft runs (exact match); others are refused before exporting."""
    if not run.task.verify:  # the registry's `verify`: accuracy of a label, exact match
        raise TunelabError(f"export: --verify scores tasks {' and '.join(tasks_that('verify'))} (accuracy, exact match "
                           f"of the generated answer); '{run.path}' is a {run.task.name} run — export it without "
                           f"--verify")


def verify_export(run_dir: str | Path, folder: str | Path, size: int | None = None) -> dict:
    """Score the eval split of `run_dir` (its first `size` rows) through the export in `folder` and through the run's
    own model; write verify.json and the model card's "Verified" section into `folder`; return what verify.json
    holds (the console lines under `summary` and `warnings`)."""
    run = finished_run(run_dir, "export")
    check_verifiable(run)
    exported = exported_file(Path(folder).resolve())  # the fresh process runs elsewhere
    paired = (verify_classifier if run.task.family == "classifier" else verify_sft)(run, exported, size)
    result = comparison(run, exported, paired)
    write_json(exported.folder / VERIFY_FILE, result)
    card = exported.folder / "README.md"
    if card.is_file():
        write_text_atomic(card, with_verified_section(card.read_text(encoding="utf-8"), result))
    return result


def exported_file(folder: Path) -> ExportedFile:
    """The format of an export folder: a .gguf file, model.onnx, or a Hugging Face folder (config.json)."""
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        return ExportedFile(folder, "gguf", ggufs[0], gguf_weight_type(ggufs[0]))
    if (folder / ONNX_MODEL_FILE).is_file():
        return ExportedFile(folder, "onnx")
    if (folder / "config.json").is_file():
        return ExportedFile(folder, "hf")
    raise TunelabError(f"export: '{folder}' holds no export (no .gguf, {ONNX_MODEL_FILE} or config.json); give the "
                       f"--output folder of `tunelab export`")


def gguf_weight_type(path: Path) -> str | None:
    """The --quantize name of a .gguf's general.file_type (f16, q8_0, …)."""
    import gguf

    from tunelab.export.gguf import QUANT_TYPES

    field = gguf.GGUFReader(path).get_field(gguf.Keys.General.FILE_TYPE)
    file_type = field.contents() if field is not None else None
    return next((name for name, (_, kind) in QUANT_TYPES.items() if kind == file_type), None)


def gguf_template_and_eos(path: Path) -> tuple[str | None, str | None]:
    """The chat template and EOS token the .gguf's metadata gives its runtime."""
    import gguf

    reader = gguf.GGUFReader(path)
    template = reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    eos, tokens = reader.get_field(gguf.Keys.Tokenizer.EOS_ID), reader.get_field(gguf.Keys.Tokenizer.LIST)
    return (template.contents() if template is not None else None,
            tokens.contents(int(eos.contents())) if eos is not None and tokens is not None else None)


# --- classifiers: accuracy ------------------------------------------------------------------------------------------

def verify_classifier(run: RunFolder, exported: ExportedFile, size: int | None) -> Paired:
    """The run's and the file's right/wrong on each eval row of a classify run."""
    from tunelab.data.labelled import load_labelled_data
    from tunelab.inference.trained import load_onnx_export, load_trained

    trained = load_trained(run.path)
    data = run.recipe.data.model_copy(update={"labels": trained.labels})
    rows = first_rows(load_labelled_data(data).eval, size)  # label ids in the model's order
    texts = list(rows["text"])
    pairs = list(rows["text_pair"]) if "text_pair" in rows.column_names else None
    gold = [trained.labels[i] for i in rows["label"]]
    say(f"tunelab: verify: scoring {len(texts)} eval rows with the run's model")
    own = [trained.labels[i] for i in trained.probabilities(texts, pairs).argmax(-1)]
    say(f"tunelab: verify: scoring them through the {exported.label} export")
    imports = None
    if exported.fmt == "onnx":
        graph = load_onnx_export(exported.folder)
        predicted, runtime = [graph.labels[i] for i in graph.probabilities(texts, pairs).argmax(-1)], "ONNX Runtime"
    elif exported.fmt == "hf":
        max_length = run.recipe.model.max_length
        answer = fresh_process({"kind": "classifier", "folder": str(exported.folder), "gguf_file": None,
                                "texts": texts, "pairs": pairs, "max_length": max_length})
        predicted, runtime, imports = answer["labels"], "transformers in a fresh process", answer["modules"]
    else:
        raise TunelabError(f"export: --verify of a classify run reads hf or onnx exports; '{exported.folder}' is "
                           f"{exported.fmt}")
    return Paired(len(texts), "accuracy", Scores(right_labels(own, gold), own),
                  FileScores(right_labels(predicted, gold), predicted, runtime, imports=imports))


def right_labels(predicted: list[str], gold: list[str]) -> np.ndarray:
    """1 where the predicted label name is the gold one."""
    return np.array([int(p == g) for p, g in zip(predicted, gold, strict=True)])


# --- sft: exact match of the greedy answer --------------------------------------------------------------------------

def verify_sft(run: RunFolder, exported: ExportedFile, size: int | None) -> Paired:
    """The run's and the file's exact match on each eval row of an sft run, greedy answers in both."""
    from tunelab.data.generative import load_generative_data
    from tunelab.data.sft_encoding import fit_prompts
    from tunelab.inference.generator import load_generator

    if exported.fmt == "onnx":
        raise TunelabError(f"export: --verify of an sft run reads hf or gguf exports; '{exported.folder}' is onnx")
    data = run.recipe.data
    generator = load_generator(run.path)
    fmt = generator.prompt
    max_length = run.recipe.model.max_length
    evaluation = fit_prompts(fmt, load_generative_data(data).eval, max_length, "eval", data.drop_long)
    rows = first_rows(evaluation, size)
    settings = run.recipe.eval.generate.model_copy(
        update={"temperature": 0.0})
    references = list(rows["response"])
    say(f"tunelab: verify: generating answers to {len(rows)} eval rows with the run's model")
    own = generate_texts(generator.model, generator.tokenizer, [fmt.prompt_text(row) for row in rows], settings,
                         bf16=False, add_special_tokens=not fmt.uses_chat_template, desc="verify: run")
    say(f"tunelab: verify: generating them through the {exported.label} export")
    turns = [row["messages"][:-1] for row in rows] if fmt.uses_chat_template else list(rows["prompt"])
    imports = None
    if exported.fmt == "gguf" and llama_cpp_available():
        runtime = "llama.cpp (llama-cpp-python)"
        answers = llama_cpp_answers(exported.gguf, turns, fmt.uses_chat_template, settings, max_length)
        template, eos = gguf_template_and_eos(exported.gguf)
    else:
        answer = fresh_process({"kind": "decoder", "folder": str(exported.folder),
                                "gguf_file": exported.gguf.name if exported.gguf else None,
                                "chat": fmt.uses_chat_template, "prompts": turns,
                                "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size})
        answers, template, eos, imports = answer["answers"], answer["template"], answer["eos"], answer["modules"]
        runtime = "transformers' GGUF loader" if exported.gguf else "transformers in a fresh process"
    return Paired(len(rows), "exact_match", Scores(exact_matches(own, references), own),
                  FileScores(exact_matches(answers, references), answers, runtime, template, eos, imports),
                  template=fmt.chat_template, eos=generator.tokenizer.eos_token)


def exact_matches(answers: list[str], references: list[str]) -> np.ndarray:
    """1 where the answer equals the reference after the normalisation the run's exact_match uses."""
    return np.array([int(normalise_answer(a) == normalise_answer(r)) for a, r in zip(answers, references,
                                                                                       strict=True)])


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (the optional extra `tunelab[llama]`)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_answers(path: Path, prompts: list, chat: bool, settings: GenerateConfig, max_length: int) -> list[str]:
    """Greedy answers from llama.cpp: chat turns through create_chat_completion, which renders them with the
    file's own chat template and stops at the file's EOS; plain prompts through create_completion."""
    from llama_cpp import Llama

    model = Llama(model_path=str(path), n_ctx=max_length + settings.max_new_tokens, n_threads=torch.get_num_threads(),
                  verbose=False)
    greedy = {"max_tokens": settings.max_new_tokens, "temperature": 0.0, "repeat_penalty": 1.0}
    answers = []
    for prompt in prompts:
        if chat:
            answers.append(model.create_chat_completion(messages=prompt, **greedy)["choices"][0]["message"]
                           .get("content") or "")
        else:
            answers.append(model.create_completion(prompt, **greedy)["choices"][0]["text"])
    return [answer.strip() for answer in answers]


# --- shared ---------------------------------------------------------------------------------------------------------

def first_rows(rows, size: int | None):
    """The eval split, or its first `size` rows."""
    return rows if size is None or size >= len(rows) else rows.select(range(size))


def fresh_process(request: dict) -> dict:
    """Run FRESH_PROCESS on `request` in a new interpreter (same environment, no tunelab import) and return its
    answer; a failure is one line naming the last thing the process said."""
    request = {**request, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="tunelab-verify-") as scratch:
        asked, answered = Path(scratch) / "request.json", Path(scratch) / "answer.json"
        asked.write_text(json.dumps(request, ensure_ascii=False), encoding="utf-8")
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(asked), str(answered)], cwd=scratch,
                              env=env, capture_output=True, text=True)
        if done.returncode != 0 or not answered.is_file():
            said = (done.stderr.strip().splitlines() or ["(nothing)"])[-1]
            raise TunelabError(f"export: --verify could not run the export in a fresh transformers process: {said}")
        return json.loads(answered.read_text(encoding="utf-8"))


def comparison(run: RunFolder, exported: ExportedFile, paired: Paired) -> dict:
    """verify.json: both scores with intervals, the paired difference file − run, McNemar's p-value, the file's
    template / EOS against the run's, a few rows that differ, and the console lines."""
    own, file, rows = paired.run, paired.file, paired.rows
    difference = paired_gain((own.right,), (file.right,), mean_of)
    mismatches = []
    if paired.template is not None and file.template != paired.template:
        mismatches.append("chat template" if file.template else "chat template (the file has none)")
    if paired.eos is not None and file.eos != paired.eos:
        mismatches.append(f"EOS token ('{file.eos}' in the file, '{paired.eos}' in the run)")
    differing = [i for i, (a, b) in enumerate(zip(own.outputs, file.outputs, strict=True)) if a != b]
    result = {
        "format": exported.fmt, "quantize": exported.quantize, "runtime": file.runtime,
        "fresh_process_imported": file.imports, "rows": rows,
        "metric": paired.metric, "run_folder": str(run.path),
        "run": {"value": float(own.right.mean()), **mean_interval(own.right)},
        "file": {"value": float(file.right.mean()), **mean_interval(file.right)},
        "difference": difference,
        "p_value": round(mcnemar_p_value(own.right > 0, file.right > 0), 6),
        "same_outputs": round(1 - len(differing) / rows, 6) if rows else 1.0,
        "template_and_eos": {"checked": paired.template is not None or paired.eos is not None, "differ": mismatches},
        "differences": [{"row": i, "run": own.outputs[i], "file": file.outputs[i]}
                        for i in differing[:SHOWN_DIFFERENCES]],
    }
    result["summary"] = summary_line(exported, result)
    result["warnings"] = warning_lines(exported, result, mismatches)
    return result


def summary_line(exported: ExportedFile, result: dict) -> str:
    """'verify (gguf q8_0 via transformers' GGUF loader, 212 rows): exact_match run 0.825 → file 0.821 (−0.005
    [−0.019, +0.009], no significant change)'."""
    gain = result["difference"]
    verdict = ("no significant change" if not gain["significant"]
               else "significant drop" if gain["value"] < 0 else "significant gain")
    return (f"verify ({exported.label} via {result['runtime']}, {result['rows']} rows): {result['metric']} run "
            f"{result['run']['value']:.3f} → file {result['file']['value']:.3f} ({signed(gain['value'])} "
            f"[{signed(gain['low'])}, {signed(gain['high'])}], {verdict})")


def warning_lines(exported: ExportedFile, result: dict, mismatches: list[str]) -> list[str]:
    """A line naming the likely cause when the file is significantly worse; a note when template / EOS differ."""
    gain = result["difference"]
    differ, agree = " and ".join(mismatches), "do" if len(mismatches) > 1 else "does"
    if not (gain["significant"] and gain["value"] < 0):
        return [f"note: the file's {differ} {agree} not match the run's tokenizer, though the score did not drop "
                f"significantly"] if mismatches else []
    worse = f"warning: the {exported.label} file scores {result['metric']} {signed(gain['value'])} below the run"
    if mismatches:
        cause = (f"the file's {differ} {agree} not match the run's tokenizer, so prompts are rendered or answers "
                 f"stopped unlike in training — export again from the run, checking its tokenizer's eos_token and "
                 f"data.chat_template")
    elif exported.quantize in QUANTIZED:
        cause = f"quantization to {exported.quantize} — export with --quantize q8_0 or f16"
    elif result["metric"] == "accuracy":
        cause = (f"the {exported.fmt} model or its tokenizer (max_length, truncation) differs from the run's — "
                 f"compare with --format hf")
    else:
        cause = (f"the chat template / EOS as {result['runtime']} applies them (the file's own template and EOS equal "
                 f"the run's), or the {exported.quantize or exported.fmt} weights")
    return [f"{worse}; likely cause: {cause}"]
