"""TRL's fused LM head, fitted to a CPU.

TRL's `add_fused_lm_head` (sft, dpo, kto, grpo) scores the vocabulary in tiles without materialising the logits.
Its tiling is sized for GPUs, and four of its choices cost a CPU dearly:
- Tiles of 4,096 tokens: its torch fallback then works on fp32 copies of 4,096 × 32,768 logits, over 1.5 GiB at
  once. 512 tokens give the same figures.
- Every position is projected, labelled or not: only Triton devices score the labelled positions alone (elsewhere
  a changing tile shape would recompile a compiled graph). An SFT row's prompt carries no labels, so on a CPU,
  which compiles nothing here, only the labelled positions go through the head: the same log-probabilities.
- The backward's gradient products run as fp32 matmuls on fp32 copies of bf16 tiles and weights (torch has no
  bf16 → fp32 `addmm` on a CPU), at a third of the bf16 matmul's speed. The head's vocabulary is taken in one
  chunk instead, so each product is rounded once, as in the unfused model under autocast, and runs in bf16.
- Its torch fallback for the softmax statistics (Triton kernels elsewhere) makes about ten passes over each fp32
  tile of logits in backward and several in forward (scales of 1.0, an index comparison as wide as the vocabulary,
  a masked copy for the top-1 test). With the whole vocabulary in one tile the same figures take three passes
  (`forward_tile`, `backward_tile`); any other case goes to TRL's own.

TRL exposes these as module constants and helpers; no option reaches them, hence the patching here: six module
attributes of `trl.kernels.chunked_logprob` and `trl.trainer.utils`, set for the run and given back to TRL when it
ends (`fused_head_fitted_to_cpu`). The lean folds take the arguments of TRL's private `_forward_tile` and
`_backward_tile`, so those signatures are checked before anything is patched (`missing_internals`), and the
version range below is the one the equivalence tests (tests/test_fused_head.py) passed on.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CHECKED_WITH = {"trl": ("1.16", "1.17")}
KERNEL, UTILS = "trl.kernels.chunked_logprob", "trl.trainer.utils"
CPU_TOKEN_TILE = 512
CPU_VOCABULARY_CHUNK = 1 << 20  # the whole vocabulary in one chunk
# TRL's private fold functions as the lean folds below take their arguments (TRL calls them positionally up to n_cols)
FORWARD_TILE = ("tile", "tile_stride", "targets", "running_max", "sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum",
                "max_before_target", "target_logit", "vocab_start", "n_cols", "logit_scale", "softcap", "inv_t",
                "HAS_SOFTCAP", "HAS_ENTROPY", "HAS_LOG_SUM_SQ_PROBS", "HAS_MEAN_LOGITS", "HAS_IS_TOP1", "BLOCK_SIZE")
BACKWARD_TILE = ("tile", "tile_stride", "targets", "log_z", "entropy", "grad_logprobs", "grad_entropy", "vocab_start",
                 "n_cols", "logit_scale", "softcap", "inv_t", "HAS_SOFTCAP", "HAS_LOGPROB_GRAD", "HAS_ENTROPY_GRAD",
                 "BLOCK_SIZE")
SIGNATURES = {(KERNEL, "_forward_tile"): FORWARD_TILE, (KERNEL, "_backward_tile"): BACKWARD_TILE,
              (KERNEL, "_addmm_fp32"): ("acc", "a", "b"), (UTILS, "_use_triton"): ("device",)}
CONSTANTS = ((KERNEL, "TOKEN_CHUNK_SIZE"), (UTILS, "_CHUNKED_LOGPROB_CHUNK_SIZE"))


def missing_internals() -> list[str]:
    """The TRL names this patches that are missing, or whose arguments differ from those the folds were written
    for ([] when TRL's fused head is not loaded: then there is nothing to patch)."""
    if KERNEL not in sys.modules or UTILS not in sys.modules:
        return []
    missing = [f"{module}.{name}" for module, name in CONSTANTS if not hasattr(sys.modules[module], name)]
    for (module, name), parameters in SIGNATURES.items():
        function = getattr(sys.modules[module], name, None)
        if function is None or tuple(inspect.signature(function).parameters) != parameters:
            missing.append(f"{module}.{name}({', '.join(parameters)})")
    return missing


@contextmanager
def fused_head_fitted_to_cpu() -> Iterator[bool]:
    """Off CUDA, when TRL is in use: inside the block, 512-token tiles, labelled positions only, bf16 gradient
    products and lean folds (yields whether it patched); TRL's own values and functions again after it."""
    kernel, utils = sys.modules.get(KERNEL), sys.modules.get(UTILS)
    if kernel is None or utils is None or torch.cuda.is_available():
        yield False
        return
    fitted = {(kernel, "TOKEN_CHUNK_SIZE"): min(kernel.TOKEN_CHUNK_SIZE, CPU_TOKEN_TILE),
              (utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"): CPU_VOCABULARY_CHUNK,
              (utils, "_use_triton"): compact_on_cpu(utils._use_triton),
              (kernel, "_addmm_fp32"): products_in_bf16(kernel._addmm_fp32),
              (kernel, "_forward_tile"): lean_forward(kernel._forward_tile),
              (kernel, "_backward_tile"): lean_backward(kernel._backward_tile)}
    trls = {place: getattr(*place) for place in fitted}
    try:
        for (module, name), value in fitted.items():
            setattr(module, name, value)
        yield True
    finally:
        for (module, name), value in trls.items():
            setattr(module, name, value)


def compact_on_cpu(use_triton):
    """TRL's "score only the labelled positions" test, true on a CPU as well."""

    def compact(device: torch.device) -> bool:
        return device.type == "cpu" or use_triton(device)

    compact.__wrapped__ = use_triton
    return compact


def products_in_bf16(trl_addmm):
    """TRL's `acc += a @ b` for an fp32 `acc`, or for half-precision a and b: the product in their own precision
    (bf16 runs at bf16 speed), then added in fp32."""

    def addmm_into_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and acc.dtype == torch.float32:
            acc.add_(torch.mm(a, b))
        else:
            trl_addmm(acc, a, b)

    addmm_into_fp32.__wrapped__ = trl_addmm
    return addmm_into_fp32


def plain(flags: dict) -> bool:
    """No logit scale, temperature or soft-capping: the logits are the tile as it is."""
    return not flags["HAS_SOFTCAP"] and flags["logit_scale"] == 1.0 and flags["inv_t"] == 1.0


def lean_forward(trl_fold):
    """TRL's forward fold, or for the first vocabulary tile of plain logits the same statistics in fewer passes."""

    def forward_tile(tile, tile_stride, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum, max_before_target,
                     target_logit, vocab_start, n_cols, **flags):
        if vocab_start != 0 or not plain(flags) or flags["HAS_LOG_SUM_SQ_PROBS"] or flags["HAS_MEAN_LOGITS"]:
            return trl_fold(tile, tile_stride, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum,
                            max_before_target, target_logit, vocab_start, n_cols, **flags)
        z = tile.float()
        top, first = z.max(-1)  # the first maximum, as TRL's top-1 test counts it
        e = (z - top.unsqueeze(-1)).exp_()
        running_max.copy_(top)
        sum_exp.copy_(e.sum(-1))
        if flags["HAS_ENTROPY"]:
            x_sum_exp.copy_(torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1))
        in_tile = targets < n_cols
        target_logit.copy_(torch.where(in_tile, z.gather(-1, targets.clamp(max=n_cols - 1).unsqueeze(-1)).squeeze(-1),
                                       target_logit))
        if flags["HAS_IS_TOP1"]:  # the largest logit before the target: below it when the target is the first maximum
            max_before_target.copy_(torch.where(first == targets, torch.full_like(top, -math.inf), top))

    forward_tile.__wrapped__ = trl_fold
    return forward_tile


def lean_backward(trl_fold):
    """TRL's backward fold, or for plain logits with a log-probability gradient only: d log p_t / dz = 1[t] - p."""

    def backward_tile(tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols,
                      **flags):
        if not plain(flags) or flags["HAS_ENTROPY_GRAD"] or not flags["HAS_LOGPROB_GRAD"]:
            return trl_fold(tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start,
                            n_cols, **flags)
        grad = tile.float().sub_(log_z.unsqueeze(-1)).exp_().mul_(-grad_logprobs.unsqueeze(-1))
        local = targets - vocab_start
        rows = ((local >= 0) & (local < n_cols)).nonzero().squeeze(-1)
        grad[rows, local[rows]] += grad_logprobs[rows]
        tile.copy_(grad)

    backward_tile.__wrapped__ = trl_fold
    return backward_tile
