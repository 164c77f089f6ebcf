"""Side by side: SmolLM2-135M LoRA forward + backward on padding-free batches, attention through SDPA with the
block-diagonal mask against tunelab's row-by-row attention (methods/packed_attention.py), alternating the two.

Run from the repository root:  PYTHONPATH=src .venv/bin/python benchmarks/packed_attention_ab.py [--repeats 3]
Prints each way's median seconds per step, the ratio, and the largest loss / gradient difference between them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from tunelab.methods.packed_attention import PACKED_ATTENTION

BATCHES = {"short rows (4 × ~140)": [180, 150, 130, 100], "long rows (4 × ~490)": [512, 500, 480, 470]}


def packed_batch(lengths: list[int], vocabulary: int, seed: int) -> dict:
    """One padding-free batch: random tokens, position ids restarting per row, every token a label; no cache (with
    one, transformers builds no block mask and rows attend to each other)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocabulary, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return {"input_ids": ids, "position_ids": positions, "labels": ids.clone(), "use_cache": False}  # as TRL trains


def step(model, batch: dict) -> tuple[float, float, torch.Tensor]:
    """(seconds, loss, the LoRA gradients flattened) of one forward + backward pass under bf16 autocast."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    seconds = time.perf_counter() - start
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return seconds, float(loss), grads


def main(argv: list[str] | None = None) -> int:
    """Alternate the two attention ways over each batch shape; print times, ratio and differences."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from tunelab.methods.apply import load_trainable_decoder
    from tunelab.models.loading import resolve_model
    from tunelab.recipe import LoraMethod

    model = load_trainable_decoder(resolve_model("smollm2-135m").location,
                                   LoraMethod(name="lora", r=16, alpha=32, dropout=0.0), True)
    model.train()
    transformer = next(m for m in model.modules() if hasattr(m, "set_attn_implementation"))
    for name, lengths in BATCHES.items():
        batch = packed_batch(lengths, transformer.config.vocab_size, 0)
        times = {"sdpa": [], PACKED_ATTENTION: []}
        results = {}
        for _ in range(args.repeats + 1):  # the first round warms up and is not timed
            for way in times:
                transformer.set_attn_implementation(way)
                seconds, loss, grads = step(model, batch)
                times[way].append(seconds)
                results[way] = (loss, grads)
        medians = {way: statistics.median(values[1:]) for way, values in times.items()}
        loss_gap = abs(results["sdpa"][0] - results[PACKED_ATTENTION][0])
        grad_gap = float((results["sdpa"][1] - results[PACKED_ATTENTION][1]).abs().max())
        grad_scale = float(results["sdpa"][1].abs().max())
        print(f"{name}: sdpa+mask {medians['sdpa']:.3f} s, row by row {medians[PACKED_ATTENTION]:.3f} s "
              f"({medians['sdpa'] / medians[PACKED_ATTENTION]:.2f}x); loss {results['sdpa'][0]:.5f} vs "
              f"{results[PACKED_ATTENTION][0]:.5f} (|Δ| {loss_gap:.1e}); max |Δgrad| {grad_gap:.1e} of max |grad| "
              f"{grad_scale:.1e}; all times {times}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
