"""Labelled text for classification: column mapping, label list, checks, subsampling, hold-out."""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from tunelab.data.sources import eval_split_name, load_splits, split_off_validation
from tunelab.data.subsets import sample_shots, stratified_holdout, stratified_subsample
from tunelab.errors import TunelabError
from tunelab.recipe import DataConfig


@dataclass
class LabelledData:
    """Train and eval rows with columns `text` (+ `text_pair`) and integer `label`, plus the label names."""

    train: datasets.Dataset
    eval: datasets.Dataset
    labels: list[str]
    eval_split: str
    dropped_empty: int = 0
    validation: datasets.Dataset | None = None  # picks the checkpoint; never the reported `eval` rows
    validation_split: str | None = None


def load_labelled_data(cfg: DataConfig) -> LabelledData:
    """Read, check and sample the data a classification recipe names, or raise a one-line TunelabError."""
    splits = load_splits(cfg.source)
    eval_name = eval_split_name(cfg, splits)

    train, dropped = clean_split(splits[cfg.train_split], cfg, cfg.train_split)
    labels = cfg.labels or infer_label_names(train[cfg.label])
    train = encode_labels(train, cfg, labels, cfg.train_split)
    if eval_name is not None:
        evaluation, dropped_eval = clean_split(splits[eval_name], cfg, eval_name)
        dropped += dropped_eval
        evaluation = encode_labels(evaluation, cfg, labels, eval_name)
    else:
        train, evaluation = stratified_holdout(train, cfg.holdout_fraction, cfg.seed)
        eval_name = f"{cfg.train_split} (held-out {cfg.holdout_fraction:.0%})"
    train, validation, validation_name = split_off_validation(
        cfg, splits, eval_name, train,
        lambda split, name: encode_labels(clean_split(split, cfg, name)[0], cfg, labels, name), stratified_holdout)

    train = stratified_subsample(train, cfg.train_size, cfg.seed)
    if cfg.shots is not None:
        train = sample_shots(train, cfg.shots, cfg.seed, labels)
    evaluation = stratified_subsample(evaluation, cfg.eval_size, cfg.seed)
    check_label_coverage(train, evaluation, labels, eval_name)
    return LabelledData(train=train, eval=evaluation, labels=labels, eval_split=eval_name, dropped_empty=dropped,
                        validation=validation, validation_split=validation_name)


def clean_split(split: datasets.Dataset, cfg: DataConfig, name: str) -> tuple[datasets.Dataset, int]:
    """Check the mapped columns exist and texts/labels are present; drop or refuse empty rows."""
    if len(split) == 0:
        raise TunelabError(f"split '{name}' of '{cfg.source}' is empty; give a source with rows in it")
    text_columns = [cfg.text] + ([cfg.text_pair] if cfg.text_pair else [])
    for field, column in [("data.text", cfg.text), ("data.text_pair", cfg.text_pair), ("data.label", cfg.label)]:
        if column is not None and column not in split.column_names:
            raise TunelabError(f"{field} column '{column}' is not in split '{name}' (columns: "
                               f"{', '.join(split.column_names)}); set {field} to one of them")
    split = split.select_columns(text_columns + [cfg.label])

    def is_empty(row: dict) -> bool:
        return row[cfg.label] is None or any(row[c] is None or not str(row[c]).strip() for c in text_columns)

    empty = sum(1 for row in split if is_empty(row))
    if empty and not cfg.drop_empty:
        raise TunelabError(f"{empty} of {len(split)} rows in split '{name}' have an empty text or label; "
                           f"clean the data or set data.drop_empty: true to drop them")
    if empty:
        split = split.filter(lambda row: not is_empty(row))
        if len(split) == 0:
            raise TunelabError(f"split '{name}' has no rows left after dropping {empty} empty ones")
    return split, empty


def infer_label_names(values: list) -> list[str]:
    """Label names found in the data: sorted strings, or integers in numeric order."""
    unique = set(values)
    if all(isinstance(v, int) for v in unique):
        return [str(v) for v in sorted(unique)]
    return sorted(str(v) for v in unique)


def encode_labels(split: datasets.Dataset, cfg: DataConfig, labels: list[str], name: str) -> datasets.Dataset:
    """Rename columns to text/text_pair/label and turn labels into indices into `labels`."""
    index = {label: i for i, label in enumerate(labels)}
    values = split[cfg.label]
    given_names = cfg.labels is not None
    encoded, unknown = [], set()
    for value in values:
        if isinstance(value, int) and given_names and not isinstance(value, bool):
            ok = 0 <= value < len(labels)
            encoded.append(value if ok else -1)
        else:
            encoded.append(index.get(str(value), -1))
        if encoded[-1] < 0:
            unknown.add(value)
    if unknown:
        shown = ", ".join(repr(v) for v in sorted(unknown, key=str)[:5])
        if not given_names:
            raise TunelabError(f"split '{name}' has labels never seen in the training split ({shown}); add training "
                               f"rows for them or drop them from the eval data")
        raise TunelabError(f"split '{name}' has labels not in data.labels ({shown}); add them to data.labels "
                           f"or remove data.labels to take the labels from the data")
    renamed = {cfg.text: "text", cfg.label: "label_raw"}
    if cfg.text_pair:
        renamed[cfg.text_pair] = "text_pair"
    split = split.rename_columns({old: new for old, new in renamed.items() if old != new})
    split = split.remove_columns("label_raw").add_column("label", encoded)
    return split.cast_column("label", datasets.Value("int64"))


def check_label_coverage(train: datasets.Dataset, evaluation: datasets.Dataset, labels: list[str],
                         eval_name: str) -> None:
    """Refuse a single-class training split and eval labels the model never sees in training."""
    seen = set(train["label"])
    if len(seen) < 2:
        only = labels[next(iter(seen))] if seen else "none"
        raise TunelabError(f"the training split has a single class ('{only}'); a classifier needs at least two "
                           f"(check data.label and data.train_size)")
    unseen = sorted({labels[i] for i in set(evaluation["label"]) - seen})
    if unseen:
        raise TunelabError(f"eval split '{eval_name}' has labels never seen in training: {', '.join(unseen[:5])}; "
                           f"add training rows for them, raise data.train_size, or drop them from the eval data")


def load_eval_split(cfg: DataConfig, split: str, labels: list[str]) -> datasets.Dataset:
    """One split of a source, checked and encoded against a trained model's labels (for `tunelab eval`)."""
    splits = load_splits(cfg.source)
    if split not in splits:
        raise TunelabError(f"--split '{split}' is not in '{cfg.source}' (splits: {', '.join(splits)})")
    rows, _ = clean_split(splits[split], cfg, split)
    rows = encode_labels(rows, cfg.model_copy(update={"labels": labels}), labels, split)
    return stratified_subsample(rows, cfg.eval_size, cfg.seed)
