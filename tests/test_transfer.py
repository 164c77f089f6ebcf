"""Transfer across tasks: an earlier run's encoder with a fresh head for a new label set (model.new_head)."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_recipe, toy_rows, write_jsonl
from safetensors.torch import load_file

from tunelab import api
from tunelab.errors import TunelabError
from tunelab.inference.trained import load_trained_classifier
from tunelab.models.loading import load_classifier, load_tokenizer
from tunelab.recipe import validate_recipe


@pytest.fixture(scope="module")
def earlier_run(tiny_bert, toy_data, tmp_path_factory):
    """A finished 3-label classify run (neg/neu/pos) whose encoder the new task starts from.

    20 epochs, so it learns the toy task on any init: after 10 epochs some inits still confuse the classes, and
    the transfer run starting from such an encoder learnt the new head slowly (0.8 on one CI machine's numerics).
    """
    recipe = validate_recipe(toy_recipe(tiny_bert, toy_data, train={"epochs": 20, "batch_size": 16,
                                                                    "learning_rate": 5e-3, "precision": "fp32"}))
    run_dir, _ = api.train(recipe, str(tmp_path_factory.mktemp("runs") / "three-labels"))
    return run_dir


@pytest.fixture(scope="module")
def two_label_data(tmp_path_factory):
    """A new task: 'is the sentence about furniture?' (yes for neu rows, no otherwise)."""
    folder = tmp_path_factory.mktemp("furniture")
    for split, seed, count in [("train", 3, 60), ("test", 4, 30)]:
        rows = [{"sentence": row["sentence"], "furniture": "yes" if row["sentiment"] == "neu" else "no"}
                for row in toy_rows(count, seed)]
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def transfer_recipe(run_dir, data, **sections) -> dict:
    raw = toy_recipe(run_dir, data, **sections)
    raw["model"]["new_head"] = True
    raw["data"]["label"] = "furniture"
    return raw


def test_new_head_keeps_the_earlier_encoder_and_sizes_the_head_for_the_new_labels(earlier_run):
    tokenizer = load_tokenizer(str(earlier_run / "model"))
    model, fresh = load_classifier(str(earlier_run / "model"), ["no", "yes"], tokenizer, new_head=True)
    earlier = load_file(earlier_run / "model" / "model.safetensors")
    encoder = {key: value for key, value in model.state_dict().items() if key.startswith("bert.")}
    assert encoder and all(torch.equal(value, earlier[key]) for key, value in encoder.items())
    assert model.classifier.weight.shape == (2, 32) and "classifier" in fresh
    assert model.config.id2label == {0: "no", 1: "yes"}


def test_new_head_is_fresh_even_when_the_label_count_matches(earlier_run):
    tokenizer = load_tokenizer(str(earlier_run / "model"))
    earlier = load_file(earlier_run / "model" / "model.safetensors")
    kept, _ = load_classifier(str(earlier_run / "model"), ["a", "b", "c"], tokenizer, new_head=False)
    assert torch.equal(kept.classifier.weight, earlier["classifier.weight"])
    fresh, _ = load_classifier(str(earlier_run / "model"), ["a", "b", "c"], tokenizer, new_head=True)
    assert not torch.equal(fresh.classifier.weight, earlier["classifier.weight"])
    assert torch.equal(fresh.bert.pooler.dense.weight, earlier["bert.pooler.dense.weight"])


def test_other_labels_without_new_head_are_refused_before_the_run(earlier_run, two_label_data, tmp_path):
    raw = transfer_recipe(earlier_run, two_label_data)
    raw["model"]["new_head"] = False
    with pytest.raises(TunelabError, match="set model.new_head: true"):
        api.train(validate_recipe(raw), str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_transfer_run_trains_the_new_head_on_the_new_task(earlier_run, two_label_data, tmp_path):
    raw = transfer_recipe(earlier_run, two_label_data, method={"name": "freeze", "train_top_layers": 2},
                          train={"epochs": 30, "batch_size": 16, "learning_rate": 3e-3, "precision": "fp32"})
    run_dir, metrics = api.train(validate_recipe(raw), str(tmp_path / "furniture"))
    assert metrics["labels"] == ["no", "yes"]
    # the fresh head's "before" is anywhere from chance to the majority share (0.33-0.67), and has reached 0.87 on
    # the earlier run's last checkpoint: compare loosely, and no bar above a perfect score
    assert metrics["after"]["accuracy"] >= max(0.85, min(metrics["before"]["accuracy"] + 0.15, 1.0))
    trained = load_file(run_dir / "model" / "model.safetensors")
    earlier = load_file(earlier_run / "model" / "model.safetensors")
    assert torch.equal(trained["bert.embeddings.word_embeddings.weight"],
                       earlier["bert.embeddings.word_embeddings.weight"]), "frozen weights stay the earlier run's"
    assert not torch.equal(trained["bert.encoder.layer.0.output.dense.weight"],
                           earlier["bert.encoder.layer.0.output.dense.weight"])


def test_transfer_from_a_lora_run_starts_from_its_merged_weights(tiny_bert, toy_data, tmp_path):
    lora = validate_recipe(toy_recipe(tiny_bert, toy_data, method={"name": "lora", "r": 4},
                                      train={"epochs": 2, "batch_size": 16, "learning_rate": 1e-2,
                                             "precision": "fp32"}))
    run_dir, _ = api.train(lora, str(tmp_path / "lora"))
    merged = load_trained_classifier(run_dir).model.merge_and_unload().state_dict()
    tokenizer = load_tokenizer(str(run_dir / "model"))
    model, fresh = load_classifier(str(run_dir / "model"), ["no", "yes"], tokenizer, new_head=True)
    query = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(model.state_dict()[query], merged[query])
    assert not torch.equal(merged[query], load_classifier(str(tiny_bert), ["no", "yes"], tokenizer)[0]
                           .state_dict()[query]), "the adapter changed the weight, so the test can tell"
    assert model.classifier.weight.shape == (2, 32) and "classifier" in fresh
