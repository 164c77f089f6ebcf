"""Where one decode step's time goes, side by side in one run (issue 30's next step): the weights' matrix products
alone (the floor any engine pays), per kernel choice, against a whole step of the model, eager and with a static
KV cache compiled by `torch.compile` (inductor's CPU backend).

Matrix products: every linear layer's weights of the model once (as a decode step reads them), on a batch of 1 and
of 8 rows: torch's default `linear`, MKL's packed fp32 weights, oneDNN's packed bf16 weights (what `--dtype
bfloat16` decodes with), int8 weights with bf16 activations (`--dtype int8`), and torch's dynamic int8 quantization
(int8 activations too). Whole steps: greedy,
batch 1, a static cache of 256 positions, median step after 10 warm-up steps. Prints one JSON object.

    PYTHONPATH=src TUNELAB_DATA_PATH=../shared/data .venv/bin/python benchmarks/decode_step.py [--model ALIAS]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, StaticCache

from tunelab.generation.weights import Int8Linear, PackedLinear
from tunelab.models.loading import load_tokenizer, resolve_model


def best_ms(fn, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 2)


def matmul_floor(model: torch.nn.Module) -> dict:
    """ms to multiply every linear layer's weights by a batch of activations, per kernel and batch size."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return {f"batch {rows}": kernels(weights, rows) for rows in (1, 8)}


def kernels(weights: list[torch.Tensor], rows: int) -> dict:
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    halves = {width: x.bfloat16() for width, x in inputs.items()}
    mkl = [(torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w) for w in weights]
    bf16 = [w.bfloat16() for w in weights]
    packed = [PackedLinear(w, None) for w in weights]  # what --dtype bfloat16 and --dtype int8 decode with
    int8 = [Int8Linear(w, None) for w in weights]
    dynamic = torch.ao.quantization.quantize_dynamic(
        torch.nn.ModuleList(linear_of(w) for w in weights), {torch.nn.Linear}, dtype=torch.qint8)
    return {
        "fp32 linear (default)": best_ms(lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights]),
        "fp32 MKL packed": best_ms(lambda: [torch.ops.mkl._mkl_linear(inputs[w.shape[1]], p, w, None, rows)
                                            for p, w in mkl]),
        "bf16 linear": best_ms(lambda: [torch.nn.functional.linear(halves[w.shape[1]], w) for w in bf16]),
        "bf16 oneDNN packed": best_ms(lambda: [layer(halves[layer.in_features]) for layer in packed]),
        "int8 weight-only, bf16 activations (_weight_int8pack_mm)": best_ms(lambda: [
            layer(halves[layer.in_features]) for layer in int8]),
        "int8 dynamic, int8 activations (torch.ao, fbgemm)": best_ms(lambda: [
            layer(inputs[layer.in_features]) for layer in dynamic]),
    }


def linear_of(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    return layer


def step_ms(model: torch.nn.Module, prompt: list[int], compiled: bool, length: int = 256) -> tuple[float, float]:
    """Median ms of a batch-1 greedy decode step with a static cache, and the first step's seconds (the compile)."""
    cache = StaticCache(config=model.config, max_cache_len=length)
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[:, :len(prompt)] = 1

    def step(ids, positions, mask, cache_position):
        return model(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache,
                     cache_position=cache_position, use_cache=True, logits_to_keep=1).logits[:, -1]

    run = torch.compile(step, dynamic=False) if compiled else step
    times = []
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt]), attention_mask=mask[:, :len(prompt)], past_key_values=cache,
                       cache_position=torch.arange(len(prompt)), use_cache=True, logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1)[:, None]
        for i in range(len(prompt), len(prompt) + 60):
            start = time.perf_counter()
            mask[:, i] = 1
            token = run(token, torch.tensor([[i]]), mask, torch.tensor([i])).argmax(-1)[:, None]
            times.append(time.perf_counter() - start)
    return round(statistics.median(times[10:]) * 1000, 2), round(times[0], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    location = resolve_model(args.model).location
    tokenizer = load_tokenizer(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32).eval()
    prompt = tokenizer("I have a rash on my arms and my skin itches a lot. What could it be?")["input_ids"]
    eager, _ = step_ms(model, prompt, compiled=False)
    compiled, first = step_ms(model, prompt, compiled=True)
    print(json.dumps({"model": args.model, "threads": torch.get_num_threads(), "matmul_only_ms": matmul_floor(model),
                      "fp32 step, static cache, eager ms": eager, "fp32 step, static cache, compiled ms": compiled,
                      "compiled first step s (compile; inductor's on-disk cache warm or cold)": first}, indent=2))


if __name__ == "__main__":
    main()
