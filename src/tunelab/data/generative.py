"""Text for generative tasks: rows become (prompt, response) conversations for sft/seq2seq, or raw text to pretrain.

Every sft/seq2seq row is normalised to three columns, whatever the input format:
  messages  the conversation as role/content turns; the last turn is the assistant's response
  prompt    the prompt as plain text, for models without a chat template ("" for chat data: it needs a template)
  response  the response text (the reference that generation is scored against)

data.replay adds general text (a `text` column, trained with the loss on every token) to mix into the training
rows: the lever against forgetting that eval.retention measures.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import datasets

from tunelab.data.sources import Split, column_names, eval_split_name, load_splits, split_off_validation
from tunelab.data.subsets import sample_shots
from tunelab.errors import TunelabError
from tunelab.recipe import DataConfig, ReplayConfig

ROLES = ("system", "user", "assistant")
# The Alpaca prompt: the documented default for instruction data on a model without a chat template.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FORMAT_COLUMNS = {"instruction": ("instruction", "output"), "prompt_completion": ("prompt", "completion")}
# The normalised columns, declared for a stream: a lazily mapped IterableDataset cannot tell its columns otherwise.
NORMALISED_FEATURES = {
    "text": datasets.Features({"text": datasets.Value("string")}),
    "rows": datasets.Features({"messages": datasets.List({"role": datasets.Value("string"),
                                                          "content": datasets.Value("string")}),
                               "prompt": datasets.Value("string"), "response": datasets.Value("string")}),
}
# A stream's order (data.streaming): rows pass through a buffer of this many and leave it in a random order, a new
# one each pass. A true shuffle needs the whole split in memory; the buffer holds only its own rows (10,000 tweets
# ≈ 3 MB, 10,000 4 kB documents ≈ 40 MB: small beside a model) and mixes rows that lie up to ~10,000 apart in the
# file, which for short rows spans hundreds of optimizer steps. A file sorted by topic over longer stretches stays
# ordered at that scale: shuffle such a file once on disk.
STREAM_SHUFFLE_ROWS = 10_000


@dataclass
class GenerativeData:
    """Train and eval rows (messages/prompt/response, or text for pretrain) and where the eval rows came from.
    With data.streaming the train rows are a stream (IterableDataset), normalised as they are read."""

    train: Split
    eval: datasets.Dataset
    eval_split: str
    format: str
    dropped_empty: int = 0
    validation: datasets.Dataset | None = None  # picks the checkpoint; never the reported `eval` rows
    validation_split: str | None = None
    replay: datasets.Dataset | None = None  # general text mixed into training (data.replay): a `text` column


def load_generative_data(cfg: DataConfig, plain_text: bool = False) -> GenerativeData:
    """Read, check, normalise and subsample the data of an sft, seq2seq or grpo recipe (prompt → response rows in
    the format data.format picks), or with plain_text, of a pretrain recipe (text rows)."""
    splits = load_splits(cfg.source, stream=cfg.train_split if cfg.streaming else None)
    eval_name = eval_split_name(cfg, splits)
    fmt = "text" if plain_text else detect_format(cfg, column_names(splits[cfg.train_split]))
    if cfg.streaming:
        train, dropped = normalise_stream(splits[cfg.train_split], cfg, fmt, cfg.train_split), 0
    else:
        train, dropped = normalise_split(splits[cfg.train_split], cfg, fmt, cfg.train_split)
    if eval_name is not None:
        evaluation, dropped_eval = normalise_split(splits[eval_name], cfg, fmt, eval_name)
        dropped += dropped_eval
    elif cfg.streaming:
        raise TunelabError(f"data.streaming reads split '{cfg.train_split}' as a stream, so no eval rows can be held "
                           f"out of it, and '{cfg.source}' has no other split to score on; add a test.* file beside "
                           f"the train file or name another split in data.eval_split")
    else:
        if len(train) < 2:
            raise TunelabError(f"split '{cfg.train_split}' has {len(train)} row; holding out eval rows needs 2 or more")
        parts = train.train_test_split(test_size=cfg.holdout_fraction, seed=cfg.seed)
        train, evaluation = parts["train"], parts["test"]
        eval_name = f"{cfg.train_split} (held-out {cfg.holdout_fraction:.0%})"
    train, validation, validation_name = split_off_validation(
        cfg, splits, eval_name, train, lambda split, name: normalise_split(split, cfg, fmt, name)[0])
    train = random_subsample(train, cfg.train_size, cfg.seed)
    if cfg.shots is not None:
        train = shots_per_response(train, cfg.shots, cfg.seed)
    evaluation = random_subsample(evaluation, cfg.eval_size, cfg.seed)
    replay = load_replay(cfg.replay, len(train), cfg.seed) if cfg.replay is not None else None
    return GenerativeData(train=train, eval=evaluation, eval_split=eval_name, format=fmt, dropped_empty=dropped,
                          validation=validation, validation_split=validation_name, replay=replay)


def load_replay(cfg: ReplayConfig, train_rows: int, seed: int) -> datasets.Dataset:
    """round(fraction × train_rows) texts of the replay source, drawn at random with `seed` (each row once before
    any row twice, when the source has fewer rows than asked for)."""
    splits = load_splits(cfg.source)
    if cfg.split not in splits:
        raise TunelabError(f"data.replay.split '{cfg.split}' is not a split of '{cfg.source}' (splits: "
                           f"{', '.join(splits)}); name one of them")
    split = splits[cfg.split]
    missing = [field for field in template_fields(cfg.template) if field not in split.column_names]
    if missing:
        raise TunelabError(f"data.replay.template reads column '{missing[0]}', which '{cfg.source}' lacks (columns: "
                           f"{', '.join(split.column_names)}); write the template over its columns")
    texts = [text for text in (cfg.template.format(**row) for row in split) if text.strip()]
    if not texts:
        raise TunelabError(f"data.replay source '{cfg.source}' has no non-empty text; give a source with text in it")
    wanted = max(1, round(cfg.fraction * train_rows))
    rng, order = random.Random(seed), []
    while len(order) < wanted:  # each pass a new shuffle of every row
        rows = list(range(len(texts)))
        rng.shuffle(rows)
        order += rows
    return datasets.Dataset.from_dict({"text": [texts[i] for i in order[:wanted]]})


def detect_format(cfg: DataConfig, columns: list[str]) -> str:
    """The recipe's data.format, or (auto) the first format whose columns the data has."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.prompt_template is not None or cfg.response_template is not None:
        return "template"
    if cfg.messages in columns:
        return "messages"
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(column in columns for column in needed):
            return fmt
    raise TunelabError(f"cannot tell how to build prompts from the columns {', '.join(columns)}; set data.format "
                       f"(instruction: instruction/input/output; prompt_completion: prompt/completion; messages: "
                       f"a chat column) or data.prompt_template and data.response_template")


def template_fields(template: str) -> list[str]:
    """The column names a format string uses ('Symptoms: {text}' → ['text'])."""
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise TunelabError(f"template {template!r} is not a valid format string ({exc}); write columns as "
                           f"{{column}} and literal braces as {{{{ }}}}") from None


def required_columns(cfg: DataConfig, fmt: str) -> list[tuple[str, str]]:
    """(what names it, column) for every column the format reads."""
    if fmt == "text":
        return [("data.text", cfg.text)]
    if fmt == "messages":
        return [("data.messages", cfg.messages)]
    if fmt == "template":
        if cfg.prompt_template is None or cfg.response_template is None:
            raise TunelabError("data.format template needs both data.prompt_template and data.response_template "
                               "(e.g. 'Symptoms: {text}' and 'Diagnosis: {label}')")
        return [(f"a {{{name}}} in data.{which}_template", name)
                for which in ("prompt", "response")
                for name in template_fields(getattr(cfg, f"{which}_template"))]
    return [(f"the {fmt} format", column) for column in FORMAT_COLUMNS[fmt]]


def normalise_split(split: datasets.Dataset, cfg: DataConfig, fmt: str, name: str) -> tuple[datasets.Dataset, int]:
    """Check a split's columns and rows, then map it to messages/prompt/response (or text); drop or refuse empties."""
    if len(split) == 0:
        raise TunelabError(f"split '{name}' of '{cfg.source}' is empty; give a source with rows in it")
    for field, column in required_columns(cfg, fmt):
        if column not in split.column_names:
            raise TunelabError(f"column '{column}' ({field}) is not in split '{name}' (columns: "
                               f"{', '.join(split.column_names)}); map it to one of them")
    rows = [normalise_row(row, cfg, fmt, name, number) for number, row in enumerate(split, 1)]
    kept = [row for row in rows if row is not None]
    empty = len(rows) - len(kept)
    what = "text" if fmt == "text" else "response"
    if empty and not cfg.drop_empty:
        raise TunelabError(f"{empty} of {len(rows)} rows in split '{name}' have an empty {what}; clean the data or "
                           f"set data.drop_empty: true to drop them")
    if not kept:
        raise TunelabError(f"split '{name}' has no rows left after dropping {empty} with an empty {what}")
    columns = ["text"] if fmt == "text" else ["messages", "prompt", "response"]
    return datasets.Dataset.from_dict({c: [row[c] for row in kept] for c in columns}), empty


def normalise_stream(split: datasets.IterableDataset, cfg: DataConfig, fmt: str,
                     name: str) -> datasets.IterableDataset:
    """normalise_split for a stream (data.streaming): the columns are checked on the first row now, and every row
    is normalised when training reads it; an empty one is dropped then (data.drop_empty) or refused by number."""
    present = column_names(split)
    if not present:
        raise TunelabError(f"split '{name}' of '{cfg.source}' is empty; give a source with rows in it")
    for field, column in required_columns(cfg, fmt):
        if column not in present:
            raise TunelabError(f"column '{column}' ({field}) is not in split '{name}' (columns: "
                               f"{', '.join(present)}); map it to one of them")
    what = "text" if fmt == "text" else "response"
    features = NORMALISED_FEATURES["text" if fmt == "text" else "rows"]

    def normalise(batch: dict, indices: list[int]) -> dict:
        kept = []
        for index, values in zip(indices, zip(*batch.values(), strict=True), strict=True):
            row = normalise_row(dict(zip(batch, values, strict=True)), cfg, fmt, name, index + 1)
            if row is None and not cfg.drop_empty:
                raise TunelabError(f"row {index + 1} of split '{name}' has an empty {what}; clean the data or set "
                                   f"data.drop_empty: true to drop such rows")
            if row is not None:
                kept.append(row)
        return {column: [row[column] for row in kept] for column in features}

    # batched, so that a dropped row can leave the stream (a batch may come back shorter)
    return split.map(normalise, batched=True, with_indices=True, remove_columns=present, features=features)


def shuffle_stream(rows: datasets.IterableDataset, seed: int) -> datasets.IterableDataset:
    """A stream in a seeded random order through a buffer of STREAM_SHUFFLE_ROWS rows (a new order each pass)."""
    return rows.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_ROWS)


def normalise_row(row: dict, cfg: DataConfig, fmt: str, split: str, number: int) -> dict | None:
    """One row as {messages, prompt, response} (or {text}); None when its response/text is empty."""
    if fmt == "text":
        text = row[cfg.text]
        return {"text": str(text)} if text is not None and str(text).strip() else None
    if fmt == "messages":
        return normalise_messages(row[cfg.messages], split, number)
    if fmt == "instruction":
        instruction, extra, response = row["instruction"], row.get("input") or "", row["output"]
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        plain = (ALPACA_PROMPT_WITH_INPUT if extra.strip() else ALPACA_PROMPT).format(instruction=instruction,
                                                                                     input=extra)
    elif fmt == "prompt_completion":
        user, response = row["prompt"], row["completion"]
        plain = user
    else:
        values = {key: "" if value is None else value for key, value in row.items()}
        user, response = cfg.prompt_template.format(**values), cfg.response_template.format(**values)
        plain = user
    if response is None or not str(response).strip() or user is None:
        return None
    return {"messages": [{"role": "user", "content": str(user)}, {"role": "assistant", "content": str(response)}],
            "prompt": str(plain), "response": str(response)}


def prompt_row(cfg: DataConfig, fmt: str, text: str) -> dict:
    """A new prompt in the shape training used: put into the recipe's prompt template (when it names one column),
    as the instruction (instruction data), or as the user's turn; the response is left empty."""
    if fmt == "template" and cfg.prompt_template and len(set(template_fields(cfg.prompt_template))) == 1:
        row = {"messages": [{"role": "user", "content": cfg.prompt_template.format(
            **{template_fields(cfg.prompt_template)[0]: text})}]}
        plain = row["messages"][0]["content"]
    elif fmt == "instruction":
        row, plain = {"messages": [{"role": "user", "content": text}]}, ALPACA_PROMPT.format(instruction=text)
    else:
        row, plain = {"messages": [{"role": "user", "content": text}]}, text
    row["messages"].append({"role": "assistant", "content": ""})
    return {**row, "prompt": plain, "response": ""}


def normalise_messages(turns, split: str, number: int) -> dict | None:
    """Check a chat row (known roles, ends with the assistant's turn) and return it normalised."""
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise TunelabError(f"row {number} of split '{split}': the messages column must hold a list of "
                           f"{{role, content}} turns")
    for turn in turns:
        if turn.get("role") not in ROLES:
            raise TunelabError(f"row {number} of split '{split}' has a message with role {turn.get('role')!r}; "
                               f"roles must be one of {', '.join(ROLES)} (rename it in the data)")
    if turns[-1]["role"] != "assistant":
        raise TunelabError(f"row {number} of split '{split}' ends with a '{turns[-1]['role']}' turn; the last turn "
                           f"must be the assistant's response that the model learns")
    response = turns[-1].get("content")
    if response is None or not str(response).strip():
        return None
    messages = [{"role": t["role"], "content": str(t.get("content") or "")} for t in turns]
    return {"messages": messages, "prompt": "", "response": str(response)}


def shots_per_response(split: datasets.Dataset, shots: int, seed: int) -> datasets.Dataset:
    """Classification as generation, few-shot: exactly `shots` rows for every distinct response (the label)."""
    responses = sorted(set(split["response"]))
    if len(responses) > len(split) / 2:
        raise TunelabError(f"data.shots takes k rows per distinct response, but {len(responses)} of {len(split)} "
                           f"responses differ: these are not labels; use data.train_size")
    index = {response: i for i, response in enumerate(responses)}
    labelled = split.add_column("label", [index[response] for response in split["response"]])
    return sample_shots(labelled, shots, seed, responses).remove_columns("label")


def random_subsample(split: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """A seeded random subset of `size` rows (all rows when size is None or not smaller)."""
    if size is None or size >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(size))
