"""The next token of every row of a batch at once: greedy rows take the argmax, sampling rows draw from their own
temperature / top-k / top-p distribution with their own seeded generator.

Why by hand: `generate`'s logits warpers take one setting for the whole batch, and transformers' continuous
batching takes per-request temperature / top-k / top-p but one seed per manager, so a request's seeded answer
would depend on which requests it was batched with. Here one sort serves the whole sub-batch of sampling rows and
each row draws one uniform number from its own generator, so a seed gives the same answer in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Sampling divides the logits by the temperature: a tiny one (1e-300 is a valid float) would turn them into inf and
# the softmax into NaN. With the row's maximum subtracted first and the temperature floored here, the likeliest
# token gets probability ~1: a tiny temperature samples as greedy does.
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class Sampling:
    """How one answer is decoded: 0 temperature is greedy; `seed` makes sampling reproducible."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k cut
    seed: int | None = None
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def new_generator(sampling: Sampling, offset: int = 0) -> torch.Generator | None:
    """The row's own random stream (None for greedy rows): seeded from `seed + offset` (the n-th choice of a
    request), else from fresh entropy."""
    if sampling.greedy:
        return None
    generator = torch.Generator()
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed + offset)
    return generator


def next_tokens(logits: torch.Tensor, settings: list[Sampling], generators: list[torch.Generator | None],
                eos_ids: list[int]) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab] (float), each row decoded by its own settings."""
    logits = logits.float()
    masked = [i for i, s in enumerate(settings) if s.ignore_eos]
    if masked and eos_ids:
        logits[torch.tensor(masked)[:, None], torch.tensor(eos_ids)[None, :]] = float("-inf")
    tokens = logits.argmax(-1)
    sampled = [i for i, s in enumerate(settings) if not s.greedy]
    if sampled:
        rows = torch.tensor(sampled)
        tokens[rows] = draw(logits[rows], [settings[i] for i in sampled], [generators[i] for i in sampled])
    return tokens


def draw(logits: torch.Tensor, settings: list[Sampling], generators: list[torch.Generator]) -> torch.Tensor:
    """Sample a token per row: temperature, then top-k and top-p on the sorted distribution, then the inverse of
    its cumulative sum at the row's uniform draw."""
    vocab = logits.shape[-1]
    temperature = torch.tensor([max(s.temperature, MIN_TEMPERATURE) for s in settings])[:, None]
    scaled = (logits - logits.max(-1, keepdim=True).values) / temperature  # see MIN_TEMPERATURE
    ordered, order = scaled.sort(-1, descending=True)
    top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in settings])[:, None]
    ordered = ordered.masked_fill(torch.arange(vocab)[None, :] >= top_k, float("-inf"))
    probabilities = torch.softmax(ordered, -1)
    top_p = torch.tensor([s.top_p for s in settings])[:, None]
    # keep the smallest set of likeliest tokens reaching top_p (the likeliest token always stays)
    probabilities = probabilities.masked_fill(probabilities.cumsum(-1) - probabilities > top_p, 0.0)
    cumulative = probabilities.cumsum(-1)
    uniform = torch.stack([torch.rand((), generator=g) for g in generators]) * cumulative[:, -1]
    picked = torch.searchsorted(cumulative, uniform[:, None], right=True).clamp(max=vocab - 1)
    return order.gather(1, picked).squeeze(1)
