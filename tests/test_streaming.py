"""data.streaming: pretrain and sft read their train split as a stream (train.max_steps steps, tokenized on the fly);
what a stream cannot honour is refused in one line before anything runs."""

from __future__ import annotations

import json

import datasets
import pytest
import yaml
from conftest import assert_train_refused, toy_rows, write_jsonl

from tunelab import api
from tunelab.data.sft_encoding import fit_prompts, prompt_format
from tunelab.data.sources import load_splits, read_file
from tunelab.errors import TunelabError
from tunelab.models.loading import load_tokenizer
from tunelab.recipe import validate_recipe
from tunelab.stages import sft

RUN_FILES = {"recipe.yaml", "baseline.json", "log.jsonl", "metrics.json", "report.html", "model"}


def streamed_recipe(model, source, task="pretrain", **sections) -> dict:
    """A streamed pretrain (text: sentence) or sft (sentence → answer) recipe on the tiny decoder."""
    data = {"source": str(source), "streaming": True}
    data.update({"text": "sentence"} if task == "pretrain" else
                {"prompt_template": "{sentence} is", "response_template": " {answer}"})
    recipe = {"name": f"streamed-{task}", "task": task, "model": {"name": str(model), "max_length": 32},
              "data": data, "method": "full",
              "train": {"max_steps": 30, "batch_size": 4, "learning_rate": 3e-3, "precision": "fp32", "seed": 1,
                        "logging_steps": 1},
              "eval": {"generate": {"max_new_tokens": 3, "num_samples": 30}}}
    for section, value in sections.items():
        recipe[section] = {**recipe.get(section, {}), **value}
    return recipe


def steps_logged(metrics: dict) -> list[int]:
    """The optimizer steps whose training loss was logged (every step: logging_steps 1)."""
    return [entry["step"] for entry in metrics["history"] if "loss" in entry]


def test_streamed_pretrain_trains_max_steps_over_several_passes(tiny_llama, toy_data, tmp_path):
    # 90 sentences of 5 words + EOS are 17 blocks of 32 tokens: 5 steps of 4 blocks a pass, so 30 steps read the
    # stream 6 times over (the Trainer starts it again when it ends)
    run_dir, metrics = api.train(validate_recipe(streamed_recipe(tiny_llama, toy_data)), str(tmp_path / "run"))
    assert {path.name for path in run_dir.iterdir()} >= RUN_FILES
    assert steps_logged(metrics)[-1] == 30
    assert metrics["history"][-1]["epoch"] > 5  # passes over the stream
    assert metrics["streaming"] is True and metrics["train_rows"] is None and metrics["packing"] is True
    assert metrics["train_tokens"] > 5 * 90 * 6  # every pass's sentences, in blocks
    assert metrics["after"]["perplexity"] <= 0.7 * metrics["before"]["perplexity"]
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert saved["data"]["streaming"] is True and saved["train"]["group_by_length"] is False
    validate_recipe(saved)  # the resolved recipe runs again as it is


@pytest.mark.parametrize("packing", [False, True])
def test_streamed_sft_learns_the_answers(tiny_llama, qa_data, tmp_path, packing):
    # padding-free batches of whole rows, or rows packed into 32-token sequences (best fit, per 1,000 read)
    recipe = streamed_recipe(tiny_llama, qa_data, task="sft", train={"max_steps": 60, "batch_size": 8,
                                                                     "packing": packing})
    run_dir, metrics = api.train(validate_recipe(recipe), str(tmp_path / "run"))
    assert steps_logged(metrics)[-1] == 60 and metrics["packing"] is packing
    before, after = metrics["before"], metrics["after"]
    assert after["loss"] < before["loss"] / 4 and after["exact_match"] >= 0.7  # chance: 1/3
    assert metrics["padding_free"] is True and metrics["train_rows"] is None
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 30


def test_the_stage_trains_on_a_stream_tokenized_on_the_fly(tiny_llama, toy_data, tmp_path, monkeypatch):
    seen = {}

    class Recording(sft.TunelabSFTTrainer):
        def __init__(self, *args, **kwargs):
            seen["train_dataset"] = kwargs["train_dataset"]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sft, "TunelabSFTTrainer", Recording)
    api.train(validate_recipe(streamed_recipe(tiny_llama, toy_data, train={"max_steps": 1})), str(tmp_path / "run"))
    assert isinstance(seen["train_dataset"], datasets.IterableDataset)


def test_a_stream_reads_only_what_max_steps_needs(tiny_llama, toy_data, tmp_path):
    # 320,000 rows (over the json reader's 10 MB chunk), then a line that is not JSON: reading the file whole
    # fails on it, while a streamed run of 2 steps never reaches it
    data = tmp_path / "data"
    data.mkdir()
    with (data / "train.jsonl").open("w", encoding="utf-8") as out:
        for row in toy_rows(320_000, seed=3):
            out.write(json.dumps({"sentence": row["sentence"]}) + "\n")
        out.write("{not json\n")
    assert (data / "train.jsonl").stat().st_size > 10 << 20
    (data / "test.jsonl").write_text((toy_data / "test.jsonl").read_text())
    with pytest.raises(TunelabError, match="cannot read data file"):
        read_file(data / "train.jsonl")
    recipe = streamed_recipe(tiny_llama, data, train={"max_steps": 2})
    _, metrics = api.train(validate_recipe(recipe), str(tmp_path / "run"))
    assert steps_logged(metrics)[-1] == 2


def test_a_hub_source_streams_its_train_split_and_reads_the_others(monkeypatch):
    opened = []

    def hub(source, streaming=False):
        opened.append((source, streaming))
        return datasets.IterableDatasetDict({
            name: datasets.Dataset.from_list([{"text": f"{name} {i}"} for i in range(count)]).to_iterable_dataset()
            for name, count in (("train", 5), ("test", 3))})

    monkeypatch.setattr(datasets, "load_dataset", hub)
    splits = load_splits("someone/not-here", stream="train")
    assert opened == [("someone/not-here", True)]
    assert isinstance(splits["train"], datasets.IterableDataset)
    assert isinstance(splits["test"], datasets.Dataset) and splits["test"]["text"] == ["test 0", "test 1", "test 2"]


def test_a_stream_drops_or_refuses_long_prompts_as_it_is_read(tiny_llama):
    split = datasets.Dataset.from_list([
        {"messages": [], "prompt": "good is", "response": " good"},
        {"messages": [], "prompt": " ".join(["very"] * 12) + " is", "response": " table"}])
    fmt = prompt_format(load_tokenizer(str(tiny_llama)), "none", "template", str(tiny_llama))
    stream = split.to_iterable_dataset()
    assert [row["response"] for row in fit_prompts(fmt, stream, 10, "train", drop=True)] == \
        fit_prompts(fmt, split, 10, "train", drop=True)["response"] == [" good"]
    refusing = fit_prompts(fmt, stream, 10, "train")  # nothing is read yet
    with pytest.raises(TunelabError, match=r"train row 2 has a prompt of 13 tokens \(model.max_length 10\).*"
                                           r"data.drop_long: true"):
        list(refusing)


@pytest.mark.parametrize(("patch", "expected"), [
    ({"train": {"max_steps": None}}, "data.streaming reads the train split as a stream of unknown length, so epochs "
                                     "cannot be counted; set train.max_steps"),
    ({"data": {"train_size": 50}}, "data.train_size samples from the whole train split, which data.streaming never "
                                   "holds; drop data.train_size (train.max_steps caps"),
    ({"data": {"validation_fraction": 0.2}}, "data.validation_fraction samples from the whole train split"),
    ({"data": {"eval_split": None}}, "data.eval_split null holds eval rows out of the train split"),
    ({"train": {"group_by_length": True}}, "train.group_by_length sorts the whole train split by length"),
    ({"task": "seq2seq"}, "data.streaming is for tasks sft, pretrain; drop it for task seq2seq"),
    ({"task": "classify", "data": {"label": "sentiment"}}, "data.streaming is for tasks sft, pretrain; drop it "
                                                           "for task classify"),
])
def test_what_a_stream_cannot_honour_is_refused_in_one_line(tiny_llama, toy_data, tmp_path, capsys, patch,
                                                             expected):
    recipe = streamed_recipe(tiny_llama, toy_data)
    for section, value in patch.items():
        recipe[section] = {**recipe[section], **value} if isinstance(value, dict) else value
    assert_train_refused(recipe, tmp_path, capsys, [expected])


def test_a_source_without_an_eval_split_is_refused(tiny_llama, toy_data, tmp_path, capsys):
    recipe = streamed_recipe(tiny_llama, toy_data / "train.jsonl")
    assert_train_refused(recipe, tmp_path, capsys, ["data.streaming reads split 'train' as a stream, so no eval rows "
                                                    "can be held out of it"])


def test_an_empty_row_in_the_stream_is_refused_by_its_number(tiny_llama, toy_data, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"sentence": row["sentence"]} for row in toy_rows(90, seed=1)]
    rows[40]["sentence"] = "  "
    write_jsonl(data / "train.jsonl", rows)
    (data / "test.jsonl").write_text((toy_data / "test.jsonl").read_text())
    assert_train_refused(streamed_recipe(tiny_llama, data), tmp_path, capsys,
                         ["row 41 of split 'train' has an empty text; clean the data or set data.drop_empty: true"],
                         run_folder_possible=True)
