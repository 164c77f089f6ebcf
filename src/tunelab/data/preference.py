"""Preference data for reward models, DPO and KTO: every row becomes prompt / chosen / rejected text, or (KTO's
unpaired layout) prompt / completion / label, a response marked good (true) or bad (false).

A source with a prompt column holds the shared prompt there and only the two responses in chosen/rejected (the
TRL layout of hh-rlhf). Without one, chosen and rejected are whole transcripts; their longest common prefix,
cut back to a word boundary, becomes the prompt, so both layouts train and score the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from tunelab.data.generative import load_replay, random_subsample
from tunelab.data.sources import load_splits, split_off_validation, train_and_eval
from tunelab.errors import TunelabError
from tunelab.recipe import DataConfig


@dataclass
class PreferenceData:
    """Train and eval rows (pairs: prompt/chosen/rejected; unpaired: prompt/completion/label) and where the eval
    rows came from."""

    train: datasets.Dataset
    eval: datasets.Dataset
    eval_split: str
    has_prompt_column: bool
    dropped: int = 0
    paired: bool = True
    validation: datasets.Dataset | None = None  # picks the checkpoint (task reward); never the reported `eval` rows
    validation_split: str | None = None
    replay: datasets.Dataset | None = None  # general text replayed during training (data.replay): a `text` column


def load_preference_data(cfg: DataConfig, unpaired_ok: bool = False) -> PreferenceData:
    """Read, check, normalise and subsample the pairs of a reward, dpo or kto recipe (kto, `unpaired_ok`, also
    takes prompt/completion/label rows), with data.replay's texts when it has them."""
    data = read_preference_data(cfg, unpaired_ok)
    if cfg.replay is not None:
        data.replay = load_replay(cfg.replay, len(data.train), cfg.seed)
    return data


def read_preference_data(cfg: DataConfig, unpaired_ok: bool) -> PreferenceData:
    """The pairs (or, for kto, judged completions) of the source, normalised and subsampled."""
    splits = load_splits(cfg.source)
    columns = splits[cfg.train_split].column_names
    missing = [f"'{name}' (data.{key})" for key, name in (("chosen", cfg.chosen), ("rejected", cfg.rejected))
               if name not in columns]
    if missing and unpaired_ok and cfg.completion in columns and cfg.label in columns:
        return load_unpaired(splits, cfg)
    if missing:
        unpaired = (", or data.completion / data.label to a response column and a column marking it good (true) or "
                    "bad (false)") if unpaired_ok else ""
        raise TunelabError(f"column {' and '.join(missing)} not in split '{cfg.train_split}' (columns: "
                           f"{', '.join(columns)}); set data.chosen / data.rejected to the preferred and dispreferred "
                           f"response columns{unpaired}")
    has_prompt = cfg.prompt in columns
    return split_and_sample(splits, cfg, has_prompt, normalise_pairs, paired=True)


def split_and_sample(splits: datasets.DatasetDict, cfg: DataConfig, has_prompt: bool, normalise,
                     paired: bool) -> PreferenceData:
    """Normalise the train and eval splits (or hold out part of train), then subsample both."""
    train, evaluation, eval_name, dropped = train_and_eval(
        splits, cfg, lambda split, name: normalise(split, cfg, has_prompt, name))
    train, validation, validation_name = split_off_validation(
        cfg, splits, eval_name, train, lambda split, name: normalise(split, cfg, has_prompt, name)[0])
    return PreferenceData(train=random_subsample(train, cfg.train_size, cfg.seed),
                          eval=random_subsample(evaluation, cfg.eval_size, cfg.seed), eval_split=eval_name,
                          has_prompt_column=has_prompt, dropped=dropped, paired=paired, validation=validation,
                          validation_split=validation_name)


def normalise_pairs(split: datasets.Dataset, cfg: DataConfig, has_prompt: bool,
                    name: str) -> tuple[datasets.Dataset, int]:
    """The split as prompt/chosen/rejected strings; rows without a real choice are dropped or refused."""
    rows = []
    unusable = []
    for number, row in enumerate(split, start=1):
        chosen, rejected = str(row[cfg.chosen] or ""), str(row[cfg.rejected] or "")
        prompt = str(row[cfg.prompt] or "") if has_prompt else shared_prefix(chosen, rejected)
        if not has_prompt:
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
        if not chosen.strip() or not rejected.strip() or chosen == rejected:
            unusable.append(number)
            continue
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if unusable and not cfg.drop_empty:
        raise TunelabError(f"{len(unusable)} of {len(split)} rows in split '{name}' have an empty or identical "
                           f"chosen/rejected response (first: row {unusable[0]}); set data.drop_empty: true to drop "
                           f"them")
    if not rows:
        raise TunelabError(f"split '{name}' has no usable preference pairs")
    return datasets.Dataset.from_list(rows), len(unusable)


def shared_prefix(chosen: str, rejected: str) -> str:
    """The prompt two whole transcripts share: their common prefix, cut back to the last whitespace in it."""
    length = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        length += 1
    if length == min(len(chosen), len(rejected)):  # one transcript continues the other
        return chosen[:length]
    cut = max(chosen.rfind(" ", 0, length), chosen.rfind("\n", 0, length))
    return chosen[:cut + 1] if cut >= 0 else ""


def load_unpaired(splits: datasets.DatasetDict, cfg: DataConfig) -> PreferenceData:
    """KTO's unpaired rows: prompt (empty without a prompt column) / completion / label as a bool."""
    data = split_and_sample(splits, cfg, cfg.prompt in splits[cfg.train_split].column_names, normalise_unpaired,
                            paired=False)
    for name, rows in ((cfg.train_split, data.train), (data.eval_split, data.eval)):
        if len(set(rows["label"])) < 2:
            raise TunelabError(f"split '{name}' has only {'good' if rows['label'][0] else 'bad'} completions; KTO "
                               f"needs both good (true) and bad (false) ones in data.{cfg.label}")
    return data


GOOD_LABELS = {"true": True, "1": True, "good": True, "false": False, "0": False, "bad": False}


def normalise_unpaired(split: datasets.Dataset, cfg: DataConfig, has_prompt: bool,
                       name: str) -> tuple[datasets.Dataset, int]:
    """The split as prompt/completion/label rows; empty completions are dropped or refused, unknown labels refused."""
    rows, unusable = [], []
    for number, row in enumerate(split, start=1):
        completion = str(row[cfg.completion] or "")
        if not completion.strip():
            unusable.append(number)
            continue
        label = GOOD_LABELS.get(str(row[cfg.label]).strip().lower())
        if label is None:
            raise TunelabError(f"row {number} of split '{name}' has {cfg.label} = {row[cfg.label]!r}; KTO labels "
                               f"mark a completion good or bad: true/false, 1/0 or good/bad")
        rows.append({"prompt": str(row[cfg.prompt] or "") if has_prompt else "", "completion": completion,
                     "label": label})
    if unusable and not cfg.drop_empty:
        raise TunelabError(f"{len(unusable)} of {len(split)} rows in split '{name}' have an empty completion (first: "
                           f"row {unusable[0]}); set data.drop_empty: true to drop them")
    if not rows:
        raise TunelabError(f"split '{name}' has no usable completions")
    return datasets.Dataset.from_list(rows), len(unusable)
