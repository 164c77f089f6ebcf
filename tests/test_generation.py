"""tunelab's generation engine on a tiny Llama (random weights): greedy answers equal plain transformers' `generate`
however rows join and leave the batch, a seeded sample is the same alone or batched, stops and limits end a row as
the OpenAI contract says, and a short answer that joins a running long one finishes first."""

from __future__ import annotations

import pytest
import torch
from conftest import seeded_random_weights
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

from tunelab.errors import TunelabError
from tunelab.generation import weights
from tunelab.generation.engine import answer_all, decoder_for, new_row
from tunelab.generation.sampling import Sampling
from tunelab.generation.text import AnswerText
from tunelab.generation.weights import PACKED_ABOVE_ROWS, Int8Linear, PackedLinear, auto_format, use_format
from tunelab.models.precision import bf16_supported

PROMPTS = ["the day was", "a lovely chair by the window", "it", "the paper is on the table in the", "a day"]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tokenizer


def plain_greedy(model, tokenizer, text: str, max_new_tokens: int, ignore_eos: bool = False) -> str:
    """transformers' own greedy answer to one prompt, alone (the reference)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    extra = {"suppress_tokens": [tokenizer.eos_token_id]} if ignore_eos else {}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                             **extra)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_greedy_answers_equal_plain_generate_while_rows_join_and_leave(llama):
    model, tokenizer = llama
    expected = [plain_greedy(model, tokenizer, p, 12) for p in PROMPTS]
    prompts = tokenizer(PROMPTS)["input_ids"]
    for batch_size in (1, 2, 5):  # with 2, rows leave and the next prompts join a running batch
        decoder = decoder_for(model, tokenizer)
        assert answer_all(decoder, prompts, Sampling(max_tokens=12), batch_size) == expected, batch_size
    # rows of different lengths joining at different steps, the cache left-padded and trimmed as they go
    decoder = decoder_for(model, tokenizer)
    rows = [new_row(decoder, prompt, Sampling(max_tokens=4 + 3 * i)) for i, prompt in enumerate(prompts)]
    decoder.admit(rows[:2])
    decoder.step()
    decoder.admit(rows[2:4])
    for _ in range(3):
        decoder.step()
    decoder.admit(rows[4:])
    while decoder.rows:
        decoder.step()
    assert [row.text.text.strip() for row in rows] == [plain_greedy(model, tokenizer, p, 4 + 3 * i)
                                                       for i, p in enumerate(PROMPTS)]


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch_and_seeds_differ(llama):
    model, tokenizer = llama
    prompts = tokenizer(PROMPTS)["input_ids"]
    seeded = Sampling(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)

    def alone(sampling: Sampling) -> list[int]:
        decoder = decoder_for(model, tokenizer)
        row = new_row(decoder, prompts[0], sampling)
        decoder.admit([row])
        while decoder.rows:
            decoder.step()
        return row.tokens

    decoder = decoder_for(model, tokenizer)
    batched = new_row(decoder, prompts[0], seeded)
    others = [new_row(decoder, p, Sampling(max_tokens=16, temperature=0.7, seed=i)) for i, p in enumerate(prompts)]
    decoder.admit(others[:3])
    decoder.step()
    decoder.admit([batched, *others[3:]])
    while decoder.rows:
        decoder.step()
    assert alone(seeded) == alone(seeded) == batched.tokens and len(batched.tokens) == 16
    other_seed = alone(Sampling(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=8, ignore_eos=True))
    assert other_seed != batched.tokens


def test_top_k_one_and_a_tiny_temperature_sample_the_greedy_answer(llama):
    model, tokenizer = llama
    prompts = tokenizer(PROMPTS)["input_ids"]
    greedy = answer_all(decoder_for(model, tokenizer), prompts, Sampling(max_tokens=10), 5)
    for sampling in (Sampling(max_tokens=10, temperature=1.5, top_k=1, seed=1),
                     Sampling(max_tokens=10, temperature=1e-300, seed=2)):
        assert answer_all(decoder_for(model, tokenizer), prompts, sampling, 5) == greedy


def test_a_stop_string_cuts_the_answer_and_max_tokens_ends_it_with_length(llama):
    model, tokenizer = llama
    prompt = tokenizer(PROMPTS[1])["input_ids"]
    decoder = decoder_for(model, tokenizer)
    free = new_row(decoder, prompt, Sampling(max_tokens=20, ignore_eos=True))
    decoder.admit([free])
    while decoder.rows:
        decoder.step()
    assert free.reason == "length" and len(free.tokens) == 20
    stop = free.text.text[5:8]  # three characters from inside the free answer
    cut = free.text.text[:free.text.text.find(stop)]
    stopped = new_row(decoder, prompt, Sampling(max_tokens=20, ignore_eos=True, stops=(stop,)))
    streamed: list[str] = []
    stopped.on_text = streamed.append
    decoder.admit([stopped])
    while decoder.rows:
        decoder.step()
    assert stopped.reason == "stop" and stopped.text.text == cut and "".join(streamed) == cut


def test_a_short_answer_joining_a_long_one_finishes_first(llama):
    model, tokenizer = llama
    decoder = decoder_for(model, tokenizer)
    long = new_row(decoder, tokenizer("the day")["input_ids"], Sampling(max_tokens=40, ignore_eos=True))
    short = new_row(decoder, tokenizer("a chair")["input_ids"], Sampling(max_tokens=4, ignore_eos=True))
    decoder.admit([long])
    for _ in range(5):
        decoder.step()
    decoder.admit([short])
    steps = 0
    while not short.finished:
        decoder.step()
        steps += 1
    assert steps == 3 and not long.finished and len(long.tokens) == 6 + 3  # joined at the next step, left after 4
    while decoder.rows:
        decoder.step()
    assert long.text.text.strip() == plain_greedy(model, tokenizer, "the day", 40, ignore_eos=True)
    assert short.text.text.strip() == plain_greedy(model, tokenizer, "a chair", 4, ignore_eos=True)


def test_incremental_text_equals_decoding_all_tokens_at_once(llama):
    _, tokenizer = llama
    tokens = tokenizer("the lovely chair, by the window: a day it was")["input_ids"] * 3
    text = AnswerText(tokenizer)
    for token in tokens:
        text.add(token)
    assert text.finish() == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.skipif(not bf16_supported(), reason="bf16 and int8 weights decode with bf16 arithmetic: this CPU has none")
@pytest.mark.parametrize("name, layer", [("bfloat16", PackedLinear), ("int8", Int8Linear)])
def test_a_weight_format_replaces_every_linear_and_decodes_as_its_own_generate(tiny_llama, llama, name, layer):
    reference, tokenizer = llama
    model = use_format(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), name)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert sum(isinstance(m, layer) for m in model.modules()) == 2 * 7 + 1  # 2 layers of 7 linears, and the output
    ids = tokenizer(PROMPTS[3], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        before, after = reference(ids).logits, model(ids).logits.float()
    assert not torch.equal(before, after)  # the weights really were rounded...
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.99  # ...and a little
    expected = [plain_greedy(model, tokenizer, p, 12) for p in PROMPTS]
    assert answer_all(decoder_for(model, tokenizer), tokenizer(PROMPTS)["input_ids"], Sampling(max_tokens=12),
                      1) == expected


@pytest.mark.skipif(not bf16_supported(), reason="int8 weights decode with bf16 arithmetic: this CPU has none")
def test_int8_weights_packed_for_many_rows_give_the_kernels_numbers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear(linear.weight.detach(), linear.bias.detach())
    rows = torch.randn(PACKED_ABOVE_ROWS + 8, 64)
    with torch.inference_mode():
        widened = layer(rows).float()
        kernel = torch.cat([layer(rows[i:i + PACKED_ABOVE_ROWS]) for i in range(0, len(rows), PACKED_ABOVE_ROWS)]
                           ).float()
        exact = rows @ (layer.weight_int8.float() * layer.scale.float()[:, None]).T + layer.bias.float()
    torch.testing.assert_close(widened, kernel, rtol=0.02, atol=0.02)
    torch.testing.assert_close(kernel, exact, rtol=0.02, atol=0.02)


def test_weight_formats_are_refused_where_they_cannot_run(tiny_llama, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with pytest.raises(TunelabError, match="weight format 'int4' is not one of float32, bfloat16, int8"):
        use_format(model, "int4")
    monkeypatch.setattr(weights, "bf16_supported", lambda: False)
    for name in ("bfloat16", "int8"):
        with pytest.raises(TunelabError, match=f"{name} weights decode with bf16 arithmetic, which this CPU has no "):
            use_format(model, name)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # refused before anything changed


@pytest.mark.skipif(not bf16_supported(), reason="bf16 and int8 weights decode with bf16 arithmetic: this CPU has none")
def test_gpt2s_conv1d_layers_are_converted_and_a_model_that_reads_its_weights_is_refused():
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    fp32 = seeded_random_weights(GPT2LMHeadModel, config).eval()
    packed = use_format(seeded_random_weights(GPT2LMHeadModel, config).eval(), "bfloat16")
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * 4 + 1  # 4 Conv1D a layer, the output
    ids = torch.tensor([[5, 9, 13, 2, 40]])
    with torch.inference_mode():
        before, after = fp32(ids).logits, packed(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.99  # not transposed
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                             decoder_start_token_id=0, pad_token_id=0)).eval()
    with pytest.raises(TunelabError, match=r"^int8 weights do not run with T5ForConditionalGeneration \(Attr.*; use "
                                           r"float32$"):
        use_format(t5, "int8")


def test_auto_picks_int8_only_for_a_decoder_on_a_cpu_with_native_bf16(tiny_llama, monkeypatch):
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                             decoder_start_token_id=0, pad_token_id=0)).eval()
    monkeypatch.setattr(weights, "bf16_supported", lambda: True)
    assert auto_format(llama) == ("int8", "this CPU runs bf16 natively")
    assert auto_format(t5)[0] == "float32"
    monkeypatch.setattr(weights, "bf16_supported", lambda: False)
    assert auto_format(llama) == ("float32", "this CPU has no native bf16 (AVX-512 BF16 or AMX), which int8 "
                                             "weights decode with")


def test_a_row_alone_decodes_through_compiled_steps_and_hands_over_when_others_join(llama):
    model, tokenizer = llama
    prompts = tokenizer(PROMPTS)["input_ids"]
    decoder = decoder_for(model, tokenizer)
    assert decoder.compile_solo_steps()
    alone = new_row(decoder, prompts[0], Sampling(max_tokens=20, ignore_eos=True))
    decoder.admit([alone])
    for _ in range(5):
        decoder.step()
    assert decoder.alone and list(decoder.solo.compiled) == [256]
    joining = [new_row(decoder, prompt, Sampling(max_tokens=6)) for prompt in prompts[1:3]]
    decoder.admit(joining)  # the lone row's states move to the eager batch's cache
    assert not decoder.alone and len(decoder.rows) == 3
    while decoder.rows:
        decoder.step()
    assert alone.text.text.strip() == plain_greedy(model, tokenizer, PROMPTS[0], 20, ignore_eos=True)
    assert [row.text.text.strip() for row in joining] == [plain_greedy(model, tokenizer, p, 6) for p in PROMPTS[1:3]]
    # the next lone rows reuse the static cache, reset: their answers do not see the earlier rows'
    assert answer_all(decoder, prompts[3:], Sampling(max_tokens=12), 1) == [plain_greedy(model, tokenizer, p, 12)
                                                                           for p in PROMPTS[3:]]
    assert list(decoder.solo.compiled) == [256]
