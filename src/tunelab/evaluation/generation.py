"""Generation-based scores: generate answers for eval prompts, then exact match and ROUGE-L against references."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from tunelab.console import interactive, is_quiet
from tunelab.evaluation.uncertainty import ROWS_KEY
from tunelab.models.precision import autocast
from tunelab.recipe import GenerateConfig
from tunelab.rewards import normalise_answer


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """exact_match (normalised strings equal) and rouge_l (mean ROUGE-L F1) over paired answers."""
    if not predictions:
        return {}
    exact = [int(normalise_answer(p) == normalise_answer(r)) for p, r in zip(predictions, references, strict=True)]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return {"exact_match": sum(exact) / len(predictions), "rouge_l": sum(rouge) / len(rouge),
            ROWS_KEY: {"exact_match": exact, "rouge_l": rouge}}  # for the intervals (evaluation/uncertainty.py)


def score_generative(trainer, rows, samples, answer: Callable) -> dict:
    """Eval loss and perplexity of a Trainer's model on `rows` (encoded); with sample rows, also `answer(samples)`
    scored against their responses (kept under `generations`, for samples.jsonl)."""
    from tunelab.evaluation.token_loss import token_weighted_loss  # it scores with this module's autocast

    loss = token_weighted_loss(trainer, rows)
    scores = {"loss": loss, "perplexity": perplexity(loss)}
    if samples is not None and len(samples):
        answers = answer(samples)
        scores.update(generation_metrics(answers, samples["response"]), generations=answers)
    return scores


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy), capped so a diverged model still gives a finite number."""
    return math.exp(min(loss, 50.0))


# Sampling divides the logits by the temperature: a tiny one (1e-300 is a valid float) turns them into inf and the
# softmax into NaN, and `generate` raises. Floored here, the likeliest token gets probability ~1: greedy, as asked.
MIN_TEMPERATURE = 1e-6


def decoding_settings(temperature: float) -> dict:
    """`generate` keywords for a temperature: 0 is greedy, above 0 samples (floored at MIN_TEMPERATURE)."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": max(temperature, MIN_TEMPERATURE)}


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], cfg: GenerateConfig, bf16: bool,
                   add_special_tokens: bool = True, encoder_decoder: bool = False,
                   desc: str = "generating") -> list[str]:
    """Answer each prompt (batched) and return only the new text, special tokens removed.

    Decoders continue the prompt (left-padded, and the prompt is cut from the output); encoder-decoders read the
    prompt in the encoder and generate from scratch.
    """
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoders continue from the last real token
    outputs: list[str] = []
    try:
        for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=desc, leave=False,
                          disable=is_quiet() or not interactive()):  # a bar only on a terminal
            batch = tokenizer(prompts[start:start + cfg.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens).to(device)
            with autocast(bf16):
                generated = model.generate(**batch, max_new_tokens=cfg.max_new_tokens,
                                           pad_token_id=tokenizer.pad_token_id, **decoding_settings(cfg.temperature))
            new_tokens = generated if encoder_decoder else generated[:, batch["input_ids"].shape[1]:]
            outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return outputs
