"""LoRA's base and adapter products in one pass (speedups/fused_lora.py): the figures of peft's own path."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunelab.methods.apply import frozen_weights_in_bf16
from tunelab.speedups.fast_dropout import use_fast_dropout
from tunelab.speedups.fused_lora import FusedLoraProduct, use_fused_lora


def lora_model(tiny_llama, dropout: float, bf16: bool, **options):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", **options)
    model = use_fast_dropout(get_peft_model(model, config))
    for name, param in model.named_parameters():  # B starts at zero: give the adapters something to add
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return frozen_weights_in_bf16(model) if bf16 else model


def loss_and_grads(model, bf16: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad]
    return out.loss.detach(), out.logits.detach().float(), torch.cat(grads)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_gives_peft_figures_in_fp32(tiny_llama, dropout):
    peft_model = lora_model(tiny_llama, dropout, bf16=False).train()
    fused_model = lora_model(tiny_llama, dropout, bf16=False).train()
    assert use_fused_lora(fused_model) == 2 * 7  # every linear layer of both blocks
    calls = []
    original = FusedLoraProduct.forward
    FusedLoraProduct.forward = staticmethod(lambda *a: calls.append(1) or original(*a))
    try:
        fused = loss_and_grads(fused_model, bf16=False)
    finally:
        FusedLoraProduct.forward = staticmethod(original)
    reference = loss_and_grads(peft_model, bf16=False)
    assert len(calls) == 14  # it did take the fused path
    for got, want in zip(fused, reference, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fused_lora_under_bf16_autocast_matches_peft_to_bf16_precision(tiny_llama):
    peft_model = lora_model(tiny_llama, 0.0, bf16=True).train()
    fused_model = lora_model(tiny_llama, 0.0, bf16=True).train()
    use_fused_lora(fused_model)
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = (loss_and_grads(fused_model, True),
                                                                  loss_and_grads(peft_model, True))
    assert abs(loss - ref_loss) < 1e-2 * abs(ref_loss)
    assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.999
    assert all(p.grad.dtype == torch.float32 for p in fused_model.parameters() if p.requires_grad)


def test_disabled_merged_and_variant_adapters_take_pefts_path(tiny_llama):
    model = lora_model(tiny_llama, 0.0, bf16=False).eval()
    use_fused_lora(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert torch.allclose(merged, adapted, atol=1e-5)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        assert torch.allclose(base, reference(input_ids=ids).logits, atol=1e-6)
    dora = lora_model(tiny_llama, 0.0, bf16=False, use_dora=True).eval()
    with torch.no_grad():
        before = dora(input_ids=ids).logits
        use_fused_lora(dora)
        assert torch.equal(dora(input_ids=ids).logits, before)  # DoRA is a variant: peft computes it


@pytest.mark.parametrize("options", [{"use_rslora": True}, {"init_lora_weights": "pissa"}])
def test_fused_lora_gives_peft_figures_with_rslora_scaling_and_a_pissa_base(tiny_llama, options):
    """rsLoRA changes the scaling (alpha/√r) and PiSSA the base weights: the fused pass reads both from the layer."""
    peft_model = lora_model(tiny_llama, 0.0, bf16=False, **options).train()
    fused_model = lora_model(tiny_llama, 0.0, bf16=False, **options).train()
    use_fused_lora(fused_model)
    for got, want in zip(loss_and_grads(fused_model, bf16=False), loss_and_grads(peft_model, bf16=False), strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
