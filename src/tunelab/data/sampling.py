"""Seeded, stratified subsets: subsampling a split and holding out an eval split."""

from __future__ import annotations

from collections import Counter

import datasets
from sklearn.model_selection import train_test_split


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
