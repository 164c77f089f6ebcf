"""A compiled decode step for an answer that is decoded alone (`tunelab serve --compile`): transformers' static KV
cache and `torch.compile` (inductor) of one step, so that the step's few thousand small ops run as a few fused
kernels instead of one Python dispatch each.

Measured on SmolLM2-135M (benchmarks/decode_step.py, 2-core Xeon with AMX): one step with a static cache of 256
positions takes 37.9 ms eager and 30.7 ms compiled with fp32 weights, 27.3 and 20.1 ms with int8 weights (49.7
tokens/s, llama.cpp's f16 speed on that host). Compiling costs 8 to 47 s per cache length the first time (inductor's
on-disk cache keeps the result for later runs of the same model), so it is opt-in, and only a row that runs alone
uses it: a batch keeps the eager step, whose rows join and leave at every step (a static cache per batch shape would
compile again for each). oneDNN-packed bf16 weights cannot be compiled (inductor cannot lower their kernel).

The row's states live in the static cache of the smallest length bucket that holds its prompt and max_tokens; when
another row joins, they move into a dynamic cache that the eager batch merges as it merges any joining row's.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache

BUCKETS = (256, 512, 1024, 2048)  # cache lengths a step is compiled for; longer answers decode eagerly


class SoloSteps:
    """Compiled decode steps for one row at a time, one per cache length, each with its own static cache (reset for
    every row). `forward(ids, mask, positions, cache, cache_position)` is the decoder's own forward."""

    def __init__(self, model: torch.nn.Module, forward) -> None:
        self.model, self.forward = model, forward
        self.compiled: dict[int, tuple[StaticCache, torch.Tensor, object]] = {}  # length: (cache, mask, step)
        self.active: int | None = None  # the bucket of the row being decoded, if any
        self.length = 0  # positions the row has filled

    def fits(self, positions: int) -> bool:
        return positions <= BUCKETS[-1]

    def start(self, prompt: list[int], positions: int) -> torch.Tensor:
        """Read the prompt (eagerly) into the static cache of the bucket for `positions`; its next-token logits."""
        bucket = next(length for length in BUCKETS if length >= positions)
        if bucket not in self.compiled:
            cache = StaticCache(config=self.model.config, max_cache_len=bucket)
            self.compiled[bucket] = (cache, torch.zeros(1, bucket, dtype=torch.long), self.compile(cache))
        cache, mask, _ = self.compiled[bucket]
        cache.reset()
        mask.zero_()
        mask[:, :len(prompt)] = 1
        steps = torch.arange(len(prompt))
        logits = self.forward(torch.tensor([prompt]), mask[:, :len(prompt)], steps[None], cache, steps)
        self.active, self.length = bucket, len(prompt)
        return logits

    def compile(self, cache: StaticCache):
        def step(ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            return self.forward(ids, mask, position[None], cache, position)

        return torch.compile(step, dynamic=False)

    def step(self, last: torch.Tensor) -> torch.Tensor:
        """The next-token logits after `last` [1, 1]."""
        _, mask, step = self.compiled[self.active]
        mask[:, self.length] = 1
        logits = step(last, mask, torch.tensor([self.length]))
        self.length += 1
        return logits

    def hand_over(self) -> tuple[DynamicCache, torch.Tensor]:
        """The row's states as a dynamic cache and its attention mask, for the eager batch; the static cache is free."""
        cache = self.compiled[self.active][0]
        dynamic = DynamicCache(config=self.model.config)
        for layer, static in zip(dynamic.layers, cache.layers, strict=True):
            layer.update(static.keys[..., :self.length, :].clone(), static.values[..., :self.length, :].clone())
        mask = torch.ones(1, self.length, dtype=torch.long)
        self.active = None
        return dynamic, mask
