"""A decode step without transformers' plumbing (speedups/decode_step.py): the model's own logits and cache, for each
family it takes, alone and in a left-padded batch; every other model, mode and call keeps the model's forward."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import seeded_random_weights
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tunelab.generation import weights
from tunelab.generation.engine import answer_all, decoder_for
from tunelab.generation.sampling import Sampling
from tunelab.speedups import decode_step, decode_step_for

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama": lambda: seeded_random_weights(LlamaForCausalLM, LlamaConfig(**SIZES)),
    "mistral": lambda: seeded_random_weights(MistralForCausalLM, MistralConfig(**SIZES, sliding_window=None)),
    "qwen2": lambda: seeded_random_weights(Qwen2ForCausalLM, Qwen2Config(**SIZES)),  # biased q/k/v
}


def prefilled(model, prompts: list[list[int]]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """The prompts read left-padded into a dynamic cache: the cache, the attention mask and each row's first token."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache,
                   use_cache=True).logits[:, -1]
    return cache, mask, logits.argmax(-1)[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_step_gives_the_models_own_logits_and_cache_alone_and_in_a_padded_batch(family, dtype):
    model = FAMILIES[family]().to(dtype).eval()
    assert decode_step.fits(model)
    for prompts in ([[5, 9, 11, 3]], [[5, 9, 11, 3], [7, 2], [40, 41, 42, 43, 44, 45]]):
        with torch.inference_mode():
            theirs, mask, token = prefilled(model, prompts)
            ours = copy.deepcopy(theirs)
            for _ in range(4):  # a few steps, each from the same cache and token on both paths
                mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
                positions = mask.sum(-1, keepdim=True) - 1
                assert decode_step.steps(model, ours, token)
                got = decode_step.decode_step(model, token, mask, positions, ours)
                want = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=theirs,
                             use_cache=True, logits_to_keep=1).logits[:, -1]
                assert got.dtype == want.dtype and torch.equal(got, want), (family, len(prompts))
                for a, b in zip(ours.layers, theirs.layers, strict=True):
                    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                token = want.argmax(-1)[:, None]


def int8_storage_bytes(model) -> int:
    """Bytes of the distinct storages that hold the model's int8 weights."""
    storages = {layer.weight_int8.untyped_storage().data_ptr(): layer.weight_int8.untyped_storage().nbytes()
                for layer in model.modules() if isinstance(layer, weights.Int8Linear)}
    return sum(storages.values())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_int8_products_stacked_give_the_models_own_logits_and_hold_no_second_copy(family, monkeypatch):
    monkeypatch.setattr(weights, "bf16_supported", lambda: True)  # bf16 arithmetic emulated where it is not native
    model = weights.use_format(FAMILIES[family]().eval(), "int8")
    int8_bytes = int8_storage_bytes(model)
    decode_step.stack_products(model, weights.stack_int8)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.stacked_qkv.sizes == [64, 32, 32] and mlp.stacked_gate_up.sizes == [96, 96]
    assert attention.k_proj.weight_int8.data_ptr() == attention.stacked_qkv.weight_int8[64:].data_ptr()  # a view
    assert int8_storage_bytes(model) == int8_bytes
    for prompts in ([[5, 9, 11, 3]], [[5, 9, 11, 3], [7, 2], [40, 41, 42]], [[5, 9]] * 6):  # 6: packed copies
        with torch.inference_mode():
            theirs, mask, token = prefilled(model, prompts)
            ours = copy.deepcopy(theirs)
            for _ in range(3):
                mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
                positions = mask.sum(-1, keepdim=True) - 1
                got = decode_step.decode_step(model, token, mask, positions, ours)
                want = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=theirs,
                             use_cache=True, logits_to_keep=1).logits[:, -1]
                assert torch.equal(got, want), (family, len(prompts))
                token = want.argmax(-1)[:, None]


def test_models_and_calls_it_does_not_match_keep_their_own_forward(tiny_llama):
    llama = FAMILIES["llama"]().eval()
    gemma = seeded_random_weights(Gemma3ForCausalLM, Gemma3TextConfig(**SIZES, head_dim=16)).eval()
    windowed = seeded_random_weights(MistralForCausalLM, MistralConfig(**SIZES, sliding_window=8)).eval()
    eager = seeded_random_weights(LlamaForCausalLM, LlamaConfig(**SIZES, attn_implementation="eager")).eval()
    hooked = FAMILIES["llama"]().eval()
    hooked.model.layers[1].register_forward_pre_hook(lambda module, args: None)
    assert decode_step.fits(llama)
    assert not any(decode_step.fits(model) for model in (gemma, windowed, eager, hooked))
    with torch.inference_mode():
        cache, _, token = prefilled(llama, [[5, 9, 11]])
    assert decode_step.steps(llama, cache, token)
    assert not decode_step.steps(llama, cache, torch.tensor([[5, 9]]))  # a prompt: the model reads it
    assert not decode_step.steps(llama, DynamicCache(config=llama.config), token)  # nothing read yet
    assert not decode_step.steps(llama.train(), cache, token)  # dropout is the model's to apply


def test_the_engine_decodes_through_the_step_unless_speedups_are_off(tiny_llama, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = tokenizer(["the day was", "a lovely chair by the window", "it"])["input_ids"]
    calls = []
    step = decode_step.decode_step
    monkeypatch.setattr(decode_step, "decode_step", lambda *args: calls.append(1) or step(*args))
    decoder = decoder_for(model, tokenizer)
    assert decoder.plain is decode_step
    answers = answer_all(decoder, prompts, Sampling(max_tokens=10, ignore_eos=True), batch_size=2)
    assert len(calls) >= 2 * 9  # every token after the first, rows joining and leaving
    monkeypatch.setenv("TUNELAB_SPEEDUPS", "0")
    assert decode_step_for(model, weights.stack_int8) is None
    calls.clear()
    assert answer_all(decoder_for(model, tokenizer), prompts, Sampling(max_tokens=10, ignore_eos=True), 2) == answers
    assert not calls


def test_int8_weights_given_after_the_decoder_was_built_are_stacked_at_its_first_step(tiny_llama, monkeypatch):
    monkeypatch.setattr(weights, "bf16_supported", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    decoder = decoder_for(model, tokenizer)  # as `tunelab serve` builds it, before converting the weights
    weights.use_format(model, "int8")
    answer_all(decoder, tokenizer(["the day was"])["input_ids"], Sampling(max_tokens=3, ignore_eos=True), 1)
    assert decoder.plain is decode_step
    assert all(layer.self_attn.stacked_qkv is not None and layer.mlp.stacked_gate_up is not None
               for layer in model.model.layers)
