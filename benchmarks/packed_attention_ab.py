"""Side by side: SmolLM2-135M LoRA forward + backward on padding-free batches, attention through SDPA with the
block-diagonal mask (what transformers does with restarting position ids) against tunelab's row-by-row attention
(speedups/packed_attention.py), alternating the two.

Run from the repository root:
    PYTHONPATH=src .venv/bin/python benchmarks/packed_attention_ab.py [--repeats 3]
    PYTHONPATH=src python3 benchmarks/packed_attention_ab.py --device cuda --random-weights   # e.g. on a lent GPU
`--random-weights` builds the model from SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, vocab
49,152) with random weights, for a machine without the bundled model: the timings need the shapes, not the values.
Prints each way's median seconds per step, the ratio, and the largest loss / gradient difference between them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from tunelab.speedups.packed_attention import PACKED_ATTENTION

BATCHES = {"short rows (4 × ~140)": [180, 150, 130, 100], "long rows (4 × ~490)": [512, 500, 480, 470],
           "16 rows (~140)": [180, 170, 160, 150, 150, 140, 140, 140, 130, 130, 120, 120, 110, 100, 100, 90]}
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                 "tie_word_embeddings": True, "rope_theta": 100000.0}


def packed_batch(lengths: list[int], vocabulary: int, seed: int, device: str) -> dict:
    """One padding-free batch: random tokens, position ids restarting per row, every token a label; no cache (with
    one, transformers builds no block mask and rows attend to each other)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocabulary, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    batch = {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}
    return {**{key: value.to(device) for key, value in batch.items()}, "use_cache": False}  # as TRL trains


def step(model, batch: dict, device: str) -> tuple[float, float, torch.Tensor]:
    """(seconds, loss, the LoRA gradients flattened) of one forward + backward pass under bf16 autocast."""
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grads = torch.cat([p.grad.detach().flatten().float() for p in model.parameters() if p.grad is not None])
    return seconds, float(loss.detach()), grads


def lora_model(random_weights: bool, device: str):
    """SmolLM2-135M (bundled, or its shape with random weights) with LoRA r16 alpha 32 on every linear layer, its
    frozen base in bf16 as tunelab trains it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    if random_weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPE), attn_implementation="sdpa")
    else:
        from tunelab.models.loading import load_causal_lm, resolve_model

        model = load_causal_lm(resolve_model("smollm2-135m").location)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    return model.to(device).train()


def main(argv: list[str] | None = None) -> int:
    """Alternate the two attention ways over each batch shape; print times, ratio and differences."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2-135M's shape, random weights")
    args = parser.parse_args(argv)
    model = lora_model(args.random_weights, args.device)
    transformer = next(m for m in model.modules() if hasattr(m, "set_attn_implementation"))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"packed_attention_ab: {device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'random' if args.random_weights else 'bundled'} weights", flush=True)
    for name, lengths in BATCHES.items():
        batch = packed_batch(lengths, transformer.config.vocab_size, 0, args.device)
        times = {"sdpa": [], PACKED_ATTENTION: []}
        results = {}
        for _ in range(args.repeats + 1):  # the first round warms up and is not timed
            for way in times:
                transformer.set_attn_implementation(way)
                seconds, loss, grads = step(model, batch, args.device)
                times[way].append(seconds)
                results[way] = (loss, grads)
        medians = {way: statistics.median(values[1:]) for way, values in times.items()}
        loss_gap = abs(results["sdpa"][0] - results[PACKED_ATTENTION][0])
        grad_gap = float((results["sdpa"][1] - results[PACKED_ATTENTION][1]).abs().max())
        grad_scale = float(results["sdpa"][1].abs().max())
        print(f"{name}: sdpa+mask {medians['sdpa']:.4f} s, row by row {medians[PACKED_ATTENTION]:.4f} s "
              f"({medians['sdpa'] / medians[PACKED_ATTENTION]:.2f}x); loss {results['sdpa'][0]:.5f} vs "
              f"{results[PACKED_ATTENTION][0]:.5f} (|Δ| {loss_gap:.1e}); max |Δgrad| {grad_gap:.1e} of max |grad| "
              f"{grad_scale:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
