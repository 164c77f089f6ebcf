"""TRL's fused LM head fitted to a CPU (speedups/fused_head.py): labelled positions only, bf16 products, the same
figures."""

import math

import pytest
import torch
import trl.kernels.chunked_logprob as kernel
import trl.trainer.utils as trl_utils
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from tunelab.speedups.fused_head import CPU_TOKEN_TILE, fused_head_fitted_to_cpu


def scored(tiny_llama, bf16: bool):
    """Summed response log-probabilities, their count and the gradient of every weight, through the fused head."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if bf16:
        model.to(torch.bfloat16)
        model.lm_head.weight.requires_grad_(False)  # a frozen bf16 base, as adapters train it; the rest in bf16
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what TRL's SFT logs
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :15] = -100  # a prompt without labels
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
    out.loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return out.log_probs.detach().float(), out.label_mask, grads, out.entropy.detach().float(), out.is_top1


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_fitted_head_gives_trls_figures(tiny_llama, bf16):
    reference = scored(tiny_llama, bf16)
    with fused_head_fitted_to_cpu():
        assert kernel.TOKEN_CHUNK_SIZE == CPU_TOKEN_TILE and trl_utils._use_triton(torch.device("cpu"))
        fitted = scored(tiny_llama, bf16)
        assert kernel._forward_tile.__wrapped__ is not None  # the lean folds did the work, TRL's the reference
    assert torch.equal(fitted[1], reference[1])
    assert not fitted[0][~fitted[1]].any()  # unlabelled positions are zero, as TRL returns them
    tolerance = 2e-2 if bf16 else 1e-5
    assert torch.allclose(fitted[0], reference[0], atol=tolerance, rtol=tolerance)
    assert torch.nn.functional.cosine_similarity(fitted[2], reference[2], dim=0) > (0.999 if bf16 else 1 - 1e-6)
    labelled = fitted[1]
    assert torch.allclose(fitted[3][labelled], reference[3][labelled], atol=tolerance, rtol=tolerance)
    assert torch.equal(fitted[4][labelled], reference[4][labelled])


def test_lean_folds_give_trls_statistics_on_a_tile_with_ties_and_targets_everywhere():
    torch.manual_seed(0)
    tile = torch.randn(6, 50).to(torch.bfloat16)
    tile[1, 7] = tile[1, 30] = tile[1].max() + 1  # a tie: the first maximum wins the top-1 test
    targets = torch.tensor([0, 30, 7, 49, 12, 25])
    tile[3, 49] = tile[3].max() + 1  # the target is the maximum
    flags = {"logit_scale": 1.0, "softcap": 1.0, "inv_t": 1.0, "HAS_SOFTCAP": False, "BLOCK_SIZE": 1024}
    outputs = {"HAS_ENTROPY": True, "HAS_LOG_SUM_SQ_PROBS": False, "HAS_MEAN_LOGITS": False, "HAS_IS_TOP1": True}

    def fold(forward):
        stats = [torch.full((6,), -math.inf), torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.zeros(6),
                 torch.full((6,), -math.inf), torch.zeros(6)]
        forward(tile.clone(), 50, targets, *stats, 0, 50, **outputs, **flags)
        running_max, sum_exp, x_sum_exp, _, _, before, target_logit = stats
        log_z = running_max + sum_exp.log()
        return (target_logit - log_z, log_z - x_sum_exp / sum_exp,
                (target_logit >= running_max) & (target_logit > before), log_z)

    trl_figures = fold(kernel._forward_tile)
    with fused_head_fitted_to_cpu():
        lean_figures = fold(kernel._forward_tile)
        lean_backward = kernel._backward_tile
    assert torch.equal(lean_figures[2], trl_figures[2])
    assert not lean_figures[2][1] and lean_figures[2][3]  # the tie goes to token 7, not the target 30; 49 is top
    for lean, trl_figure in zip(lean_figures[:2], trl_figures[:2], strict=True):
        assert torch.allclose(lean, trl_figure, atol=1e-5)
    grads = []
    for backward in (kernel._backward_tile, lean_backward):
        out = tile.clone().float()
        backward(out, 50, targets, trl_figures[3], trl_figures[1], torch.full((6,), 0.5), None, 0, 50,
                 HAS_LOGPROB_GRAD=True, HAS_ENTROPY_GRAD=False, **flags)
        grads.append(out)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_the_bf16_product_is_rounded_once_and_summed_in_fp32():
    a = torch.randn(64, 96, dtype=torch.bfloat16)
    b = torch.randn(96, 32, dtype=torch.bfloat16)
    acc, exact = torch.ones(64, 32), torch.ones(64, 32)
    with fused_head_fitted_to_cpu():
        kernel._addmm_fp32(acc, a, b)
        kernel._addmm_fp32(exact, a.float(), b.float())  # fp32 inputs: fp32 product
    assert torch.equal(acc, 1 + (a @ b).float())
    assert torch.allclose(exact, 1 + a.float() @ b.float())
