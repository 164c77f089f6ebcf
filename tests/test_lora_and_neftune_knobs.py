"""Knobs from LLaMA-Factory, each one line of peft configuration: rsLoRA's scaling."""

from __future__ import annotations

import pytest
from peft import TaskType
from peft.tuners.lora import Linear as LoraLinear
from transformers import AutoModelForCausalLM

from tunelab.methods.apply import apply_method
from tunelab.recipe import LoraMethod


def lora_layers(model) -> list[LoraLinear]:
    return [module for module in model.modules() if isinstance(module, LoraLinear)]


def adapted_decoder(tiny_llama, bf16: bool = False, **options):
    return apply_method(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraMethod(name="lora", **options), [],
                        TaskType.CAUSAL_LM, bf16)


@pytest.mark.parametrize(("use_rslora", "scaling"), [(True, 8 / 4), (False, 8 / 16)])  # alpha 8, r 16, √r 4
def test_rslora_scales_adapters_by_alpha_over_the_root_of_r(tiny_llama, use_rslora, scaling):
    layers = lora_layers(adapted_decoder(tiny_llama, r=16, alpha=8, use_rslora=use_rslora))
    assert layers and {layer.scaling["default"] for layer in layers} == {scaling}
