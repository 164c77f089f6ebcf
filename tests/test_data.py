"""Data sources, column mapping, label handling, sampling and hold-out."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import toy_rows, write_jsonl

from tunelab.data.labelled import load_labelled_data
from tunelab.data.sources import find_local_copy, load_splits
from tunelab.errors import TunelabError
from tunelab.recipe import DataConfig


def test_hub_id_resolves_to_a_local_folder_through_the_search_path(tmp_path, monkeypatch):
    folder = tmp_path / "mirror" / "tweets"
    folder.mkdir(parents=True)
    write_jsonl(folder / "train.jsonl", toy_rows(6, 0))
    monkeypatch.setenv("TUNELAB_DATA_PATH", f"{tmp_path / 'empty'}:{tmp_path / 'mirror'}")
    assert find_local_copy("someorg/tweets") == folder
    assert list(load_splits("someorg/tweets")) == ["train"]


def test_folder_source_reads_each_named_split(toy_data):
    splits = load_splits(str(toy_data))
    assert {name: len(split) for name, split in splits.items()} == {"train": 90, "test": 45}


def test_csv_and_parquet_files_read_like_jsonl(tmp_path):
    import pandas as pd

    rows = pd.DataFrame(toy_rows(12, 0))
    rows.to_csv(tmp_path / "rows.csv", index=False)
    rows.to_parquet(tmp_path / "rows.parquet")
    for name in ("rows.csv", "rows.parquet"):
        assert load_splits(str(tmp_path / name))["train"]["sentence"] == rows["sentence"].tolist()


def test_labels_are_encoded_in_sorted_order_and_columns_renamed(toy_data):
    data = load_labelled_data(DataConfig(source=str(toy_data), text="sentence", label="sentiment"))
    assert data.labels == ["neg", "neu", "pos"]
    assert data.train.column_names == ["text", "label"]
    assert data.train[0]["label"] == data.labels.index(toy_rows(90, seed=1)[0]["sentiment"])


def test_integer_labels_index_into_the_given_names(tmp_path):
    rows = [{"text": f"row {i}", "label": i % 3} for i in range(12)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:6])
    data = load_labelled_data(DataConfig(source=str(tmp_path), labels=["negative", "neutral", "positive"]))
    assert data.labels == ["negative", "neutral", "positive"]
    assert data.eval["label"] == [0, 1, 2, 0, 1, 2]


def test_missing_test_split_gets_a_stratified_seeded_holdout(tmp_path):
    write_jsonl(tmp_path / "all.jsonl", toy_rows(60, 0))
    config = DataConfig(source=str(tmp_path / "all.jsonl"), text="sentence", label="sentiment",
                        holdout_fraction=0.2)
    data = load_labelled_data(config)
    assert (len(data.train), len(data.eval)) == (48, 12)
    assert Counter(data.eval["label"]) == {0: 4, 1: 4, 2: 4}
    assert load_labelled_data(config).eval["text"] == data.eval["text"]
    assert not set(data.eval["text"]) & set(data.train["text"]) or len(set(data.train["text"])) < 48


def test_subsampling_is_stratified_and_seeded(toy_data):
    config = DataConfig(source=str(toy_data), text="sentence", label="sentiment", train_size=30, eval_size=15)
    data = load_labelled_data(config)
    assert Counter(data.train["label"]) == {0: 10, 1: 10, 2: 10}
    assert len(data.eval) == 15
    other_seed = load_labelled_data(config.model_copy(update={"seed": 7}))
    assert other_seed.train["text"] != data.train["text"]


def test_empty_texts_are_dropped_when_asked(tmp_path):
    rows = toy_rows(12, 0) + [{"sentence": "  ", "sentiment": "pos"}, {"sentence": None, "sentiment": "neg"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", toy_rows(6, 1))
    config = DataConfig(source=str(tmp_path), text="sentence", label="sentiment")
    with pytest.raises(TunelabError, match="2 of 14 rows in split 'train' have an empty text"):
        load_labelled_data(config)
    data = load_labelled_data(config.model_copy(update={"drop_empty": True}))
    assert len(data.train) == 12 and data.dropped_empty == 2


def test_the_shared_symptom_data_loads_with_all_22_labels():
    data = load_labelled_data(DataConfig(source="gretelai/symptom_to_diagnosis", text="input_text",
                                         label="output_text"))
    assert (len(data.train), len(data.eval), len(data.labels)) == (250, 212, 22)
