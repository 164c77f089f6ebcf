"""Methods: exact trainable counts, the head always training, and every peft method running a step."""

from __future__ import annotations

import pytest
import torch

from tunelab.errors import TunelabError
from tunelab.methods.apply import apply_method, count_parameters
from tunelab.models.loading import load_classifier, load_tokenizer
from tunelab.recipe import METHOD_CLASSES

LABELS = ["neg", "neu", "pos"]


def fresh_classifier(folder):
    tokenizer = load_tokenizer(str(folder))
    model, new_modules = load_classifier(str(folder), LABELS, tokenizer)
    return model, new_modules, tokenizer


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_new_head_is_reported_as_freshly_initialised(tiny_bert, tiny_llama):
    assert fresh_classifier(tiny_bert)[1] == ["classifier"]
    assert fresh_classifier(tiny_llama)[1] == ["score"]


def test_decoder_without_pad_token_gets_one_for_batching(tiny_llama):
    model, _, tokenizer = fresh_classifier(tiny_llama)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.config.pad_token_id == tokenizer.eos_token_id


def test_freeze_head_only_trains_exactly_the_head(tiny_bert):
    model, fresh, _ = fresh_classifier(tiny_bert)
    model = apply_method(model, METHOD_CLASSES["freeze"](name="freeze"), fresh)
    hand_count = 32 * 3 + 3  # classifier: hidden 32 → 3 labels, plus bias
    assert count_parameters(model).trainable == hand_count


def test_freeze_top_layers_trains_head_plus_those_layers(tiny_bert):
    model, fresh, _ = fresh_classifier(tiny_bert)
    top_layer = numel(model.bert.encoder.layer[-1])
    model = apply_method(model, METHOD_CLASSES["freeze"](name="freeze", train_top_layers=1), fresh)
    assert count_parameters(model).trainable == 32 * 3 + 3 + top_layer
    assert not model.bert.encoder.layer[0].attention.self.query.weight.requires_grad


def test_freeze_refuses_more_layers_than_the_model_has(tiny_bert):
    model, fresh, _ = fresh_classifier(tiny_bert)
    with pytest.raises(TunelabError, match="has 2 layers"):
        apply_method(model, METHOD_CLASSES["freeze"](name="freeze", train_top_layers=5), fresh)


def test_prefix_tuning_is_refused_for_classification_before_any_training(tiny_bert):
    model, fresh, _ = fresh_classifier(tiny_bert)
    with pytest.raises(TunelabError, match="use method 'prompt' or 'lora'"):
        apply_method(model, METHOD_CLASSES["prefix"](name="prefix"), fresh)


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "prompt"])
@pytest.mark.parametrize("family", ["tiny_bert", "tiny_llama"])
def test_peft_methods_train_a_small_share_and_keep_the_head_trainable(name, family, request):
    model, fresh, tokenizer = fresh_classifier(request.getfixturevalue(family))
    total = count_parameters(model).total
    method = METHOD_CLASSES[name].model_validate({"name": name, **({"r": 4} if name in ("lora", "dora") else {})})
    model = apply_method(model, method, fresh)
    count = count_parameters(model)
    assert 0 < count.trainable < total
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(fresh[0] in n for n in trainable_names), "the classification head must train"
    batch = tokenizer(["good day", "the chair is bad"], padding=True, return_tensors="pt")
    loss = model(**batch, labels=torch.tensor([2, 0])).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt", "freeze", "full"])
def test_under_bf16_only_an_adapters_frozen_base_is_stored_in_bf16(name, tiny_llama):
    """Adapter runs save only what trains (fp32), so their frozen base may drop to bf16; freeze and full runs save
    every weight, so theirs keep fp32."""
    model, fresh, tokenizer = fresh_classifier(tiny_llama)
    method = METHOD_CLASSES[name].model_validate({"name": name})
    model = apply_method(model, method, fresh, bf16=True)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32}
    assert frozen == ({torch.bfloat16} if name in ("lora", "ia3", "prompt") else ({torch.float32} if frozen else set()))
    batch = tokenizer(["good day", "the chair is bad"], padding=True, return_tensors="pt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=torch.tensor([2, 0])).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
