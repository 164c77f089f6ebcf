"""Row-by-row attention over padding-free batches (speedups/packed_attention.py)."""

import torch
from transformers import AutoModelForCausalLM

from tunelab.speedups.packed_attention import PACKED_ATTENTION, row_bounds, use_packed_attention

LENGTHS = [7, 5, 9]


def packed(vocabulary: int) -> dict:
    ids = torch.randint(3, vocabulary, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    return {"input_ids": ids, "position_ids": positions, "labels": ids.clone(), "use_cache": False}


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_row_bounds_finds_the_rows_of_one_packed_sequence_only():
    assert row_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]]), 6) == [0, 3, 5, 6]
    assert row_bounds(torch.tensor([[0, 1, 2, 3]]), 4) is None  # one row: nothing to split
    assert row_bounds(torch.tensor([[0, 1, 0], [0, 1, 2]]), 3) is None  # a padded batch of two rows
    assert row_bounds(torch.tensor([[4, 5, 0]]), 3) is None  # a continuation (cache), not rows from 0
    assert row_bounds(None, 3) is None


def test_packed_attention_equals_each_row_alone_and_sdpas_block_mask(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").train()
    batch = packed(model.config.vocab_size)
    masked_logits, masked_grads = loss_and_grads(model, batch)
    assert use_packed_attention(model)
    assert model.config._attn_implementation == PACKED_ATTENTION
    logits, grads = loss_and_grads(model, batch)
    assert torch.allclose(logits, masked_logits, atol=1e-5)
    assert torch.allclose(grads, masked_grads, atol=1e-5)
    with torch.no_grad():  # and each row scored on its own, as if it were the only one
        starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
        alone = torch.cat([model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits
                           for a, b in zip(starts[:-1], starts[1:], strict=False)], dim=1)
    assert torch.allclose(logits, alone, atol=1e-5)


def test_padded_batches_and_generation_attend_as_before_and_the_model_saves_as_sdpa(tiny_llama, tmp_path):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    assert use_packed_attention(model)
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8], [0, 0, 5, 6]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, reference(**inputs).logits, atol=1e-6)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, reference.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0))
    model.save_pretrained(tmp_path / "saved")
    assert PACKED_ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"


def test_on_cuda_the_model_keeps_sdpas_block_mask(tiny_llama, monkeypatch):
    """One attention call per row is launch-bound on a GPU (slower there): only CPUs attend row by row."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not use_packed_attention(model)
    assert model.config._attn_implementation == "sdpa"
