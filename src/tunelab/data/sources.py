"""Find and read a dataset: a Hub id (resolved offline through TUNELAB_DATA_PATH), a file, or a folder of splits."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import datasets

from tunelab.errors import TunelabError, one_line
from tunelab.recipe import DataConfig

# File suffix → the `datasets` builder that reads it.
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_SEARCH_PATH = ("data", "../shared/data")
Split = datasets.Dataset | datasets.IterableDataset  # rows in memory, or a stream of them (data.streaming)


def data_search_path() -> list[Path]:
    """Folders where a Hub id `org/name` is looked up as `<folder>/name/`: TUNELAB_DATA_PATH, else the defaults."""
    env = os.environ.get("TUNELAB_DATA_PATH")
    entries = env.split(os.pathsep) if env else DEFAULT_SEARCH_PATH
    return [Path(entry).expanduser() for entry in entries if entry]


def find_local_copy(source: str) -> Path | None:
    """The local folder holding a Hub dataset, or None when no search-path folder has it. `org/hh-rlhf` is also
    found as `hh_rlhf` (local copies use underscores)."""
    name = source.rstrip("/").split("/")[-1]
    for folder in data_search_path():
        for candidate in dict.fromkeys([name, name.replace("-", "_")]):
            if (folder / candidate).is_dir():
                return folder / candidate
    return None


def load_splits(source: str, stream: str | None = None, skip: tuple[str, ...] = ()) -> dict[str, Split]:
    """Read every split of a data source into `datasets.Dataset`s keyed by split name; the split named `stream`
    (data.streaming's train split) becomes an IterableDataset instead, read from disk as it is iterated. Splits
    named in `skip` are left unread (`tunelab tune` never opens the split it reports until the search is over)."""
    path = Path(source).expanduser()
    if path.is_file():
        return {"train": read_file(path, streaming=stream == "train")}
    if path.is_dir():
        return read_split_folder(path, stream, skip)
    if _looks_like_path(source):
        raise TunelabError(f"data.source '{source}' does not exist; give an existing file or folder, or a Hub id")
    local = find_local_copy(source)
    if local is not None:
        return read_split_folder(local, stream, skip)
    return {name: split for name, split in _load_from_hub(source, stream).items() if name not in skip}


def split_names(source: str) -> list[str]:
    """The names of a source's splits, without reading their rows (a Hub dataset not found locally: its loaded
    splits)."""
    path = Path(source).expanduser()
    if path.is_file():
        return ["train"]
    folder = path if path.is_dir() else find_local_copy(source)
    if folder is None:
        return list(load_splits(source))
    return [split for split in SPLIT_NAMES if split_files(folder, split)]


def read_file(path: Path, streaming: bool = False) -> Split:
    """Read one csv/tsv/json/jsonl/parquet file (optionally .gz) as a Dataset, or as a stream of its rows."""
    suffixes = [s for s in path.suffixes if s != ".gz"]
    builder = FORMATS.get(suffixes[-1].lower()) if suffixes else None
    if builder is None:
        raise TunelabError(f"data file '{path}' has an unsupported format; use one of "
                           f"{', '.join(sorted(FORMATS))} (optionally .gz)")
    if path.stat().st_size == 0:
        raise TunelabError(f"data file '{path}' is empty; give a file with rows in it")
    options = {"delimiter": "\t"} if suffixes[-1].lower() == ".tsv" else {}
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming, **options)
        if streaming:  # a stream reads nothing until iterated: read its first rows now, so a bad file fails here
            next(iter(loaded), None)
    except Exception as exc:  # datasets raises many types for a malformed file; all mean "cannot read it"
        raise TunelabError(f"cannot read data file '{path}' as {builder}: {one_line(exc, 200)}; "
                           f"check that the file is valid {builder}") from None
    return loaded


def read_split_folder(folder: Path, stream: str | None = None, skip: tuple[str, ...] = ()) -> dict[str, Split]:
    """Read a folder holding `train.*`, `test.*` and/or `validation.*` files (split `stream` as a stream; those in
    `skip` left unread)."""
    splits = {}
    for split in SPLIT_NAMES:
        readable = split_files(folder, split)
        if readable and split not in skip:
            splits[split] = read_file(readable[0], streaming=split == stream)
    if not splits and not any(split_files(folder, split) for split in skip):
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise TunelabError(f"data folder '{folder}' has no train.*/test.*/validation.* file (it holds: {present}); "
                           f"name the split files so, or point data.source at one file")
    return splits


def split_files(folder: Path, split: str) -> list[Path]:
    """The readable files of one split in a split folder (`test.jsonl`, `test.csv.gz`, …), sorted."""
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.name.split(".")[0] == split)
    return [p for p in candidates if any(s in FORMATS for s in p.suffixes)]


def _looks_like_path(source: str) -> bool:
    """A source written as a path (./x, /x, ~/x, a/b/c, x.csv) is never tried as a Hub id."""
    name = source.lower().removesuffix(".gz")
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or name.endswith(tuple(FORMATS))


def _load_from_hub(source: str, stream: str | None = None) -> dict[str, Split]:
    """Load a Hub dataset (needs network); name the offline fix when it fails. With a `stream` split every split is
    opened as a stream (nothing downloaded whole) and all but that one are read into memory."""
    searched = ", ".join(str(p) for p in data_search_path())
    try:
        loaded = datasets.load_dataset(source, streaming=stream is not None)
    except Exception as exc:  # offline, missing or private: the fix is the same
        raise TunelabError(f"dataset '{source}' is not in TUNELAB_DATA_PATH ({searched}) and could not be loaded "
                           f"from the Hub ({one_line(exc, 160)}); put a copy in <folder>/{source.split('/')[-1]}/ "
                           f"or set TUNELAB_DATA_PATH") from None
    if stream is None:
        return dict(loaded)
    return {name: split if name == stream else datasets.Dataset.from_list(list(split), features=split.features)
            for name, split in loaded.items()}


def row_count(split: Split) -> int | None:
    """How many rows a split holds; None for a stream (data.streaming), whose length is known only once read."""
    return None if isinstance(split, datasets.IterableDataset) else len(split)


def column_names(split: Split) -> list[str]:
    """A split's columns; a stream whose reader could not tell them shows them in its first row ([] if none)."""
    if split.column_names is not None:
        return split.column_names
    return list(next(iter(split), {}))


def train_and_eval(splits: dict, cfg: DataConfig, normalise) -> tuple:
    """The train split and the eval split, each through `normalise(split, name) → (rows, dropped rows)`; without an
    eval split, `holdout_fraction` of train held out (seeded). Returns (train, eval, eval split name, dropped)."""
    eval_name = eval_split_name(cfg, splits)
    train, dropped = normalise(splits[cfg.train_split], cfg.train_split)
    if eval_name is not None:
        evaluation, dropped_eval = normalise(splits[eval_name], eval_name)
        return train, evaluation, eval_name, dropped + dropped_eval
    parts = train.train_test_split(test_size=cfg.holdout_fraction, seed=cfg.seed)
    return parts["train"], parts["test"], f"{cfg.train_split} (held-out {cfg.holdout_fraction:.0%})", dropped


def eval_split_name(cfg: DataConfig, splits: dict) -> str | None:
    """Check data.train_split / data.eval_split against a source's splits; the eval split to use, or None (hold out)."""
    if cfg.train_split not in splits:
        raise TunelabError(f"data.train_split '{cfg.train_split}' is not in '{cfg.source}' "
                           f"(splits: {', '.join(splits)}); set data.train_split to one of them")
    explicit_eval = "eval_split" in cfg.model_fields_set and cfg.eval_split is not None
    if explicit_eval and cfg.eval_split not in splits:
        raise TunelabError(f"data.eval_split '{cfg.eval_split}' is not in '{cfg.source}' "
                           f"(splits: {', '.join(splits)}); name one of them, or null to hold out part of train")
    return cfg.eval_split if cfg.eval_split in splits and cfg.eval_split != cfg.train_split else None


DEFAULT_VALIDATION_SPLIT = "validation"


def validation_split_name(cfg: DataConfig, splits: dict, eval_name: str | None) -> str | None:
    """The source's split that picks the checkpoint (data.validation_split), or None when it has none that differs
    from the train and reported splits: the reported split never selects."""
    # null means "the source's validation split, if any", so that a resolved recipe (every default written out)
    # runs again on a source without one; a name the user gives must exist.
    name = cfg.validation_split or DEFAULT_VALIDATION_SPLIT
    if name in splits and name not in (cfg.train_split, eval_name):
        return name
    if cfg.validation_split is not None and name not in splits:
        raise TunelabError(f"data.validation_split '{name}' is not in '{cfg.source}' (splits: {', '.join(splits)}); "
                           f"name one of them, or set data.validation_fraction to carve one from train")
    return None


def split_off_validation(cfg: DataConfig, splits: dict, eval_name: str | None, train: datasets.Dataset,
                         read: Callable[[datasets.Dataset, str], datasets.Dataset],
                         carve: Callable[[datasets.Dataset, float, int], tuple] | None = None,
                         ) -> tuple[datasets.Dataset, datasets.Dataset | None, str | None]:
    """(train, validation rows, their split's name) for checkpoint selection: the source's validation split,
    prepared by `read(split, name)` as the stage's other splits are, or data.validation_fraction carved off train
    (by `carve(train, fraction, seed)`, stratified for labelled data; a seeded random split otherwise), or none."""
    name = validation_split_name(cfg, splits, eval_name)
    if name is not None:
        return train, read(splits[name], name), name
    if cfg.validation_fraction is None:
        return train, None, None
    if carve is None:
        parts = train.train_test_split(test_size=cfg.validation_fraction, seed=cfg.seed)
        train, validation = parts["train"], parts["test"]
    else:
        train, validation = carve(train, cfg.validation_fraction, cfg.seed)
    return train, validation, f"{cfg.train_split} (validation {cfg.validation_fraction:.0%})"
