"""What every stage writes into its run folder: the cached baseline score, predictions.jsonl, the model folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tunelab.data.labelled import LabelledData
from tunelab.runs.folder import write_json_atomic, write_jsonl_atomic

BASELINE_FILE = "baseline.json"


def load_or_score_baseline(run_dir: Path, score: Callable[[], dict], name: str = BASELINE_FILE) -> dict:
    """Score the untrained model once; a resumed run reuses the score its first attempt saved."""
    path = run_dir / name
    if path.is_file():
        return json.loads(path.read_text())
    before = score()
    write_json_atomic(path, before)
    return before


def write_predictions(run_dir: Path, data: LabelledData, probabilities: np.ndarray) -> None:
    """predictions.jsonl: text, gold, predicted label and its probability, for every eval row."""
    rows = []
    for i, row in enumerate(data.eval):
        best = int(probabilities[i].argmax())
        rows.append({"text": row["text"], **({"text_pair": row["text_pair"]} if "text_pair" in row else {}),
                     "gold": data.labels[row["label"]], "predicted": data.labels[best],
                     "probability": round(float(probabilities[i, best]), 6)})
    write_jsonl_atomic(run_dir / "predictions.jsonl", rows)


def save_folder_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a staging folder beside `target`, then rename it into place: never a half-saved model."""
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
