"""Render sft rows as the model will see them (chat template or plain text) and tokenize with response-only labels.

We tokenize here rather than letting TRL's SFTTrainer do it so that (1) generation-based evaluation renders
prompts through exactly the same function that training used, and (2) the label masking is a plain function that
tests check token by token. TRL still does the rest (truncation, packing, padding-free collation).
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from tunelab.console import say
from tunelab.errors import TunelabError, one_line

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


@dataclass(frozen=True)
class PromptFormat:
    """How a conversation becomes text: through a chat template (Jinja), or plain prompt + response + EOS."""

    tokenizer: object
    chat_template: str | None  # None: plain text

    @property
    def uses_chat_template(self) -> bool:
        """Whether prompts go through a chat template."""
        return self.chat_template is not None

    def prompt_text(self, row: dict) -> str:
        """The text the model reads before its answer (ends with the assistant header in chat mode)."""
        if self.chat_template is None:
            return row["prompt"]
        return self.tokenizer.apply_chat_template(row["messages"][:-1], chat_template=self.chat_template,
                                                  add_generation_prompt=True, tokenize=False)

    def full_text(self, row: dict) -> str:
        """Prompt and response as one training sequence, ending where generation should stop."""
        if self.chat_template is None:
            return row["prompt"] + row["response"] + (self.tokenizer.eos_token or "")
        return self.tokenizer.apply_chat_template(row["messages"], chat_template=self.chat_template, tokenize=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered text; plain text gets the tokenizer's own BOS, chat text carries its markers."""
        return self.tokenizer(text, add_special_tokens=self.chat_template is None)["input_ids"]


def prompt_format(tokenizer, setting: str, data_format: str, model_name: str) -> PromptFormat:
    """Pick chat template or plain text from data.chat_template ('auto', 'none' or a Jinja template)."""
    own = getattr(tokenizer, "chat_template", None)
    template = {"auto": own, "none": None}.get(setting, setting)
    if data_format == "messages" and template is None:
        why = "data.chat_template is none" if setting == "none" else f"model '{model_name}' has no chat template"
        raise TunelabError(f"the data is chat messages but {why}; set data.chat_template to a Jinja chat template "
                           f"(or use instruction/prompt_completion data, which has a plain-text default)")
    if template is not None and setting not in ("auto", "none"):
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                          chat_template=template, tokenize=False)
        except Exception as exc:  # jinja raises several types; all mean the template is broken
            raise TunelabError(f"data.chat_template cannot render a conversation: {one_line(exc, 160)}") from None
    return PromptFormat(tokenizer, template)


def encode_example(fmt: PromptFormat, row: dict, completion_only: bool, max_length: int) -> dict:
    """input_ids and labels of one row; prompt tokens get IGNORE_INDEX when completion_only."""
    prompt_ids = fmt.encode(fmt.prompt_text(row))
    full_ids = fmt.encode(fmt.full_text(row))
    prompt_length = common_prefix_length(prompt_ids, full_ids)
    labels = list(full_ids)
    if completion_only:
        labels[:prompt_length] = [IGNORE_INDEX] * prompt_length
    return {"input_ids": full_ids[:max_length], "labels": labels[:max_length]}


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share (the prompt may merge with the response's first token)."""
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def fit_prompts(fmt: PromptFormat, split: datasets.Dataset | datasets.IterableDataset, max_length: int, name: str,
                drop: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """Rows whose prompt alone fills max_length would leave nothing of the response to learn: refuse them, or with
    `drop` (data.drop_long) leave them out. Returns the split that trains. A stream (data.streaming) is checked
    row by row as it is read."""
    if isinstance(split, datasets.IterableDataset):
        return split.filter(lambda row, index: prompt_fits(fmt, row, max_length, name, index + 1, drop),
                            with_indices=True)
    prompts = [fmt.prompt_text(row) for row in split]
    lengths = [len(ids) for ids in fmt.tokenizer(prompts, add_special_tokens=not fmt.uses_chat_template)["input_ids"]]
    keep = [i for i, length in enumerate(lengths) if length < max_length]
    lost = len(split) - len(keep)
    if not lost:
        return split
    if not drop or not keep:
        raise TunelabError(f"{lost} of {len(split)} {name} rows have a prompt of {max_length}+ tokens (longest "
                           f"{max(lengths)}), so nothing of their response is left to learn; raise model.max_length, "
                           f"shorten the prompts or set data.drop_long: true")
    say(f"tunelab: dropped {lost} of {len(split)} {name} rows whose prompt fills {max_length} tokens")
    return split.select(keep)


def prompt_fits(fmt: PromptFormat, row: dict, max_length: int, name: str, number: int, drop: bool) -> bool:
    """Whether one row's prompt leaves room for its response; a row that fills max_length is refused by number
    unless `drop`."""
    length = len(fmt.tokenizer(fmt.prompt_text(row), add_special_tokens=not fmt.uses_chat_template)["input_ids"])
    if length < max_length:
        return True
    if drop:
        return False
    raise TunelabError(f"{name} row {number} has a prompt of {length} tokens (model.max_length {max_length}), so "
                       f"nothing of its response is left to learn; raise model.max_length, shorten the prompts or "
                       f"set data.drop_long: true")


def encode_split(fmt: PromptFormat, split: datasets.Dataset | datasets.IterableDataset, completion_only: bool,
                 max_length: int) -> datasets.Dataset | datasets.IterableDataset:
    """Tokenize a split for training (fit_prompts has made sure every row keeps some response); a stream is
    tokenized as it is read."""
    return split.map(lambda row: encode_example(fmt, row, completion_only, max_length),
                     remove_columns=split.column_names)


def encode_text_split(tokenizer, split: datasets.Dataset | datasets.IterableDataset
                      ) -> datasets.Dataset | datasets.IterableDataset:
    """Tokenize raw text for continued pre-training: each text + EOS, every token a label (chunked later); a stream
    is tokenized as it is read."""
    eos = tokenizer.eos_token or ""

    def encode(batch: dict) -> dict:
        ids = tokenizer([text + eos for text in batch["text"]])["input_ids"]
        return {"input_ids": ids, "labels": [list(row) for row in ids]}

    return split.map(encode, batched=True, remove_columns=split.column_names)


def mix_in_replay(rows: datasets.Dataset, replay: datasets.Dataset, tokenizer, max_length: int | None
                  ) -> datasets.Dataset:
    """The training rows with data.replay's texts added, each text + EOS with every token a label (cut to
    `max_length` when rows are not packed into blocks later); the Trainer's sampler then mixes them in."""
    encoded = encode_text_split(tokenizer, replay)
    if max_length is not None:
        encoded = encoded.map(lambda row: {key: value[:max_length] for key, value in row.items()})
    return datasets.concatenate_datasets([rows, encoded.cast(rows.features)])
