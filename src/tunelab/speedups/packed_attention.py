"""Attention over padding-free batches that costs the sum of the rows' squares, not the square of their sum.

A padding-free SFT batch is one sequence of concatenated rows whose position ids restart at 0 at each row.
transformers turns that into a block-diagonal causal mask of (sum of lengths)² entries, and SDPA on a CPU then
scores every query against every key of the whole batch, masked or not: four rows of 500 tokens cost 2000² scores
per head, where the rows need 4 × 500². Here each row attends to itself alone with SDPA's causal kernel (no mask at
all), and the outputs are concatenated: the same result, a quarter of the attention work at batch 4, and the
causal kernel skips the upper triangle the mask only hid. One SmolLM2 LoRA training step (bf16, 4 rows): 2.19 →
1.93 s at 560 tokens, 11.5 → 6.5 s at 1,830. On a CPU the rows attend in fp32, whose flash backward is faster.

Off the packed case (padded batches, generation with a cache, attention dropout while training) it attends exactly
as `attention_with_fast_dropout` does (SDPA, or the fast-dropout path). It reads the rows from the `position_ids`
transformers hands attention functions, hence the transformers range below (checked by
tests/test_packed_attention.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunelab.speedups import fast_dropout
from tunelab.speedups.fast_dropout import FAST_DROPOUT_ATTENTION, attention_with_fast_dropout

CHECKED_WITH = {"transformers": ("5.24", "5.26")}
PACKED_ATTENTION = "tunelab_packed_sdpa"


def missing_internals() -> list[str]:
    """The transformers names this relies on: those of the fast-dropout attention it attends through otherwise."""
    return fast_dropout.missing_internals()


def row_bounds(position_ids: torch.Tensor | None, length: int) -> list[int] | None:
    """[0, start of row 2, …, length] for one packed sequence of several rows; None when it is not one."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1 \
            or position_ids.shape[1] != length:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return [*starts, length]


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal SDPA row by row for a packed batch (causal models, no cache, no dropout); else the fast-dropout
    attention (SDPA with the block mask)."""
    same_length = query.shape[2] == key.shape[2]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    bounds = row_bounds(kwargs.get("position_ids"), query.shape[2]) if same_length and causal else None
    if bounds is None or (module.training and dropout > 0) or kwargs.get("position_bias") is not None:
        return attention_with_fast_dropout(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dtype = query.dtype
    cpu_half = query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    if cpu_half:  # the CPU flash kernel's backward runs 1.2-2x faster in fp32 than in bf16 (rows of 100-350 tokens)
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast("cpu", enabled=False) if cpu_half else nullcontext():
        rows = [torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True, scale=scaling)
            for start, end in zip(bounds[:-1], bounds[1:], strict=False)]
    return torch.cat(rows, dim=2).to(dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # padded batches still get SDPA's mask


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Off CUDA, let a model that attends through SDPA (or tunelab's fast-dropout SDPA) attend row by row in packed
    batches; return whether it does. It saves as SDPA, like the fast-dropout attention.

    Not on CUDA: there a step is bound by kernel launches, and one attention call per row made SmolLM2 LoRA steps
    slower than SDPA's one call with the block mask (H200: 0.94x at 4 rows of ~140 tokens, 0.73x at 4 of ~490,
    0.63x at 16 of ~140; `benchmarks/packed_attention_ab.py --device cuda`)."""
    transformer = next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)
    if torch.cuda.is_available() or transformer is None or \
            transformer.config._attn_implementation not in ("sdpa", FAST_DROPOUT_ATTENTION):
        return False
    transformer.set_attn_implementation(PACKED_ATTENTION)
    return True
