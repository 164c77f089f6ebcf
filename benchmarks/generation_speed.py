"""Decode speed, side by side in one run: plain transformers `generate` against tunelab's generation engine (the one
`serve`, the before/after scoring, `generate`/`chat` and the playground share), per weight format, one request and
8 at once, against the memory-bandwidth bound measured on this machine (and llama.cpp on a gguf export when
llama-cpp-python is installed). One row runs the int8 engine with TUNELAB_SPEEDUPS=0, stepping through transformers'
own forward instead of speedups/decode_step.py. Each way runs in a fresh process.

Greedy, 64 new tokens (end-of-sequence ignored, so every way decodes the same number of tokens), prompts through
the model's chat template. Each way runs twice; the faster is kept (the first run pays warm-up). Then serve's
default way, its 8 at once and llama.cpp run `--rounds` more times, alternating, and the bar's ratios are the medians
of those rounds (this host's speed drifts by 10-30% within minutes, which a single pass reads as a change of
speed).
Prints one JSON object and a markdown table.

    PYTHONPATH=src TUNELAB_DATA_PATH=../shared/data .venv/bin/python benchmarks/generation_speed.py \
        [--model RUN_DIR_OR_ALIAS] [--gguf FILE.gguf] [--tokens 64] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from transformers import AutoModelForCausalLM

from tunelab.generation.engine import answer_all, decoder_for
from tunelab.generation.sampling import Sampling
from tunelab.generation.weights import Int8Linear, auto_format, use_format
from tunelab.models.loading import load_tokenizer, resolve_model
from tunelab.models.precision import bf16_supported

QUESTIONS = ["I have a rash on my arms and my skin itches a lot.", "My joints hurt and I feel tired all day.",
             "I keep coughing and my chest hurts when I breathe.", "I have a headache and light hurts my eyes.",
             "My stomach hurts after I eat and I feel sick.", "I sneeze a lot and my eyes are watery.",
             "I feel dizzy when I stand up and my heart races.", "There is a red patch on my leg that is warm."]


def bandwidth_gb_s() -> float:
    """Memory read bandwidth as decoding meets it: bytes of a 1 GiB fp32 weight matrix streamed per second by a
    matrix-vector product (far beyond the caches; best of 4). A large `sum` reads a little slower here."""
    weights, vector = torch.randn(16384, 16384), torch.randn(1, 16384)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        torch.nn.functional.linear(vector, weights)
        best = min(best, time.perf_counter() - start)
    return weights.numel() * weights.element_size() / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights read per decoded token of one row: every linear layer's weights in whatever format they are
    (oneDNN's packed ones too; of int8 layers the int8 weights and scales, not the packed bf16 copy that batches of
    more than 4 rows read), norms, and of the input embeddings one row, or all of them when the output layer reads
    them (tied)."""
    tensors = {}
    widened = {id(m.widened) for m in model.modules() if isinstance(m, Int8Linear)}
    for module in model.modules():
        if id(module) in widened:
            continue
        if isinstance(module, Int8Linear):
            own = (module.weight_int8, module.scale, module.bias)
        else:
            own = (*module.parameters(recurse=False), *module.buffers(recurse=False), getattr(module, "packed", None))
        for tensor in own:
            if tensor is not None:
                tensors[id(tensor)] = tensor
    embedding = model.get_input_embeddings().weight
    tied = getattr(model.get_output_embeddings(), "weight", None) is embedding
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return total if tied else total - embedding.numel() * embedding.element_size()


def best_of(runs: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def plain_generate(model, tokenizer, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """transformers' `generate`, all prompts in one left-padded batch."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=pad)
    return out[:, width:].tolist()


# (way, weight format): fp32 first, the reference the others' greedy answers are compared with
# (the engine with TUNELAB_SPEEDUPS=0 steps through transformers' forward: what speedups/decode_step.py gains)
WAYS = [("transformers generate", "float32"), ("tunelab engine", "float32"), ("tunelab engine --compile", "float32"),
        ("transformers generate", "bfloat16"), ("tunelab engine", "bfloat16"), ("tunelab engine", "int8"),
        ("tunelab engine TUNELAB_SPEEDUPS=0", "int8"), ("tunelab engine --compile", "int8")]


def engine_generate(model, tokenizer, prompts: list[list[int]], tokens: int, decoder=None) -> list[str]:
    decoder = decoder or decoder_for(model, tokenizer)
    return answer_all(decoder, prompts, Sampling(max_tokens=tokens, ignore_eos=True), batch_size=len(prompts))


def llama_cpp(gguf: str, prompt: str, tokens: int):
    """llama.cpp (llama-cpp-python) on a gguf file answering one request (its Python binding decodes one at a time):
    a function that returns the number of tokens it decoded."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

    def run() -> int:
        llm.reset()
        return llm(prompt, max_tokens=tokens, temperature=0.0, logit_bias={llm.token_eos(): -1e9}
                   )["usage"]["completion_tokens"]

    return run


def in_fresh_process(fn, *args):
    """`fn(*args)` in a new Python process: every way starts from the same clean state (once `torch.compile` has run
    in a process, eager steps there were 8% slower: 37.9 -> 34.7 tokens/s, llama.cpp's unchanged)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measure_way(way: str, weights: str, location: str, prompts: list[list[int]], tokens: int) -> tuple[dict, list]:
    """One way's tokens/s for one request and for 8 at once (best of 2 each), its weight bytes per token, and its
    greedy answers to the 8 prompts."""
    if way.endswith("TUNELAB_SPEEDUPS=0"):
        os.environ["TUNELAB_SPEEDUPS"] = "0"  # this process only
    tokenizer = load_tokenizer(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    compiled = None
    if way == "transformers generate":
        model.to(getattr(torch, weights))
        fn = plain_generate
    else:
        use_format(model, weights)
        fn = engine_generate
        if way.endswith("--compile"):  # a lone answer's steps compiled; a batch decodes eagerly as before
            decoder = decoder_for(model, tokenizer)
            decoder.compile_solo_steps()
            start = time.perf_counter()
            engine_generate(model, tokenizer, prompts[:1], 2, decoder)
            compiled = time.perf_counter() - start
            fn = functools.partial(engine_generate, decoder=decoder)
    one, _ = best_of(2, lambda: fn(model, tokenizer, prompts[:1], tokens))
    eight, answers = best_of(2, lambda: fn(model, tokenizer, prompts, tokens))
    if way == "transformers generate":
        answers = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    row = {"tok_s_1": tokens / one, "tok_s_8": 8 * tokens / eight, "weight_bytes": weight_bytes(model),
           **({"compile_s": round(compiled, 1)} if compiled is not None else {})}
    return row, answers


def tokens_per_second(fn, tokens: int) -> float:
    start = time.perf_counter()
    fn()
    return tokens / (time.perf_counter() - start)


def head_to_head(rounds: int, weights: str, location: str, prompts: list[list[int]], text: str, gguf: str | None,
                 tokens: int) -> dict:
    """Serve's default (the engine in `weights`) one request, 8 at once, and llama.cpp on `gguf` (when given) one
    after the other, `rounds` times: the medians of each round's ratios."""
    tokenizer = load_tokenizer(location)
    model = use_format(AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval(), weights)
    llama = llama_cpp(gguf, text, tokens) if gguf else None
    for warm in (lambda: engine_generate(model, tokenizer, prompts, tokens), llama):
        if warm is not None:
            warm()

    def one() -> list[str]:
        return engine_generate(model, tokenizer, prompts[:1], tokens)

    def eight() -> list[str]:
        return engine_generate(model, tokenizer, prompts, tokens)

    against_llama, eight_to_one = [], []
    for _ in range(rounds):
        alone, together = tokens_per_second(one, tokens), tokens_per_second(eight, 8 * tokens)
        eight_to_one.append(together / alone)
        if llama is not None:
            against_llama.append(alone / tokens_per_second(llama, tokens))
    return {"rounds": rounds, "median_8_to_1": statistics.median(eight_to_one),
            "median_1_to_llama_cpp": statistics.median(against_llama) if against_llama else None,
            "ratios_1_to_llama_cpp": [round(r, 3) for r in against_llama],
            "ratios_8_to_1": [round(r, 3) for r in eight_to_one]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a run folder, model folder or alias")
    parser.add_argument("--gguf", help="a gguf export of the same model, for the llama.cpp row")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds for the bar's ratios (0: none)")
    parser.add_argument("--json")
    args = parser.parse_args()
    location = resolve_model(args.model).location
    tokenizer = load_tokenizer(location)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in QUESTIONS]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    bandwidth = bandwidth_gb_s()
    rows, agreement, reference = [], {}, None
    native_bf16 = bf16_supported()
    default = auto_format(AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32))[0]  # serve's, here
    for way, weights in WAYS:
        if weights != "float32" and not native_bf16:
            continue  # bf16 arithmetic is emulated here, ~100x slower: no row to compare
        row, answers = in_fresh_process(measure_way, way, weights, location, prompts, args.tokens)
        reference = reference or answers  # the first way: fp32 generate
        agreement[f"{way}, {weights}"] = sum(a == r for a, r in zip(answers, reference, strict=True)) / len(answers)
        marked = " (serve's default here)" if way == "tunelab engine" and weights == default else ""
        rows.append({"way": f"{way}, {weights} weights{marked}", **row,
                     "bound_tok_s": bandwidth * 1e9 / row.pop("weight_bytes")})
    if args.gguf:
        try:
            llama = llama_cpp(args.gguf, texts[0], args.tokens)
            seconds, decoded = best_of(2, llama)
            rows.append({"way": f"llama.cpp on {args.gguf.rsplit('/', 1)[-1]}", "tok_s_1": decoded / seconds,
                         "tok_s_8": None})
            del llama
        except ImportError:
            rows.append({"way": "llama.cpp: llama-cpp-python is not installed", "tok_s_1": None, "tok_s_8": None})
    rounds = None
    if args.rounds:
        rounds = in_fresh_process(head_to_head, args.rounds, default, location, prompts, texts[0],
                                  args.gguf if any(r["way"].startswith("llama.cpp on") for r in rows) else None,
                                  args.tokens)
    result = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "native_bf16": native_bf16, "bandwidth_gb_s": round(bandwidth, 1), "new_tokens": args.tokens,
              "model": args.model, "rows": rows,
              "greedy_agreement_8_prompts_with_fp32_generate": agreement, "alternating_rounds": rounds}
    print(json.dumps(result, indent=2))
    print("\n| way | tok/s, 1 request | tok/s, 8 at once | 8 / 1 | bandwidth bound |\n|---|---|---|---|---|")
    for row in rows:
        one, eight = row["tok_s_1"], row["tok_s_8"]
        print(f"| {row['way']} | {one and round(one, 1)} | {eight and round(eight, 1)} | "
              f"{round(eight / one, 2) if one and eight else '–'} | {round(row.get('bound_tok_s') or 0, 1) or '–'} |")
    print(acceptance(rows, rounds))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)


def acceptance(rows: list[dict], rounds: dict | None) -> str:
    """Issue 30's bar for serve's default: one request at >= 0.8x llama.cpp's tokens/s or >= 70% of its own format's
    bandwidth bound, whichever is lower; 8 at once >= 4x one. From the table's pass, then from the alternating
    rounds' medians."""
    default = next(row for row in rows if row["way"].endswith("(serve's default here)"))
    llama = next((row["tok_s_1"] for row in rows if row["way"].startswith("llama.cpp on")), None)
    bars = [0.7 * default["bound_tok_s"]] + ([0.8 * llama] if llama else [])
    one, eight = default["tok_s_1"], default["tok_s_8"]
    text = (f"\nserve's default ({default['way']}): 1 request {one:.1f} tok/s against a bar of {min(bars):.1f} "
            f"({one / min(bars):.2f}x; 0.8x llama.cpp {'= %.1f' % (0.8 * llama) if llama else 'not measured'}, "
            f"70% of the bound = {bars[0]:.1f}); 8 at once {eight / one:.2f}x one (bar 4x)")
    if rounds:
        to_llama = rounds["median_1_to_llama_cpp"]
        against = f"{to_llama:.2f}x llama.cpp (bar 0.8x)" if to_llama else "without llama.cpp"
        text += (f"\nalternating, median of {rounds['rounds']} rounds: 1 request {against}; "
                 f"8 at once {rounds['median_8_to_1']:.2f}x one (bar 4x)")
    return text


if __name__ == "__main__":
    main()
