"""Text pairs for embedding models (task embed): each row is a query and the text it should find (its positive),
optionally with a similarity score.

The recipe's usual column keys map them: `data.text` is the query column, `data.text_pair` the positive (document)
column and, for scored pairs (embed.loss cosent), `data.label` the score column. Rows come out with the columns
`query`, `positive` (and `score`), in that order: sentence-transformers' losses read the first columns as the texts
and a column named `score` as the label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import datasets

from tunelab.data.generative import random_subsample
from tunelab.data.sources import load_splits, train_and_eval
from tunelab.errors import TunelabError
from tunelab.recipe import DataConfig


@dataclass
class PairData:
    """Train and eval pairs (`query`, `positive`, and `score` when scored) and where the eval pairs came from."""

    train: datasets.Dataset
    eval: datasets.Dataset
    eval_split: str
    scored: bool
    dropped_empty: int = 0
    validation: None = None  # embed keeps its last checkpoint: no split picks one
    validation_split: None = None


def load_pair_data(cfg: DataConfig, scored: bool) -> PairData:
    """Read, check and subsample the (query, positive[, score]) pairs a recipe names, or raise a one-line
    TunelabError. The eval pairs are the source's eval split, or `holdout_fraction` of train held out (seeded)."""
    if cfg.text_pair is None:
        raise TunelabError("task embed trains on (query, positive) pairs, and data.text_pair is not set; set "
                           "data.text to the query column and data.text_pair to the column of the text each query "
                           "should find")
    splits = load_splits(cfg.source)
    train, evaluation, eval_name, dropped = train_and_eval(
        splits, cfg, lambda split, name: normalise_pairs(split, cfg, scored, name))
    evaluation = random_subsample(evaluation, cfg.eval_size, cfg.seed)
    if len(evaluation) < 2:
        raise TunelabError(f"eval split '{eval_name}' holds {len(evaluation)} pair; retrieval needs at least two "
                           f"(each query's positive is found among all the eval positives)")
    return PairData(train=random_subsample(train, cfg.train_size, cfg.seed), eval=evaluation, eval_split=eval_name,
                    scored=scored, dropped_empty=dropped)


def normalise_pairs(split: datasets.Dataset, cfg: DataConfig, scored: bool,
                    name: str) -> tuple[datasets.Dataset, int]:
    """The split as query/positive(/score) rows; rows with an empty text (or score) are dropped or refused."""
    if len(split) == 0:
        raise TunelabError(f"split '{name}' of '{cfg.source}' is empty; give a source with rows in it")
    columns = [("data.text", cfg.text), ("data.text_pair", cfg.text_pair)] + ([("data.label", cfg.label)]
                                                                               if scored else [])
    for field, column in columns:
        if column not in split.column_names:
            scores = " (the score of each pair, for embed.loss cosent)" if field == "data.label" else ""
            raise TunelabError(f"{field} column '{column}' is not in split '{name}' (columns: "
                               f"{', '.join(split.column_names)}); set {field} to one of them{scores}")
    rows, unusable = [], []
    for number, row in enumerate(split, start=1):
        query, positive = row[cfg.text], row[cfg.text_pair]
        if query is None or positive is None or not str(query).strip() or not str(positive).strip():
            unusable.append(number)
            continue
        pair = {"query": str(query), "positive": str(positive)}
        if scored:
            pair["score"] = read_score(row[cfg.label], cfg.label, number, name)
            if pair["score"] is None:
                unusable.append(number)
                continue
        rows.append(pair)
    if unusable and not cfg.drop_empty:
        raise TunelabError(f"{len(unusable)} of {len(split)} rows in split '{name}' have an empty query, positive"
                           f"{' or score' if scored else ''} (first: row {unusable[0]}); clean the data or set "
                           f"data.drop_empty: true to drop them")
    if not rows:
        raise TunelabError(f"split '{name}' has no usable pairs")
    return datasets.Dataset.from_list(rows), len(unusable)


def read_score(value: object, column: str, number: int, name: str) -> float | None:
    """A pair's similarity score as a float (None when missing); anything that is no number is refused."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = math.nan
    if isinstance(value, bool) or not math.isfinite(score):
        raise TunelabError(f"row {number} of split '{name}' has {column} = {value!r}; embed.loss cosent reads "
                           f"data.label as a similarity score: a number (e.g. 0–1 or 0–5)")
    return score
