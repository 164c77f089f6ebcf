"""FastDropout must be dropout: the same keep rate, an unbiased output, nothing in eval mode, and every nn.Dropout
of a model (its own and peft's) swapped without touching its weights."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from tunelab.methods.fast_dropout import FastDropout, keep_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    keep, rate = keep_mask(torch.Size([1000, 1000]), p, torch.device("cpu"))
    assert rate == pytest.approx(1 - p, abs=1e-5)
    assert keep.float().mean().item() == pytest.approx(rate, abs=2e-3)  # 1e6 draws: standard error < 5e-4
    quarters = keep.view(-1, 4).float().mean(0)  # the four 16-bit lanes of each 64-bit draw are each unbiased
    assert torch.allclose(quarters, torch.full((4,), rate), atol=4e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_output_is_unbiased_and_gradients_follow_the_mask(dtype):
    torch.manual_seed(0)
    dropout = FastDropout(0.1).train()
    inputs = torch.ones(400, 500, dtype=dtype, requires_grad=True)
    outputs = dropout(inputs)
    assert outputs.dtype == dtype and outputs.shape == inputs.shape
    assert outputs.float().mean().item() == pytest.approx(1.0, abs=0.01)
    assert (outputs == 0).float().mean().item() == pytest.approx(0.1, abs=0.01)
    outputs.sum().backward()
    assert torch.equal(inputs.grad == 0, outputs == 0)


def test_eval_mode_and_p_zero_pass_the_input_through():
    inputs = torch.randn(8, 8)
    assert FastDropout(0.3).eval()(inputs) is inputs
    assert FastDropout(0.0).train()(inputs) is inputs


def test_every_dropout_of_a_lora_model_is_swapped_and_the_weights_stay(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_dropout=0.05, target_modules="all-linear"))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    use_fast_dropout(model)
    dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    assert dropouts and all(type(module) is FastDropout for module in dropouts)
    assert {module.p for module in dropouts} == {0.05, 0.1}  # LoRA's and BERT's own
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
