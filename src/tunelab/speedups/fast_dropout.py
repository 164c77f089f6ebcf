"""Dropout with a cheaper random mask on CPUs, where torch's own dropout is the slowest op of a small model.

Written here because no library does it: torch's CPU dropout draws one `bernoulli_` sample per element, which took
41% of a MiniLM LoRA training step on this 2-core machine (1.8 ms per 640 × 384 activation, more than the matmul
beside it). Here each element compares 16 random bits with p, four elements per 64-bit draw: the same
Bernoulli mask (p rounded to 1/65536, and the kept elements scaled by the exact keep rate) for a seventh of the
cost (0.25 ms). On CUDA torch's fused dropout is already fast, so models there are left as they are.

Attention dropout is applied inside torch's scaled_dot_product_attention, which on a CPU then leaves its fused
kernel for the unfused path and draws its mask with `bernoulli_` too (7% of a MiniLM full fine-tuning step). A model
with attention dropout therefore attends through `attention_with_fast_dropout` (registered with transformers'
AttentionInterface): the same unfused computation, with the cheaper mask, while training on a CPU; SDPA otherwise.
That function is called as transformers calls attention functions and falls back to its `sdpa_attention_forward`,
hence the transformers range below (checked by tests/test_fast_dropout.py) and the signature check.
"""

from __future__ import annotations

import inspect
import math

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CHECKED_WITH = {"transformers": ("5.24", "5.26")}
SDPA_ARGUMENTS = ("module", "query", "key", "value", "attention_mask", "dropout", "scaling", "is_causal")
INT16_VALUES = 65536
FAST_DROPOUT_ATTENTION = "tunelab_sdpa"
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")  # BERT, Llama, GPT-2


def missing_internals() -> list[str]:
    """The transformers names this relies on that the installed version lacks or calls differently."""
    missing = [] if hasattr(PreTrainedModel, "set_attn_implementation") else ["PreTrainedModel.set_attn_implementation"]
    if tuple(inspect.signature(sdpa_attention_forward).parameters)[:len(SDPA_ARGUMENTS)] != SDPA_ARGUMENTS:
        missing.append(f"sdpa_attention_forward({', '.join(SDPA_ARGUMENTS)}, ...)")
    return missing


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean mask that keeps each element with probability 1 - p (p rounded to 1/65536), and that rate."""
    count = math.prod(shape)
    bits = torch.randint(-2**63, 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    threshold = round(p * INT16_VALUES) - INT16_VALUES // 2  # int16 values at or above it are kept
    keep = bits.view(torch.int16)[:count] >= threshold
    return keep.view(shape), (INT16_VALUES // 2 - threshold) / INT16_VALUES


def fast_dropout(inputs: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p) (p > 0), with the cheaper mask."""
    keep, rate = keep_mask(inputs.shape, p, inputs.device)
    if rate == 0.0:
        return inputs * 0.0
    return inputs * keep.to(inputs.dtype).mul_(1.0 / rate)  # one cast: a bool mask is cast again in backward


class FastDropout(torch.nn.Dropout):
    """nn.Dropout (same p, same 1 / keep-rate scaling, nothing in eval mode) with a cheaper CPU mask."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """While training, zero each element with probability p and scale the rest by 1 / (1 - p)."""
        if not self.training or self.p == 0.0:
            return inputs
        return fast_dropout(inputs, self.p)


def attention_with_fast_dropout(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None,
                                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except while training with dropout on a CPU: then softmax(q·kᵀ·scale + mask)
    with fast_dropout on the probabilities, times v (what SDPA computes there, with torch's slower mask)."""
    if not (module.training and dropout > 0 and query.device.type == "cpu") or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # sdpa_mask's: True where a query may attend (or an additive float mask)
        attention_mask = attention_mask[..., : key.shape[-2]]
        scores = (scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
                  if attention_mask.dtype == torch.bool else scores + attention_mask)
    elif (getattr(module, "is_causal", True) if is_causal is None else is_causal) and query.shape[2] > 1:
        allowed = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        scores = scores.masked_fill(~allowed.tril(key.shape[2] - query.shape[2]), torch.finfo(scores.dtype).min)
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    output = torch.matmul(fast_dropout(probabilities, dropout), value)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(FAST_DROPOUT_ATTENTION, attention_with_fast_dropout)
AttentionMaskInterface.register(FAST_DROPOUT_ATTENTION, sdpa_mask)


def use_fast_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Off CUDA, swap every nn.Dropout with p > 0 in `model` for a FastDropout, and let a model with attention
    dropout that attends through SDPA attend through attention_with_fast_dropout; return the model."""
    if torch.cuda.is_available():
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                setattr(parent, name, FastDropout(child.p, child.inplace))
    transformer = next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)
    if transformer is not None and transformer.config._attn_implementation == "sdpa" and any(
            getattr(transformer.config, key, 0) for key in ATTENTION_DROPOUT_KEYS):
        transformer.set_attn_implementation(FAST_DROPOUT_ATTENTION)
    return model
