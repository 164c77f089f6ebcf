"""Seeded, stratified subsets: subsampling a split, holding out an eval split, and k shots per class."""

from __future__ import annotations

import random
from collections import Counter

import datasets
from sklearn.model_selection import train_test_split

from tunelab.errors import TunelabError


def stratified_indices(labels: list, size: int, seed: int) -> tuple[list[int], list[int]]:
    """Split row indices into (chosen, rest) with `size` chosen, keeping label proportions where possible."""
    indices = list(range(len(labels)))
    if size >= len(labels):
        return indices, []
    counts = Counter(labels)
    can_stratify = min(counts.values()) >= 2 and len(counts) <= size <= len(labels) - len(counts)
    chosen, rest = train_test_split(indices, train_size=size, random_state=seed,
                                    stratify=labels if can_stratify else None)
    return sorted(chosen), sorted(rest)


def stratified_subsample(dataset: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """At most `size` rows of a labelled dataset (column `label`), stratified and seeded."""
    if size is None or size >= len(dataset):
        return dataset
    chosen, _ = stratified_indices(dataset["label"], size, seed)
    return dataset.select(chosen)


def stratified_holdout(dataset: datasets.Dataset, fraction: float, seed: int
                       ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a labelled dataset into (train, held-out) with `fraction` of the rows held out, stratified."""
    held_size = max(1, round(len(dataset) * fraction))
    held, kept = stratified_indices(dataset["label"], held_size, seed)
    return dataset.select(kept), dataset.select(held)


def sample_shots(dataset: datasets.Dataset, shots: int, seed: int, labels: list[str]) -> datasets.Dataset:
    """Exactly `shots` rows of every class in `labels` (column `label` holds indices), seeded; rows keep their order.

    A class with fewer rows is refused rather than silently under-sampled: the run would not be k-shot.
    """
    by_class: dict[int, list[int]] = {index: [] for index in range(len(labels))}
    for row, label in enumerate(dataset["label"]):
        by_class[label].append(row)
    short = [(labels[index], len(rows)) for index, rows in by_class.items() if len(rows) < shots]
    if short:
        name, count = min(short, key=lambda item: item[1])
        more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
        raise TunelabError(f"data.shots is {shots} but class '{name}' has only {count} training rows{more}; "
                           f"lower data.shots to at most {count} or add rows")
    rng = random.Random(seed)
    chosen = sorted(row for rows in by_class.values() for row in rng.sample(rows, shots))
    return dataset.select(chosen)
