"""TRL's fused LM head, fitted to a CPU.

TRL's `add_fused_lm_head` (sft, dpo, kto, grpo) scores the vocabulary in tiles without materialising the logits.
Its tiling is sized for GPUs, and three of its choices cost a CPU dearly:
- Tiles of 4,096 tokens: its torch fallback then works on fp32 copies of 4,096 × 32,768 logits, over 1.5 GiB at
  once. 512 tokens give the same figures.
- Every position is projected, labelled or not: only Triton devices score the labelled positions alone (elsewhere
  a changing tile shape would recompile a compiled graph). An SFT row's prompt carries no labels, so on a CPU,
  which compiles nothing here, only the labelled positions go through the head: the same log-probabilities.
- The backward's gradient products run as fp32 matmuls on fp32 copies of bf16 tiles and weights (torch has no
  bf16 → fp32 `addmm` on a CPU), at a third of the bf16 matmul's speed. The head's vocabulary is taken in one
  chunk instead, so each product is rounded once, as in the unfused model under autocast, and runs in bf16.

TRL exposes these as module constants and helpers; no option reaches them, hence the patching here.
"""

from __future__ import annotations

import sys

import torch

CPU_TOKEN_TILE = 512
CPU_VOCABULARY_CHUNK = 1 << 20  # the whole vocabulary in one chunk


def fit_fused_head_to_cpu() -> None:
    """Off CUDA, when TRL is in use: 512-token tiles, labelled positions only, bf16 gradient products."""
    kernel = sys.modules.get("trl.kernels.chunked_logprob")
    utils = sys.modules.get("trl.trainer.utils")
    if kernel is None or utils is None or torch.cuda.is_available():
        return
    kernel.TOKEN_CHUNK_SIZE = min(kernel.TOKEN_CHUNK_SIZE, CPU_TOKEN_TILE)
    utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_VOCABULARY_CHUNK
    if getattr(utils._use_triton, "__wrapped__", None) is None:
        utils._use_triton = compact_on_cpu(utils._use_triton)
    kernel._addmm_fp32 = addmm_into_fp32


def compact_on_cpu(use_triton):
    """TRL's "score only the labelled positions" test, true on a CPU as well."""

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or use_triton(device)

    compact.__wrapped__ = use_triton
    return compact


def addmm_into_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """`acc += a @ b` for an fp32 `acc`: the product in a and b's own precision (bf16 runs at bf16 speed), then
    added in fp32."""
    if a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and acc.dtype == torch.float32:
        acc.add_(torch.mm(a, b))
    else:
        acc.addmm_(a.float(), b.float())
