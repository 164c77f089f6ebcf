"""Generation-based scores: generate answers for eval prompts, then exact match and ROUGE-L against references."""

from __future__ import annotations

import math
from collections.abc import Callable

from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from tunelab.console import interactive, is_quiet
from tunelab.evaluation.uncertainty import ROWS_KEY
from tunelab.generation.engine import answer_all, decoder_for
from tunelab.generation.sampling import Sampling
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


def generate_texts(model, tokenizer, prompts: list[str], cfg: GenerateConfig, bf16: bool,
                   add_special_tokens: bool = True, desc: str = "generating") -> list[str]:
    """Answer each prompt and return only the new text, special tokens removed, through tunelab's generation engine
    (at most cfg.batch_size answers decode at once; a finished one's place goes to the next prompt)."""
    if not prompts:
        return []
    model.eval()
    decoder = decoder_for(model, tokenizer, bf16)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    sampling = Sampling(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    with tqdm(total=len(prompts), desc=desc, leave=False, disable=is_quiet() or not interactive()) as bar:
        return answer_all(decoder, prompt_ids, sampling, cfg.batch_size, bar.update)
