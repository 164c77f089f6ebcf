"""TRL's fused LM head fitted to a CPU (fused_head.py): labelled positions only, bf16 products, the same figures."""

import pytest
import torch
import trl.kernels.chunked_logprob as kernel
import trl.trainer.utils as trl_utils
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from tunelab.fused_head import CPU_TOKEN_TILE, fit_fused_head_to_cpu


def scored(tiny_llama, bf16: bool):
    """Summed response log-probabilities, their count and the gradient of every weight, through the fused head."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if bf16:
        model.to(torch.bfloat16)
        model.lm_head.weight.requires_grad_(False)  # a frozen bf16 base, as adapters train it; the rest in bf16
    add_fused_lm_head(model)
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :15] = -100  # a prompt without labels
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
    out.loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return out.log_probs.detach().float(), out.label_mask, grads


@pytest.fixture
def trl_defaults(monkeypatch):
    """TRL's own settings, restored after the test whatever fit_fused_head_to_cpu changed."""
    for module, name in [(kernel, "TOKEN_CHUNK_SIZE"), (kernel, "_addmm_fp32"), (trl_utils, "_use_triton"),
                         (trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE")]:
        monkeypatch.setattr(module, name, getattr(module, name))


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_fitted_head_gives_trls_figures(tiny_llama, trl_defaults, bf16):
    reference = scored(tiny_llama, bf16)
    fit_fused_head_to_cpu()
    assert kernel.TOKEN_CHUNK_SIZE == CPU_TOKEN_TILE and trl_utils._use_triton(torch.device("cpu"))
    fitted = scored(tiny_llama, bf16)
    assert torch.equal(fitted[1], reference[1])
    assert not fitted[0][~fitted[1]].any()  # unlabelled positions are zero, as TRL returns them
    tolerance = 2e-2 if bf16 else 1e-5
    assert torch.allclose(fitted[0], reference[0], atol=tolerance, rtol=tolerance)
    assert torch.nn.functional.cosine_similarity(fitted[2], reference[2], dim=0) > (0.999 if bf16 else 1 - 1e-6)


def test_the_bf16_product_is_rounded_once_and_summed_in_fp32(trl_defaults):
    fit_fused_head_to_cpu()
    a = torch.randn(64, 96, dtype=torch.bfloat16)
    b = torch.randn(96, 32, dtype=torch.bfloat16)
    acc = torch.ones(64, 32)
    kernel._addmm_fp32(acc, a, b)
    assert torch.equal(acc, 1 + (a @ b).float())
    exact = torch.ones(64, 32)
    kernel._addmm_fp32(exact, a.float(), b.float())  # fp32 inputs: fp32 product
    assert torch.allclose(exact, 1 + a.float() @ b.float())
