"""The study's own data folders: what the trials train and are judged on, and what the final runs report.

Before any trial, the source is read with its reported split left unread and written into the study folder:

    data/search/train.jsonl       train, less the validation rows (and less the reported rows when they are a
                                  hold-out of train)
    data/search/validation.jsonl  the validation rows: the source's validation split, or a seeded slice of train
    data/search/test.jsonl        the same validation rows: a trial "reports" its validation score
    data/final/…                  the same train and validation files; test.jsonl (the reported rows) only once
                                  the search is over (`write_reported_rows`)

Every trial is then an ordinary `tunelab train` run on data/search, so the stages need no change and the reported
split cannot reach a trial: it is not in the folder the trials read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets

from tunelab.data.sources import eval_split_name, load_splits, split_names, validation_split_name
from tunelab.data.subsets import stratified_indices
from tunelab.errors import TunelabError
from tunelab.recipe import Recipe

SEARCH, FINAL = "search", "final"
DEFAULT_VALIDATION_FRACTION = 0.2  # without a validation split or data.validation_fraction: a fifth of train
LAYOUT_FILE = "layout.json"  # what data/ holds and where each part came from


@dataclass
class DataLayout:
    """Where the study's rows came from, for study.json and the report."""

    source: str
    validation: str  # the source's split, or "train (validation 20%)"
    reported: str  # the source's split, or "train (held-out 20%)"
    reported_is_split: bool  # True: the reported rows are a split of the source, read only after the search
    train_rows: int
    validation_rows: int


def prepare_search_data(recipe: Recipe, data_dir: Path) -> DataLayout:
    """Write data/search and data/final's train and validation files from the recipe's source (its reported split
    unread); return the layout. A study folder that has them already (a resumed study) keeps them."""
    if (data_dir / LAYOUT_FILE).is_file():
        return DataLayout(**json.loads((data_dir / LAYOUT_FILE).read_text(encoding="utf-8")))
    cfg = recipe.data
    if cfg.streaming:
        raise TunelabError("tunelab tune reads the data into memory to carve its validation rows; drop "
                           "data.streaming for the search (the best recipe can stream again)")
    names = split_names(cfg.source)
    reported = eval_split_name(cfg, dict.fromkeys(names))
    splits = load_splits(cfg.source, skip=(reported,) if reported else ())
    train = splits[cfg.train_split]
    held_out = None
    if reported is None:  # the reported rows are a hold-out of train: carve them first, exactly once
        train, held_out = carve(train, cfg.holdout_fraction, cfg.seed, label_column(recipe))
    validation_name = validation_split_name(cfg, splits, reported)
    if validation_name is not None:
        validation = splits[validation_name]
    else:
        fraction = cfg.validation_fraction or DEFAULT_VALIDATION_FRACTION
        train, validation = carve(train, fraction, cfg.seed, label_column(recipe))
        validation_name = f"{cfg.train_split} (validation {fraction:.0%})"
    if len(train) < 2 or len(validation) < 2:
        raise TunelabError(f"'{cfg.source}' has too few rows to search on ({len(train)} train, {len(validation)} "
                           f"validation); give more rows or a validation split")
    for part in (SEARCH, FINAL):
        write_rows(train, data_dir / part / "train.jsonl")
        write_rows(validation, data_dir / part / "validation.jsonl")
    write_rows(validation, data_dir / SEARCH / "test.jsonl")
    if held_out is not None:
        write_rows(held_out, data_dir / FINAL / "test.jsonl")
    layout = DataLayout(
        source=cfg.source, validation=validation_name, reported_is_split=reported is not None,
        reported=reported or f"{cfg.train_split} (held-out {cfg.holdout_fraction:.0%})",
        train_rows=len(train), validation_rows=len(validation))
    (data_dir / LAYOUT_FILE).write_text(json.dumps(asdict(layout), indent=2), encoding="utf-8")
    return layout


def write_reported_rows(recipe: Recipe, data_dir: Path, layout: DataLayout) -> None:
    """data/final/test.jsonl: the reported split, read now that the search is over (a hold-out of train was
    written with the rest)."""
    target = data_dir / FINAL / "test.jsonl"
    if layout.reported_is_split and not target.is_file():
        write_rows(load_splits(recipe.data.source)[layout.reported], target)


def search_data(raw: dict, data_dir: Path, part: str) -> dict:
    """A copy of the raw recipe reading data/`part`: train on train, pick checkpoints on validation, report test."""
    return {**raw, "data": {**(raw.get("data") or {}), "source": str(data_dir / part), "train_split": "train",
                            "eval_split": "test", "validation_split": "validation", "validation_fraction": None}}


def label_column(recipe: Recipe) -> str | None:
    """The column a carve keeps the class proportions of: the label of a labelled task, else none."""
    return recipe.data.label if recipe.entry.labels else None


def carve(rows: datasets.Dataset, fraction: float, seed: int, stratify_on: str | None
          ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, carved): `fraction` of the rows, seeded, keeping the classes' proportions when `stratify_on` names a
    column present (the rules `train` uses for its hold-outs)."""
    size = max(1, round(len(rows) * fraction))
    if stratify_on is not None and stratify_on in rows.column_names:
        chosen, rest = stratified_indices([str(value) for value in rows[stratify_on]], size, seed)
        return rows.select(rest), rows.select(chosen)
    parts = rows.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def write_rows(rows: datasets.Dataset, path: Path) -> None:
    """One split as JSON lines (every column kept, nested ones too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_json(str(path), lines=True, force_ascii=False)
