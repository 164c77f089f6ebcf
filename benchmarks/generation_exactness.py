"""Exactness per weight format (issue 30's acceptance 2), side by side in one run: a finished sft run's own scoring
prompts (all of its eval samples, e.g. the symptom example's 212) answered greedily by tunelab's generation engine
in each weight format, against the fp32 reference (plain transformers `generate`, batches of the run's scoring
size; the compiled rows answer one prompt at a time, as a lone request is served). Per format: the share of answers
equal to the reference's, the run's task metric (exact match) with its 95% bootstrap interval, and the seconds the
answers took (the compiled rows' include compiling).

    PYTHONPATH=src TUNELAB_DATA_PATH=../shared/data .venv/bin/python benchmarks/generation_exactness.py RUN_DIR \
        [--only int8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tunelab.evaluation.generation import generate_texts, generation_metrics
from tunelab.evaluation.uncertainty import ROWS_KEY, mean_interval
from tunelab.generation.engine import answer_all, decoder_for
from tunelab.generation.sampling import Sampling
from tunelab.generation.weights import use_format
from tunelab.inference.generator import load_generator
from tunelab.models.precision import bf16_supported
from tunelab.runs.folder import finished_run
from tunelab.stages.sft import load_data

# name: (weight format, bf16 autocast, answers one at a time through compiled steps)
FORMATS = {
    "fp32 (serve --dtype float32; the default's choice on CPUs without native bf16)": ("float32", False, False),
    "bf16 autocast (the scoring's default where bf16 is native)": ("float32", True, False),
    "bf16 weights (serve --dtype bfloat16)": ("bfloat16", False, False),
    "int8 weights (serve --dtype int8; the default's choice on CPUs with native bf16)": ("int8", False, False),
    "fp32, compiled, one at a time (serve --dtype float32 --compile)": ("float32", False, True),
    "int8, compiled, one at a time (serve --dtype int8 --compile)": ("int8", False, True),
}


def reference(generator, prompts: list[str], batch_size: int, max_new_tokens: int, chat: bool) -> list[str]:
    """Plain transformers greedy `generate`, fp32, left-padded batches."""
    tokenizer, model = generator.tokenizer, generator.model
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=not chat)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            answers += [text.strip() for text in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                                      skip_special_tokens=True)]
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished sft run folder")
    parser.add_argument("--only", help="just the formats whose name holds this (e.g. int8); the reference always runs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    run = finished_run(args.run, "generation_exactness")
    recipe = run.recipe
    data = load_data(recipe)
    samples = data.eval.select(range(min(recipe.eval.generate.num_samples, len(data.eval))))
    generator = load_generator(run.path)
    prompts = [generator.prompt.prompt_text(row) for row in samples]
    chat = generator.prompt.uses_chat_template
    settings = recipe.eval.generate
    start = time.perf_counter()
    expected = reference(generator, prompts, settings.batch_size, settings.max_new_tokens, chat)
    results = {"run": str(run.path), "prompts": len(prompts), "threads": torch.get_num_threads(),
               "bf16 native": bf16_supported(), "reference": {"seconds": round(time.perf_counter() - start, 1),
                                                               **metric(expected, samples["response"])}}
    for name, (weights, autocast, compiled) in FORMATS.items():
        if (autocast or weights != "float32") and not bf16_supported():
            continue  # bf16 arithmetic is emulated here, ~100x slower
        if args.only and args.only not in name:
            continue
        model = use_format(load_generator(run.path).model.eval(), weights)
        start = time.perf_counter()
        if compiled:
            decoder = decoder_for(model, generator.tokenizer)
            decoder.compile_solo_steps()
            ids = generator.tokenizer(prompts, add_special_tokens=not chat)["input_ids"]
            answers = answer_all(decoder, ids, Sampling(max_tokens=settings.max_new_tokens), 1)
        else:
            answers = generate_texts(model, generator.tokenizer, prompts, settings, autocast,
                                     add_special_tokens=not chat)
        same = sum(a == b for a, b in zip(answers, expected, strict=True))
        results[name] = {"seconds": round(time.perf_counter() - start, 1), "equal to reference": same,
                         "equal share": round(same / len(prompts), 4), **metric(answers, samples["response"])}
        print(name, results[name], flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)


def metric(answers: list[str], references: list[str]) -> dict:
    scores = generation_metrics(answers, references)
    return {"exact_match": round(scores["exact_match"], 4),
            "exact_match 95% interval": mean_interval(scores[ROWS_KEY]["exact_match"])}


if __name__ == "__main__":
    main()
