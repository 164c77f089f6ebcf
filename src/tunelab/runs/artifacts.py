"""What every stage writes into its run folder: the cached baseline score, predictions.jsonl, the model folder, and
(decoders with eval.retention) the general ability retained."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tunelab.console import say
from tunelab.data.labelled import LabelledData
from tunelab.distributed import from_main, is_main_process
from tunelab.evaluation import retention
from tunelab.evaluation.uncertainty import ROWS_KEY, compare
from tunelab.models.precision import autocast
from tunelab.recipe import Recipe
from tunelab.runs.folder import CHECKPOINTS, METRICS_FILE, PER_ROW_FILE, write_json_atomic, write_jsonl_atomic
from tunelab.runs.reading import headline_changes
from tunelab.runs.report import samples_table, write_report
from tunelab.runs.tracking import log_summary

BASELINE_FILE = "baseline.json"
SAMPLES_FILE = "samples.jsonl"


def load_or_score_baseline(run_dir: Path, score: Callable[[], dict], name: str = BASELINE_FILE) -> dict:
    """Score the untrained model once; a resumed run reuses the score its first attempt saved. Under several
    processes rank 0's folder decides for all of them (scoring may be sharded: every rank must take part)."""
    path = run_dir / name
    saved = from_main(json.loads(path.read_text()) if is_main_process() and path.is_file() else None)
    if saved is not None:
        return saved
    before = score()
    if is_main_process():
        write_json_atomic(path, before)
    return before


def with_retention(score: Callable[[], dict], recipe: Recipe, trainer, tokenizer, bf16: bool) -> Callable[[], dict]:
    """`score`, and when eval.retention is on the general-ability probes of `trainer.model` as well (under
    "retention", with their seconds): a stage's before and after then carry them to finish_run. The probes are read
    now, so a missing probe file stops the run before any training."""
    config = recipe.eval.retention
    if not config.enabled:
        return score
    probes = retention.load_probes(config.probes, config.size, config.documents)
    described = ", ".join(f"{probe.name} ({len(probe.items)} {'items' if probe.multiple_choice else 'documents'})"
                          for probe in probes)

    def score_with_retention() -> dict:
        scores = score()
        say(f"tunelab: scoring general ability: {described}")
        started = time.perf_counter()
        with autocast(bf16):
            probed = retention.score_probes(trainer.model, tokenizer, probes, config.max_length, config.batch_size)
        scores["retention"] = {"probes": probed, "seconds": round(time.perf_counter() - started, 1)}
        return scores

    return score_with_retention


def retention_block(before: dict, after: dict) -> dict | None:
    """metrics.json's `retention`: each probe's headline scores before and after, their paired comparison, the
    one-line summary and the seconds both scorings took; taken out of the two score dicts (None when off)."""
    if "retention" not in after:
        return None
    first, second = before.pop("retention"), after.pop("retention")
    change = retention.compare(first["probes"], second["probes"])
    return {"before": {name: retention.headline(scores) for name, scores in first["probes"].items()},
            "after": {name: retention.headline(scores) for name, scores in second["probes"].items()},
            "change": change, "summary": retention.summarize(change),
            "seconds": round(first["seconds"] + second["seconds"], 1)}


def write_predictions(run_dir: Path, data: LabelledData, probabilities: np.ndarray) -> None:
    """predictions.jsonl: text, gold, predicted label and its probability, for every eval row (rank 0 writes)."""
    if not is_main_process():
        return
    rows = []
    for i, row in enumerate(data.eval):
        best = int(probabilities[i].argmax())
        rows.append({"text": row["text"], **({"text_pair": row["text_pair"]} if "text_pair" in row else {}),
                     "gold": data.labels[row["label"]], "predicted": data.labels[best],
                     "probability": round(float(probabilities[i, best]), 6)})
    write_jsonl_atomic(run_dir / "predictions.jsonl", rows)


def write_samples(run_dir: Path, prompts: list[str], references: list[str], before: dict,
                  after: dict) -> list[tuple[str, str]]:
    """samples.jsonl (prompt, reference, the answers before and after, taken out of the two score dicts) and the
    report section that shows them; nothing when no answers were generated."""
    if "generations" not in after or not is_main_process():
        return []
    path = run_dir / SAMPLES_FILE
    write_jsonl_atomic(path, [{"prompt": p, "reference": r, "before": b, "after": a} for p, r, b, a in zip(
        prompts, references, before.pop("generations"), after.pop("generations"), strict=True)])
    return [("Sample generations", samples_table(path))]


def finish_run(run_dir: Path, recipe: Recipe, metrics: dict, title: str, labels: list[str] | None = None,
               extra_sections: list[tuple[str, str]] | None = None) -> dict:
    """Add the intervals of the headline metrics and of their gain (from the per-row records the scores carry),
    write report.html, then metrics.json (last: its presence marks a finished run); drop checkpoints unless kept;
    hand the results to the recipe's trackers (train.report_to)."""
    retained = retention_block(metrics["before"], metrics["after"])
    if is_main_process() and metrics["after"].get(ROWS_KEY):  # the per-row outcomes, for paired comparisons later
        write_json_atomic(run_dir / PER_ROW_FILE, {when: metrics[when].get(ROWS_KEY) for when in ("before", "after")})
    metrics.update(compare(metrics["before"], metrics["after"], len(labels) if labels else None))
    metrics.setdefault("reported_on", metrics.get("eval_split"))
    metrics.setdefault("selected_on", None)
    if retained is not None:
        metrics["retention"] = retained
    if not is_main_process():  # one run, one folder: rank 0 writes it
        return metrics
    say(f"tunelab: after training: {headline_changes(metrics)}")
    if retained is not None:
        say(f"tunelab: {retained['summary']}")
    elif recipe.entry.decoder:
        say("tunelab: general ability (forgetting) was not measured; add eval.retention.enabled: true to the recipe "
            "(or add eval.retention.enabled=true to the train command) to score PIQA and WikiText before and after")
    write_report(run_dir, title, metrics, recipe.to_yaml(), labels, extra_sections)
    write_json_atomic(run_dir / METRICS_FILE, metrics)
    log_summary(run_dir, recipe, metrics)
    if not recipe.output.keep_checkpoints:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    return metrics


def save_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a staging folder beside `target`, then rename it into place: never a half-saved model."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
