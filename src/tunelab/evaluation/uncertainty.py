"""95% confidence intervals for headline metrics and for the change training made, by bootstrap over eval rows.

On 212 eval rows one row is 0.47 accuracy points, so a score without an interval cannot say whether a change is
real. Each headline metric gets a percentile bootstrap interval before and after; the gain gets a *paired*
bootstrap (the same resampled rows scored before and after), which is much tighter than comparing two separate
intervals because both scores share the rows' difficulty. For 0/1 metrics McNemar's exact test (a binomial test
on the rows that changed) gives a p-value beside it. scipy does the resampling.

Stages put the per-row outcomes under `per_row` in their score dicts: `gold` / `predicted` (classification:
accuracy and macro-F1) or one list per mean metric (exact_match, pairwise_accuracy, ...). `compare` pops them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy.stats import binomtest, bootstrap

CONFIDENCE = 0.95
RESAMPLES = 2000  # the interval ends move by about 0.1 point between seeds at this count
SEED = 0  # fixed: the same scores always get the same interval
ROWS_KEY = "per_row"
BINARY_METRICS = ("accuracy", "exact_match", "pairwise_accuracy", "preference_accuracy", "label_accuracy")

Statistic = Callable[..., np.ndarray]


def classification_rows(gold, predicted) -> dict:
    """The per-row record of a classifier's score (gold and predicted label ids)."""
    return {ROWS_KEY: {"gold": [int(g) for g in gold], "predicted": [int(p) for p in predicted]}}


def mean_of(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """The statistic of a mean metric (vectorised over resamples)."""
    return np.mean(values, axis=axis)


def accuracy_of(gold: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """Accuracy (vectorised over resamples)."""
    return np.mean(gold == predicted, axis=axis)


def macro_f1_of(labels: int) -> Statistic:
    """Macro-F1 over `labels` classes as sklearn computes it with zero_division=0 (vectorised over resamples)."""

    def statistic(gold: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
        total = 0.0
        for label in range(labels):
            is_gold, is_predicted = gold == label, predicted == label
            tp = np.sum(is_gold & is_predicted, axis=axis)
            wrong = np.sum(is_gold ^ is_predicted, axis=axis)
            denominator = 2 * tp + wrong
            total = total + np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
        return total / labels

    return statistic


def statistics_of(rows: dict, labels: int | None = None) -> dict[str, tuple[tuple[np.ndarray, ...], Statistic]]:
    """Each headline metric the per-row record allows: (its data arrays, its statistic)."""
    found = {}
    for key, values in rows.items():
        if key in ("gold", "predicted"):
            continue
        found[key] = ((np.asarray(values, dtype=float),), mean_of)
    if "gold" in rows and "predicted" in rows:
        gold, predicted = np.asarray(rows["gold"]), np.asarray(rows["predicted"])
        found["accuracy"] = ((gold, predicted), accuracy_of)
        count = labels or int(max(gold.max(initial=0), predicted.max(initial=0)) + 1)
        found["macro_f1"] = ((gold, predicted), macro_f1_of(count))
    return found


def interval(data: tuple[np.ndarray, ...], statistic: Statistic) -> dict:
    """The 95% percentile-bootstrap interval of statistic(*data), rows resampled together."""
    if len(data[0]) < 2:
        value = float(statistic(*data))
        return {"low": value, "high": value}
    with warnings.catch_warnings():  # a constant statistic (every row right) is a valid, zero-width interval
        warnings.simplefilter("ignore")
        result = bootstrap(data, statistic, paired=True, vectorized=True, confidence_level=CONFIDENCE,
                           n_resamples=RESAMPLES, method="percentile", rng=np.random.default_rng(SEED))
    low, high = result.confidence_interval
    return {"low": round(float(low), 6), "high": round(float(high), 6)}


def mean_interval(values) -> dict:
    """The 95% interval of a mean over rows (e.g. a win rate from per-prompt wins 1, ties 0.5, losses 0)."""
    return interval((np.asarray(values, dtype=float),), mean_of)


def paired_gain(before: tuple[np.ndarray, ...], after: tuple[np.ndarray, ...], statistic: Statistic) -> dict:
    """statistic(after) − statistic(before) with a paired bootstrap interval; significant when it excludes 0."""
    width = len(before)

    def difference(*arrays: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(*arrays[width:], axis=axis) - statistic(*arrays[:width], axis=axis)

    value = float(difference(*before, *after))
    bounds = interval((*before, *after), difference)
    return {"value": round(value, 6), **bounds, "significant": bool(bounds["low"] > 0 or bounds["high"] < 0)}


def mcnemar_p_value(right_before: np.ndarray, right_after: np.ndarray) -> float:
    """McNemar's exact test: of the rows that changed, are gains and losses equally likely? (1.0: none changed)."""
    gained = int(np.sum(~right_before & right_after))
    lost = int(np.sum(right_before & ~right_after))
    if gained + lost == 0:
        return 1.0
    return float(binomtest(gained, gained + lost, 0.5).pvalue)


def correct_rows(data: tuple[np.ndarray, ...]) -> np.ndarray:
    """Per-row right/wrong of a 0/1 metric's data (gold/predicted, or the 0/1 values themselves)."""
    return data[0] == data[1] if len(data) == 2 else data[0] > 0.5


def compare(before: dict, after: dict, labels: int | None = None) -> dict:
    """metrics.json's `intervals` (each headline metric before and after) and `gain` (paired, with McNemar's
    p-value for 0/1 metrics), from the per-row records the two score dicts carry (popped from them)."""
    rows_before, rows_after = before.pop(ROWS_KEY, None), after.pop(ROWS_KEY, None)
    if not rows_before or not rows_after:
        return {}
    stats_before, stats_after = statistics_of(rows_before, labels), statistics_of(rows_after, labels)
    intervals, gains = {}, {}
    for name, (data_after, statistic) in stats_after.items():
        if name not in stats_before or len(stats_before[name][0][0]) != len(data_after[0]):
            continue
        data_before = stats_before[name][0]
        intervals[name] = {"before": interval(data_before, statistic), "after": interval(data_after, statistic)}
        gains[name] = paired_gain(data_before, data_after, statistic)
        if name in BINARY_METRICS:
            gains[name]["p_value"] = round(mcnemar_p_value(correct_rows(data_before), correct_rows(data_after)), 6)
    return {"intervals": intervals, "gain": gains} if intervals else {}


def describe_gain(gain: dict) -> str:
    """' (+0.0943 [+0.050, +0.140])', or ', no significant change (+0.0047 [-0.020, +0.030])' when the paired
    interval includes 0: the words a console line puts after 'before → after'."""
    text = f"({gain['value']:+.4f} [{gain['low']:+.3f}, {gain['high']:+.3f}])"
    return f" {text}" if gain["significant"] else f", no significant change {text}"
