"""In-context few-shot baseline: a decoder prompted with k labelled examples per class, no training.

The prompt lists the label names, then k examples per class (classes interleaved, seeded), then the row to
classify. Each label is scored by the log-likelihood the model gives its name as the continuation after
"Label:"; the most likely label is the prediction. The examples' key/value cache is computed once and shared by
every row, so a row costs a forward pass over its own tokens and the label names only.
"""

from __future__ import annotations

import inspect
import random
import time

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from tunelab.data.subsets import sample_shots
from tunelab.errors import TunelabError
from tunelab.evaluation.classification import classification_metrics
from tunelab.models.loading import is_decoder, load_tokenizer

HEADER = "Classify each text as one of: {labels}.\n\n"
EXAMPLE = "Text: {text}\nLabel: {label}\n\n"
QUERY = "Text: {text}\nLabel:"


def order_examples(shots: datasets.Dataset, labels: list[str], seed: int) -> list[tuple[str, str]]:
    """(text, label name) pairs with the classes interleaved, so no class has all the last (most recent) places."""
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {}
    for row in shots:
        by_class.setdefault(row["label"], []).append(" ".join(str(row["text"]).split()))
    for texts in by_class.values():
        rng.shuffle(texts)
    classes = sorted(by_class)
    rounds = []
    for index in range(max(len(texts) for texts in by_class.values())):
        rng.shuffle(classes)
        rounds += [(by_class[c][index], labels[c]) for c in classes if index < len(by_class[c])]
    return rounds


def build_prompt(examples: list[tuple[str, str]], labels: list[str]) -> str:
    """The shared part of every prompt: the task, the label names and the labelled examples."""
    return HEADER.format(labels=", ".join(labels)) + "".join(EXAMPLE.format(text=t, label=lab) for t, lab in examples)


@torch.inference_mode()
def label_log_likelihoods(model, tokenizer, prompt: str, texts: list[str], labels: list[str]) -> np.ndarray:
    """log P(" <label>" | prompt + query) for every text (rows) and label (columns), summed over label tokens."""
    prefix = tokenizer(prompt, return_tensors="pt").input_ids
    label_ids = [tokenizer(" " + label, add_special_tokens=False).input_ids for label in labels]
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(tokenizer(QUERY.format(text=t), add_special_tokens=False).input_ids) for t in texts)
    if limit and prefix.shape[1] + longest + max(map(len, label_ids)) > limit:
        raise TunelabError(f"the in-context prompt needs {prefix.shape[1] + longest} tokens but the model reads at "
                           f"most {limit}; give fewer examples (eval.in_context_shots, --in-context)")
    first_pass = model(prefix, use_cache=True)
    cache = first_pass.cache if hasattr(first_pass, "cache") else first_pass.past_key_values
    cache_arg = cache_argument(model)
    scores = np.zeros((len(texts), len(labels)), dtype=np.float64)
    for row, text in enumerate(texts):
        query = tokenizer(QUERY.format(text=" ".join(str(text).split())), add_special_tokens=False,
                          return_tensors="pt").input_ids
        out = model(query, **{cache_arg: cache}, use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        for column, ids in enumerate(label_ids):
            score = float(first[ids[0]])
            if len(ids) > 1:  # the label's later tokens, each predicted from the ones before it
                rest = model(torch.tensor([ids[:-1]]), **{cache_arg: cache}, use_cache=True)
                steps = torch.log_softmax(rest.logits[0].float(), dim=-1)
                score += float(steps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
                cache.crop(-(len(ids) - 1))  # back to prompt + query for the next label
            scores[row, column] = score
        cache.crop(-query.shape[1])  # back to the shared prompt for the next row
    return scores


def cache_argument(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def score_in_context(location: str, train: datasets.Dataset, evaluation: datasets.Dataset, labels: list[str],
                     shots: int, seed: int) -> dict:
    """Accuracy (and the other classification metrics) of the decoder prompted with `shots` examples per class."""
    if not is_decoder(location):
        raise TunelabError(f"eval.in_context_shots prompts a decoder, but '{location}' is an encoder; "
                           f"use a decoder model (e.g. smollm2-135m) or drop eval.in_context_shots")
    started = time.perf_counter()
    tokenizer = load_tokenizer(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    prompt = build_prompt(order_examples(sample_shots(train, shots, seed, labels), labels, seed), labels)
    scores = label_log_likelihoods(model, tokenizer, prompt, list(evaluation["text"]), labels)
    metrics = classification_metrics(evaluation["label"], scores.argmax(-1), labels)
    return {"shots": shots, "prompt_tokens": len(tokenizer(prompt).input_ids),
            "seconds": round(time.perf_counter() - started, 2), **metrics}
