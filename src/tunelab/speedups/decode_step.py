"""One decode step of a Llama-family model (Llama, Mistral, Qwen2) without transformers' per-call plumbing.

A step decodes one token per row, and on a CPU it is mostly Python: SmolLM2-135M's step with int8 weights took
25 ms, of which its 211 products were 13 ms. Transformers' forward spends much of the rest on what a decode step
does not need: per-call decorators (keyword deprecation, output capture, config defaults), the causal-mask builder,
the hub-kernel wrappers and `**kwargs` passed down through 30 layers. Here the same modules and functions are called
in the same order (the model's embedding, rotary embedding, norms, projections and MLPs, transformers'
`apply_rotary_pos_emb`, its registered attention function, the cache layers' own `update`), so the figures are the
library's own: equal logits, tested against the model's forward (tests/test_decode_step.py). Measured side by side
on a 2-core Xeon (AMX), SmolLM2-135M, 64 greedy tokens, the two paths alternating in one process: one answer
41.0 -> 44.0 tokens/s with int8 weights, 8 at once 187 -> 200; fp32 26.4 -> 27.9. With int8 weights the products
of q, k and v, and of gate and up, each take one kernel call over the layers' weights stacked (vLLM's fused QKV and
gate-up): 22.4 -> 21.1 ms a step, alternated 8 times. `torch.compile` removes the same overhead (`serve
--compile`) but compiles for seconds to minutes at every start and only for one row; llama.cpp needs a gguf export.
No library decodes a transformers model's step this way on a CPU, hence this module.

It stands in for the model's forward only where it is equal to it: a model whose class is one of `FAMILIES` exactly,
every layer full attention, SDPA attention, in eval mode, with no hooks on the modules it steps over, one new token
per row over a dynamic cache. Anything else (prefill, static caches, other architectures) takes the model's own
forward. It calls transformers internals (`apply_rotary_pos_emb`, the attention interface's signature, layer
attribute names), hence the version range below and the attribute check.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

CHECKED_WITH = {"transformers": ("5.24", "5.26")}
FAMILIES = {  # model class -> its module's rotary function (each family keeps its own copy)
    modeling_llama.LlamaForCausalLM: modeling_llama.apply_rotary_pos_emb,
    modeling_mistral.MistralForCausalLM: modeling_mistral.apply_rotary_pos_emb,
    modeling_qwen2.Qwen2ForCausalLM: modeling_qwen2.apply_rotary_pos_emb,
}
LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
SDPA_ARGUMENTS = ("module", "query", "key", "value", "attention_mask", "dropout", "scaling")


@functools.cache  # each decoder asks at its first step; building the layer to look at takes a millisecond
def missing_internals() -> list[str]:
    """The transformers names the step relies on that the installed version lacks or calls differently."""
    missing = []
    if tuple(inspect.signature(sdpa_attention_forward).parameters)[:len(SDPA_ARGUMENTS)] != SDPA_ARGUMENTS:
        missing.append(f"sdpa_attention_forward({', '.join(SDPA_ARGUMENTS)}, ...)")
    config = modeling_llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)
    with torch.random.fork_rng(devices=[]):  # a layer to look at, built without moving the run's random stream
        layer = modeling_llama.LlamaDecoderLayer(config, 0)
    missing += [f"LlamaDecoderLayer.{name}" for name in LAYER_PARTS if not hasattr(layer, name)]
    missing += [f"LlamaAttention.{name}" for name in ATTENTION_PARTS if not hasattr(layer.self_attn, name)]
    if not hasattr(DynamicLayer, "update"):
        missing.append("DynamicLayer.update")
    return missing


def fits(model: torch.nn.Module) -> bool:
    """Whether `decode_step` gives `model`'s own logits (its class and modules as this module expects them)."""
    config = model.config
    if type(model) not in FAMILIES or config._attn_implementation != "sdpa":
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False
    if getattr(config, "sliding_window", None) is not None and type(model) is modeling_mistral.MistralForCausalLM:
        return False  # Mistral masks a window whenever one is set
    stepped_over = [model, model.model, *model.model.layers, *(layer.self_attn for layer in model.model.layers)]
    return not any(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook")
                   for module in stepped_over)


def stack_products(model: torch.nn.Module, stack: Callable[[list[torch.nn.Module]], Callable | None]) -> None:
    """Give each attention block its q/k/v and each MLP its gate/up as one product where `stack` makes one of those
    layers (generation/weights.py's `stack_int8`: int8 layers; it returns the layers' outputs, or None where it
    cannot stack them); once per model."""
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if getattr(attention, "stacked_qkv", None) is None:
            attention.stacked_qkv = stack([attention.q_proj, attention.k_proj, attention.v_proj])
        if getattr(mlp, "stacked_gate_up", None) is None:
            mlp.stacked_gate_up = stack([mlp.gate_proj, mlp.up_proj])


def steps(model: torch.nn.Module, cache: DynamicCache, ids: torch.Tensor) -> bool:
    """Whether this call of a model that `fits` may go through `decode_step`: one new token per row after a prompt
    read into a dynamic cache, in eval mode (attention dropout is the forward's to apply)."""
    return ids.shape[1] == 1 and not model.training and type(cache) is DynamicCache and cache.get_seq_length() > 0


def decode_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: DynamicCache) -> torch.Tensor:
    """The next-token logits [rows, vocab] after `ids` [rows, 1] (the cache extended by one position), as
    `model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1)` gives them.
    `mask` [rows, width] is 1 where a row has a real token, this one included."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    rotary = inner.rotary_emb(hidden, positions)
    padding = None if bool(mask.all()) else mask[:, None, None, :].bool()  # as transformers' causal mask for sdpa
    rotate = FAMILIES[type(model)]
    for layer, states in zip(inner.layers[:model.config.num_hidden_layers], cache.layers, strict=True):
        hidden = hidden + attention(layer.self_attn, layer.input_layernorm(hidden), rotary, rotate, padding, states)
        hidden = hidden + mlp(layer.mlp, layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden))[:, -1]


def attention(module: torch.nn.Module, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], rotate,
              padding: torch.Tensor | None, states: DynamicLayer) -> torch.Tensor:
    """The attention block's output for one new position per row: `LlamaAttention.forward`'s steps."""
    rows, length = hidden.shape[:2]
    shape = (rows, length, -1, module.head_dim)
    if (qkv := getattr(module, "stacked_qkv", None)) is not None:
        products = qkv(hidden)
    else:
        products = module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden)
    query, key, value = (product.view(shape).transpose(1, 2) for product in products)
    query, key = rotate(query, key, *rotary)
    key, value = states.update(key, value)
    out, _ = sdpa_attention_forward(module, query, key, value, padding, dropout=0.0, scaling=module.scaling)
    return module.o_proj(out.reshape(rows, length, -1))


def mlp(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The MLP's output: `LlamaMLP.forward`, its gate and up products stacked where they can be."""
    gate_up = getattr(module, "stacked_gate_up", None)
    if gate_up is None:
        return module(hidden)
    gate, up = gate_up(hidden)
    return module.down_proj(module.act_fn(gate) * up)
