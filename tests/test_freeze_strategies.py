"""Freeze strategies: exact trainable counts (by hand on the tiny BERT), discriminative learning rates, and
gradual unfreezing changing the trainable set at the scheduled epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import toy_recipe
from safetensors.torch import load_file
from transformers import BertModel, DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from tunelab import api
from tunelab.errors import TunelabError
from tunelab.methods.apply import apply_method, count_parameters
from tunelab.methods.freeze import method_callbacks, method_optimizer, parameter_groups
from tunelab.models.loading import load_classifier, load_tokenizer
from tunelab.recipe import FreezeMethod, FullMethod, TrainConfig, validate_recipe
from tunelab.stages.classify import tokenize
from tunelab.trainer import last_checkpoint

LABELS = ["neg", "neu", "pos"]
# The tiny BERT of conftest by hand: hidden 32, 2 layers, feed-forward 64, vocabulary 27, 64 positions.
EMBEDDINGS = 27 * 32 + 64 * 32 + 2 * 32 + 2 * 32  # word, position, token type, LayerNorm (weight + bias)
# per layer: query, key, value, attention output, LayerNorm, feed-forward in and out, LayerNorm
LAYER = 3 * (32 * 32 + 32) + (32 * 32 + 32) + 2 * 32 + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 32
POOLER = 32 * 32 + 32
HEAD = 32 * 3 + 3
TOTAL = EMBEDDINGS + 2 * LAYER + POOLER + HEAD


def classifier(folder):
    tokenizer = load_tokenizer(str(folder))
    model, fresh = load_classifier(str(folder), LABELS, tokenizer)
    return model, fresh, tokenizer


def test_hand_count_matches_the_tiny_model(tiny_bert):
    model, _, _ = classifier(tiny_bert)
    assert count_parameters(model).total == TOTAL == 21283


def test_full_with_frozen_embeddings_trains_everything_above_them(tiny_bert):
    model, fresh, _ = classifier(tiny_bert)
    model = apply_method(model, FullMethod(freeze_embeddings=True), fresh)
    assert count_parameters(model).trainable == TOTAL - EMBEDDINGS
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    assert all(p.requires_grad for p in model.bert.encoder.layer[0].parameters())


def test_freeze_with_a_schedule_starts_with_its_first_entry(tiny_bert):
    model, fresh, _ = classifier(tiny_bert)
    model = apply_method(model, FreezeMethod(name="freeze", unfreeze_schedule=[1, 2]), fresh)
    assert count_parameters(model).trainable == HEAD + LAYER


def test_discriminative_rates_decay_by_depth_from_the_head_down(tiny_bert):
    model, _, _ = classifier(tiny_bert)
    groups = parameter_groups(model, learning_rate=1e-3, weight_decay=0.01, decay=0.5)
    per_factor: dict[float, int] = {}  # rate as a fraction of the head's rate → parameters learning at it
    for group in groups:
        factor = round(group["lr"] / 1e-3, 9)
        per_factor[factor] = per_factor.get(factor, 0) + sum(p.numel() for p in group["params"])
        if group["weight_decay"]:
            assert all(p.ndim >= 2 for p in group["params"]), "biases and norms get no weight decay"
    assert per_factor == {1.0: POOLER + HEAD, 0.5: LAYER, 0.25: LAYER, 0.125: EMBEDDINGS}
    names = [name for group in groups for name in group["names"]]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())


def test_optimizer_holds_the_frozen_layers_that_unfreeze_later(tiny_bert):
    model, fresh, _ = classifier(tiny_bert)
    method = FreezeMethod(name="freeze", unfreeze_schedule=1)
    model = apply_method(model, method, fresh)
    optimizer = method_optimizer(model, method, TrainConfig(learning_rate=1e-3))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert method_optimizer(model, FreezeMethod(name="freeze"), TrainConfig(learning_rate=1e-3)) is None


class TrainableRecorder(TrainerCallback):
    """Trainable count and a bottom-layer weight at the start of each epoch (after the unfreezing callback)."""

    def __init__(self, model):
        self.model = model
        self.trainable, self.bottom = [], []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainable.append(count_parameters(self.model).trainable)
        self.bottom.append(self.model.bert.encoder.layer[0].output.dense.weight.detach().clone())


def test_gradual_unfreezing_adds_one_layer_from_the_top_each_epoch(tiny_bert, toy_data, tmp_path):
    from tunelab.data.labelled import load_labelled_data

    recipe = validate_recipe(toy_recipe(tiny_bert, toy_data, method={"name": "freeze", "unfreeze_schedule": 1}))
    data = load_labelled_data(recipe.data)
    model, fresh, tokenizer = classifier(tiny_bert)
    model = apply_method(model, recipe.method, fresh)
    recorder = TrainableRecorder(model)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3,
                                                          per_device_train_batch_size=16, learning_rate=1e-2,
                                                          report_to="none", use_cpu=True, save_strategy="no"),
                      train_dataset=tokenize(data.train, tokenizer, 32),
                      data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[*method_callbacks(model, recipe.method), recorder],
                      optimizers=(method_optimizer(model, recipe.method, TrainConfig(learning_rate=1e-2)), None))
    trainer.train()
    assert recorder.trainable == [HEAD, HEAD + LAYER, HEAD + 2 * LAYER]
    # the bottom layer only starts to move in the third epoch, once it is unfrozen
    assert torch.equal(recorder.bottom[0], recorder.bottom[2])
    assert not torch.equal(recorder.bottom[2], model.bert.encoder.layer[0].output.dense.weight)


def test_a_run_with_a_schedule_leaves_never_unfrozen_layers_untouched(tiny_bert, toy_data, tmp_path):
    method = {"name": "freeze", "unfreeze_schedule": [0, 1], "layer_lr_decay": 0.5}
    recipe = validate_recipe(toy_recipe(tiny_bert, toy_data, method=method, output={"keep_checkpoints": True},
                                        train={"epochs": 2, "batch_size": 16, "learning_rate": 1e-2,
                                               "precision": "fp32"}))
    run_dir, metrics = api.train(recipe, str(tmp_path / "gradual"))
    assert metrics["trainable_params"] == HEAD  # counted at the start: epoch 1 trains the head only
    start = BertModel.from_pretrained(tiny_bert).state_dict()
    # the weights after epoch 2 (model/ holds the best epoch, which may be the first)
    trained = load_file(Path(last_checkpoint(run_dir)) / "model.safetensors")
    assert torch.equal(trained["bert.encoder.layer.0.output.dense.weight"],
                       start["encoder.layer.0.output.dense.weight"])
    assert torch.equal(trained["bert.embeddings.word_embeddings.weight"], start["embeddings.word_embeddings.weight"])
    assert not torch.equal(trained["bert.encoder.layer.1.output.dense.weight"],
                           start["encoder.layer.1.output.dense.weight"])


def test_schedule_beyond_the_model_is_refused_before_training(tiny_bert):
    model, fresh, _ = classifier(tiny_bert)
    with pytest.raises(TunelabError, match="has 2 layers"):
        apply_method(model, FreezeMethod(name="freeze", unfreeze_schedule=[0, 1, 5]), fresh)


@pytest.mark.parametrize(("method", "message"), [
    ({"name": "freeze", "unfreeze_schedule": [2, 1]}, "non-decreasing"),
    ({"name": "freeze", "unfreeze_schedule": 0}, "use ≥ 1"),
    ({"name": "freeze", "train_top_layers": 1, "unfreeze_schedule": [2, 3]}, "drop train_top_layers"),
    ({"name": "full", "layer_lr_decay": 1.5}, "'method.layer_lr_decay' = 1.5 is invalid"),
])
def test_bad_strategies_are_one_line_recipe_errors(method, message, tiny_bert, toy_data):
    with pytest.raises(TunelabError, match=message):
        validate_recipe(toy_recipe(tiny_bert, toy_data, method=method))
