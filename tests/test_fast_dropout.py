"""FastDropout must be dropout: the same keep rate, an unbiased output, nothing in eval mode, and every nn.Dropout
of a model (its own and peft's) swapped without touching its weights."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tunelab.speedups.fast_dropout import (
    FAST_DROPOUT_ATTENTION,
    FastDropout,
    attention_with_fast_dropout,
    keep_mask,
    use_fast_dropout,
)


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


class Attending(torch.nn.Module):
    """The `module` argument of an attention function: it reads `training`, `is_causal` and (SDPA) the number of
    query heads per key/value head."""

    def __init__(self, is_causal: bool, num_key_value_groups: int = 1) -> None:
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, num_key_value_groups


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_keeping_every_weight_is_sdpa_attention(is_causal, masked):
    """p below 1/65536 keeps every element: the unfused path must then give SDPA's output (padding mask, causal
    mask, grouped key/value heads)."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = None
    if masked:  # the second row's last two positions are padding; causal as well when is_causal
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        mask[1, :, :, 4:] = False
        mask = mask & torch.ones(6, 6, dtype=torch.bool).tril() if is_causal else mask
    module = Attending(is_causal, num_key_value_groups=2).train()
    ours, _ = attention_with_fast_dropout(module, query, key, value, mask, dropout=1e-9, scaling=0.3)
    expected, _ = sdpa_attention_forward(module.eval(), query, key, value, mask, dropout=0.0, scaling=0.3)
    assert ours.shape == expected.shape == (2, 6, 4, 8)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_attention_drops_weights_at_rate_p_and_rescales_the_rest():
    """With v the identity, the output is the dropped attention weights themselves."""
    torch.manual_seed(0)
    query, key = torch.randn(4, 2, 64, 16), torch.randn(4, 2, 64, 16)
    value = torch.eye(64).expand(4, 2, 64, 64)
    module = Attending(is_causal=False).train()
    dropped, _ = attention_with_fast_dropout(module, query, key, value, None, dropout=0.2)
    weights = torch.softmax(query @ key.transpose(2, 3) * 16 ** -0.5, dim=-1).transpose(1, 2)
    zeroed = dropped == 0
    assert zeroed.float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert torch.allclose(dropped[~zeroed], weights[~zeroed] / 0.8, rtol=1e-4)
    assert torch.equal(attention_with_fast_dropout(module.eval(), query, key, value, None, dropout=0.0)[0],
                       sdpa_attention_forward(module, query, key, value, None, dropout=0.0)[0])


def test_a_model_with_attention_dropout_attends_the_fast_way_and_saves_as_sdpa(tiny_bert, tiny_llama, tmp_path):
    bert = use_fast_dropout(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3))
    assert bert.config._attn_implementation == FAST_DROPOUT_ATTENTION  # BERT: attention_probs_dropout_prob 0.1
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    bert.train()(**inputs, labels=torch.tensor([0, 1])).loss.backward()
    bert.save_pretrained(tmp_path / "bert")
    assert FAST_DROPOUT_ATTENTION not in (tmp_path / "bert" / "config.json").read_text()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert").eval()
    assert torch.allclose(bert.eval()(**inputs).logits, reloaded(**inputs).logits, atol=1e-6)
    llama = use_fast_dropout(AutoModelForCausalLM.from_pretrained(tiny_llama))
    assert llama.config._attn_implementation == "sdpa"  # no attention dropout: SDPA's fused kernel stays
