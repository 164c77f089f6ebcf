"""Forgetting check: what fine-tuning did to a decoder's general ability, on offline probes, before and after.

Two probes, scored the way lm-evaluation-harness scores them so the numbers can be read beside published ones
(`benchmarks/retention_vs_lm_eval.py` runs both on the same local files and compares):
- **multiple choice** (PIQA's validation split, or a user's jsonl of goal/choices/label): the summed log-likelihood
  of `" {choice}"` after `"Question: {goal}\\nAnswer:"` (the harness's `piqa` task); `acc` picks the highest sum,
  `acc_norm` the highest sum per character of the choice (the harness divides by `len(choice)`, characters, not
  tokens, so a tokenizer change cannot move it).
- **rolling perplexity** (WikiText-2's test split, or a user's text file): every token of every document scored
  exactly once in windows of `max_length` tokens (the harness's `loglikelihood_rolling`), reported per word and per
  byte of the original text, and as bits per byte. WikiText is cut into articles at its ` = Title = ` lines and
  detokenized (` @-@ ` → `-`, ...) as the harness's `wikitext` task does with `EleutherAI/wikitext_document_level`,
  while words and bytes are counted on the text before detokenizing, as it counts them.

Model and tokenizer in, numbers out: nothing here knows about stages or recipes (`runs/artifacts.with_retention`
wires the probes a recipe names into a run's before/after scoring). Sequences are padded on the right
by this module (the tokenizer's pad token and padding side are never used), so a position's logits never depend
on padding, and a peft-wrapped model scores as its base would with the adapter applied. The before/after
comparison reuses `uncertainty.py`'s paired bootstrap and McNemar test: the two scorings share the rows, so the
paired interval is the one that says whether the model changed.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tunelab.console import percent, signed
from tunelab.data.sources import data_search_path
from tunelab.errors import TunelabError
from tunelab.evaluation import PROBE_NAMES
from tunelab.evaluation.uncertainty import interval, mcnemar_p_value, mean_interval, mean_of, paired_gain
from tunelab.models.loading import context_length

PIQA_FOLDER = Path("general") / "piqa"  # under a TUNELAB_DATA_PATH folder (default ../shared/data)
WIKITEXT_FILE = Path("general") / "wikitext-2" / "test.txt"
CHOICE_PROMPT = "Question: {goal}\nAnswer:"  # the harness's piqa doc_to_text
CHOICE_DELIMITER = " "  # the harness's default target_delimiter, put before each choice
SAMPLE_SEED = 0


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: the prompt, its choices (without the delimiter) and the right one."""

    context: str
    choices: tuple[str, ...]
    label: int
    row: int  # line number in the probe file, so a subset can be matched with another scorer's


@dataclass(frozen=True)
class Document:
    """One document of a perplexity probe: the text the model scores, and the words and bytes its
    perplexities are per (counted on the text as written, before any detokenizing)."""

    text: str
    words: int
    bytes: int


# ---------------------------------------------------------------------------------------------------- loading


def find_probe(relative: Path) -> Path:
    """A probe shipped under the data search path (TUNELAB_DATA_PATH, default data/ and ../shared/data/)."""
    for folder in data_search_path():
        if (folder / relative).exists():
            return folder / relative
    searched = ", ".join(str(folder) for folder in data_search_path())
    raise TunelabError(f"retention probe '{relative}' is in none of the data folders ({searched}); "
                       f"set TUNELAB_DATA_PATH to the folder holding general/, or name the probe's own path")


def load_piqa(folder: str | Path | None = None, size: int | None = None, seed: int = SAMPLE_SEED) -> list[ChoiceItem]:
    """PIQA in its published layout (`valid.jsonl` of goal/sol1/sol2 + `valid-labels.lst`), or `size` rows of it
    drawn with `seed` (kept in file order)."""
    folder = Path(folder) if folder is not None else find_probe(PIQA_FOLDER)
    questions, labels = folder / "valid.jsonl", folder / "valid-labels.lst"
    if not questions.is_file() or not labels.is_file():
        raise TunelabError(f"PIQA folder '{folder}' lacks valid.jsonl or valid-labels.lst; "
                           f"give the folder of the published validation split")
    rows = _read_jsonl(questions)
    gold = [line.strip() for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(gold) != len(rows):
        raise TunelabError(f"PIQA folder '{folder}' has {len(rows)} questions but {len(gold)} labels; "
                           f"the two files must align line by line")
    items = [ChoiceItem(CHOICE_PROMPT.format(goal=row["goal"]), (row["sol1"], row["sol2"]), int(label), index)
             for index, (row, label) in enumerate(zip(rows, gold, strict=True))]
    return sample(items, size, seed)


def load_multiple_choice(path: str | Path, size: int | None = None, seed: int = SAMPLE_SEED) -> list[ChoiceItem]:
    """A user's multiple-choice probe: jsonl rows `{"goal": str, "choices": [str, ...], "label": int}`, put in the
    same prompt as PIQA."""
    path = Path(path)
    items = []
    for index, row in enumerate(_read_jsonl(path)):
        choices, label = row.get("choices"), row.get("label")
        if not isinstance(row.get("goal"), str) or not isinstance(choices, list) or len(choices) < 2 \
                or not isinstance(label, int) or not 0 <= label < len(choices):
            raise TunelabError(f"multiple-choice probe '{path}' row {index + 1} is not "
                               f'{{"goal": text, "choices": [two or more texts], "label": index of the right one}}')
        items.append(ChoiceItem(CHOICE_PROMPT.format(goal=row["goal"]), tuple(map(str, choices)), label, index))
    return sample(items, size, seed)


def load_wikitext(path: str | Path | None = None, docs: int | None = None) -> list[Document]:
    """WikiText's articles (the first `docs` of them), detokenized as the harness's `wikitext` task does."""
    path = Path(path) if path is not None else find_probe(WIKITEXT_FILE)
    pages = wikitext_pages(_read_text(path))
    return [Document(wikitext_detokenize(page), len(re.split(r"\s+", page)), len(page.encode("utf-8")))
            for page in pages[:docs]]


def load_text(path: str | Path, docs: int | None = None) -> list[Document]:
    """A user's text file as a perplexity probe: WikiText layout (` = Title = ` lines) is read as WikiText, any other
    text as documents separated by blank lines, scored as written."""
    path = Path(path)
    text = _read_text(path)
    if any(_is_article_title(line) for line in text.splitlines()):
        return load_wikitext(path, docs)
    blocks = [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]
    return [Document(block, len(block.split()), len(block.encode("utf-8"))) for block in blocks[:docs]]


def wikitext_pages(text: str) -> list[str]:
    """WikiText cut into articles as `EleutherAI/wikitext_document_level` cuts it: a new page at each level-one
    title line (kept as the page's first line), lines joined by newlines, the last page kept even if blank."""
    pages, page = [], []
    for line in text.split("\n"):
        if _is_article_title(line):
            if "\n".join(page).strip():
                pages.append("\n".join(page))
            page = []
        page.append(line)
    pages.append("\n".join(page))
    return pages


def _is_article_title(line: str) -> bool:
    flat = line.replace("= = =", "===").replace("= =", "==").strip()
    return flat.startswith("= ") and flat.endswith(" =")


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenization (spaces around punctuation, ` @-@ ` joins) exactly as the harness's
    `wikitext_detokenizer` does, so the model scores natural text and the two perplexities can agree."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)  # (sic: the harness's pattern, slashes and all)
    for spaced, joined in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                           (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(spaced, joined)
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for spaced, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="),
                           (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"), ("\n ", "\n"),
                           (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(spaced, joined)
    return text


def sample(items: list, size: int | None, seed: int) -> list:
    """`size` items drawn without replacement with `seed`, in their original order (all of them when size is None)."""
    if size is None or size >= len(items):
        return items
    if size < 1:
        raise TunelabError(f"probe size {size} is below 1; give a positive number of rows, or none for all")
    keep = sorted(random.Random(seed).sample(range(len(items)), size))
    return [items[index] for index in keep]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise TunelabError(f"probe file '{path}' line {number} is not JSON ({exc.msg}); "
                               f"write one JSON object per line") from None
    return rows


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise TunelabError(f"probe file '{path}' does not exist; give an existing file")
    return path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Probe:
    """A loaded probe: its name (a built-in's, or a file's stem) and its multiple-choice items or documents."""

    name: str
    items: tuple[ChoiceItem, ...] | tuple[Document, ...]

    @property
    def multiple_choice(self) -> bool:
        return bool(self.items) and isinstance(self.items[0], ChoiceItem)


def load_probes(names: Sequence[str], size: int | None, documents: int | None) -> list[Probe]:
    """The probes named: `piqa` and `wikitext` from the data folders, else a file of the user's (a .jsonl is a
    multiple-choice probe, anything else a text probe), `size` items of each multiple-choice probe and the first
    `documents` of each text probe."""
    probes = []
    for name in names:
        if name == "piqa":
            probe = Probe("piqa", tuple(load_piqa(size=size)))
        elif name == "wikitext":
            probe = Probe("wikitext", tuple(load_wikitext(docs=documents)))
        else:
            path = Path(name).expanduser()
            if not path.is_file():
                raise TunelabError(f"eval.retention probe '{name}' is neither a built-in probe (piqa, wikitext) nor "
                                   f"an existing file; name one of those, or a .jsonl / text file")
            items = load_multiple_choice(path, size) if path.suffix == ".jsonl" else load_text(path, documents)
            probe = Probe(path.stem, tuple(items))
        if any(probe.name == other.name for other in probes):
            raise TunelabError(f"eval.retention names two probes '{probe.name}'; rename one of the files")
        if not probe.items:
            raise TunelabError(f"eval.retention probe '{name}' has no items; give a probe with rows in it")
        probes.append(probe)
    return probes


def score_probes(model, tokenizer, probes: Sequence[Probe], max_length: int | None = None,
                 batch_size: int = 16) -> dict[str, dict]:
    """Each probe's scores (with their per-row records), by its name."""
    return {probe.name: score_multiple_choice(model, tokenizer, probe.items, batch_size) if probe.multiple_choice
            else score_rolling_perplexity(model, tokenizer, probe.items, max_length, batch_size=batch_size)
            for probe in probes}


def headline(scores: dict) -> dict:
    """A probe's scores without its per-row records: what metrics.json keeps."""
    return {key: value for key, value in scores.items() if key not in ("per_row", "loglikelihoods")}


# ---------------------------------------------------------------------------------------------------- scoring


def score_multiple_choice(model, tokenizer, items: Sequence[ChoiceItem], batch_size: int = 16) -> dict:
    """acc and acc_norm over `items`, with each item's right/wrong under `per_row` (for paired intervals) and the
    log-likelihood of each choice under `loglikelihoods`."""
    requests = [encode_pair(tokenizer, item.context, CHOICE_DELIMITER + choice)
                for item in items for choice in item.choices]
    scores = iter(continuation_loglikelihoods(model, requests, batch_size))
    right, right_norm, loglikelihoods = [], [], []
    for item in items:
        lls = np.array([next(scores) for _ in item.choices])
        characters = np.array([len(choice) for choice in item.choices], dtype=float)
        right.append(int(np.argmax(lls) == item.label))
        right_norm.append(int(np.argmax(lls / characters) == item.label))
        loglikelihoods.append([round(float(ll), 6) for ll in lls])
    return {"acc": float(np.mean(right)) if right else math.nan,
            "acc_norm": float(np.mean(right_norm)) if right else math.nan, "items": len(items),
            "per_row": {"acc": right, "acc_norm": right_norm}, "loglikelihoods": loglikelihoods}


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens, cut from the tokens of the whole text as the harness cuts them, so a
    token that merges across the boundary is scored as the model would read it (trailing spaces of the context
    move to the continuation first)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    return whole[:start], whole[start:]


def score_rolling_perplexity(model, tokenizer, docs: Sequence[Document], max_length: int | None = None,
                             stride: int | None = None, batch_size: int = 1) -> dict:
    """Word perplexity, byte perplexity and bits per byte over `docs`, each token scored once; the per-document
    log-likelihoods, words and bytes under `per_row`. `max_length` (default: the model's context) caps a window;
    `stride` (default max_length, as the harness) is how many new tokens each later window scores, the rest of
    it being context. A window never exceeds the model's context."""
    context = context_length(model.config)
    max_length = min(max_length or context or 2048, context or 2048)  # never a window longer than the model reads
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise TunelabError(f"perplexity stride {stride} must be between 1 and max_length {max_length}")
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise TunelabError("the tokenizer has neither a BOS nor an EOS token to put before a document's first token; "
                           "set tokenizer.bos_token")
    windows, owners = [], []
    for number, doc in enumerate(docs):
        tokens = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        for window in rolling_windows(tokens, prefix, max_length, stride):
            windows.append(window)
            owners.append(number)
    totals = np.zeros(len(docs))
    for owner, ll in zip(owners, continuation_loglikelihoods(model, windows, batch_size), strict=True):
        totals[owner] += ll
    words = np.array([doc.words for doc in docs], dtype=float)
    byte_counts = np.array([doc.bytes for doc in docs], dtype=float)
    nats = -totals.sum()
    return {"word_perplexity": math.exp(nats / words.sum()), "byte_perplexity": math.exp(nats / byte_counts.sum()),
            "bits_per_byte": float(nats / byte_counts.sum() / math.log(2)), "documents": len(docs),
            "tokens": sum(len(window[1]) for window in windows), "windows": len(windows),
            "max_length": max_length, "stride": stride,
            "per_row": {"loglikelihood": [round(float(ll), 6) for ll in totals],
                        "words": [doc.words for doc in docs], "bytes": [doc.bytes for doc in docs]}}


def rolling_windows(tokens: list[int], prefix: int, max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token exactly once: the first predicts up to max_length
    tokens after `prefix`, each later one the next `stride` tokens after as much preceding text as fits in
    max_length. With stride == max_length these are the harness's disjoint rolling windows."""
    text = [prefix, *tokens]  # text[i] predicts tokens[i]
    windows, start = [], 0
    while start < len(tokens):
        end = min(start + (max_length if start == 0 else stride), len(tokens))
        first = max(0, end - max_length)
        windows.append((text[first:start + 1], tokens[start:end]))
        start = end
    return windows


@torch.inference_mode()
def continuation_loglikelihoods(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """The summed log-probability of each continuation after its context (the context's last token predicting the
    continuation's first; context + continuation - 1 tokens go in), batched longest first and padded on the right."""
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    results = [0.0] * len(requests)
    device = next(model.parameters()).device
    # a text longer than the model's context keeps its last tokens, as the harness does
    limit = context_length(model.config) or max((len(c) + len(t) for c, t in requests), default=1)
    was_training = model.training
    model.eval()  # dropout off, whatever state the caller left the model in
    try:
        for begin in range(0, len(order), batch_size):
            batch = order[begin:begin + batch_size]
            rows = [(requests[i][0] + requests[i][1])[:-1][-limit:] for i in batch]
            width = max(len(row) for row in rows)
            input_ids = torch.zeros(len(rows), width, dtype=torch.long)
            attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, row in enumerate(rows):
                input_ids[r, :len(row)] = torch.tensor(row)
                attention_mask[r, :len(row)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            logits = logits[:, -width:]  # prompt tuning puts its virtual tokens' logits first
            for r, i in enumerate(batch):
                continuation = requests[i][1]
                end = len(rows[r])
                scored = logits[r, end - len(continuation):end].float().log_softmax(-1)
                target = torch.tensor(continuation, device=scored.device).unsqueeze(-1)
                results[i] = float(scored.gather(-1, target).sum())
    finally:
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------------- comparing


def log_word_perplexity(loglikelihood: np.ndarray, words: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(word perplexity) of the documents (vectorised over resamples)."""
    return -np.sum(loglikelihood, axis=axis) / np.sum(words, axis=axis)


def compare(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per probe (the keys both sides share) and metric: before, after, the change with its paired 95% interval,
    and whether it is significant (the interval excludes 0). Accuracies get McNemar's p-value too; a perplexity's
    change is a ratio (after / before, bootstrapped over documents)."""
    found = {}
    for probe in [name for name in before if name in after]:  # before's order: the summary reads in it
        rows_before, rows_after = before[probe]["per_row"], after[probe]["per_row"]
        if "acc" in rows_before:
            found[probe] = {metric: _compare_accuracy(np.array(rows_before[metric]), np.array(rows_after[metric]))
                            for metric in ("acc", "acc_norm")}
        else:
            found[probe] = {"word_perplexity": _compare_perplexity(rows_before, rows_after)}
    return found


def _compare_accuracy(right_before: np.ndarray, right_after: np.ndarray) -> dict:
    if len(right_before) != len(right_after):
        raise TunelabError(f"before and after scored {len(right_before)} and {len(right_after)} items; "
                           f"score the same probe items both times")
    gain = paired_gain((right_before,), (right_after,), mean_of)
    return {"before": float(right_before.mean()), "after": float(right_after.mean()),
            "interval_before": mean_interval(right_before), "interval_after": mean_interval(right_after),
            "change": gain["value"], "low": gain["low"], "high": gain["high"], "significant": gain["significant"],
            "p_value": round(mcnemar_p_value(right_before > 0, right_after > 0), 6)}


def _compare_perplexity(rows_before: dict, rows_after: dict) -> dict:
    if rows_before["words"] != rows_after["words"]:
        raise TunelabError("before and after scored different documents; score the same probe documents both times")
    words = np.array(rows_before["words"], dtype=float)
    ll_before, ll_after = np.array(rows_before["loglikelihood"]), np.array(rows_after["loglikelihood"])
    # a perplexity's change is multiplicative: bootstrap the change of its log, report exp of it as a ratio
    gain = paired_gain((ll_before, words), (ll_after, words), log_word_perplexity)
    log_before = float(log_word_perplexity(ll_before, words))
    return {"before": math.exp(log_before), "after": math.exp(log_before + gain["value"]),
            "interval_before": _exp(interval((ll_before, words), log_word_perplexity)),
            "interval_after": _exp(interval((ll_after, words), log_word_perplexity)),
            "ratio": math.exp(gain["value"]), "low": math.exp(gain["low"]), "high": math.exp(gain["high"]),
            "significant": gain["significant"]}


def _exp(bounds: dict) -> dict:
    return {"low": math.exp(bounds["low"]), "high": math.exp(bounds["high"])}


def summarize(comparison: dict[str, dict]) -> str:
    """One line: 'retained: PIQA acc 0.652 → 0.641 (−0.011 [−0.030, +0.010], no significant change); WikiText word
    ppl 41.2 → 48.9 (+19% [+15%, +22%])'."""
    parts = []
    for probe, metrics in comparison.items():
        name = PROBE_NAMES.get(probe, probe)
        if "acc" in metrics:
            acc = metrics["acc"]
            parts.append(f"{name} acc {acc['before']:.3f} → {acc['after']:.3f} "
                         f"({signed(acc['change'], '.3f')} [{signed(acc['low'], '.3f')}, "
                         f"{signed(acc['high'], '.3f')}]{_verdict(acc)})")
        else:
            ppl = metrics["word_perplexity"]
            parts.append(f"{name} word ppl {ppl['before']:.1f} → {ppl['after']:.1f} "
                         f"({percent(ppl['ratio'])} [{percent(ppl['low'])}, {percent(ppl['high'])}]"
                         f"{_verdict(ppl)})")
    return "retained: " + "; ".join(parts)


def _verdict(change: dict) -> str:
    return "" if change["significant"] else ", no significant change"
