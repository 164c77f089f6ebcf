"""One generation engine for every place tunelab generates (serve, the before/after scoring, `generate`, `chat`,
the playground): a causal LM decoding a batch of answers one token per step, where answers join the batch and
leave it between steps (continuous batching), so a short answer never waits for a long one to end.

The rows share one KV cache (transformers' `DynamicCache`), right-aligned: a row that joins is prefilled on its
own and its cache left-padded to the batch's width; a row that ends is dropped from the cache, and columns that
only padding holds any more are cut off. Once `compile_solo_steps` is called, a row that starts alone decodes
through a compiled step over a static cache instead (compiled.py), until another row joins it. Each row keeps its
own sampling settings and seeded generator (sampling.py), stop strings and incrementally decoded text (text.py).

Why not `generate` or transformers' continuous batching: `generate` runs one batch to its end (the measured
symptom: a 4-token request behind a 1,000-token one waited for all 1,000), and its continuous-batching manager
(`init_continuous_batching`) fixes greedy-or-sampling and the seed per manager, which breaks the OpenAI contract of
per-request settings and seeds. The loop here is the part neither gives: a forward per step, the cache rows moved
with plain tensor ops. A Llama-family model steps through speedups/decode_step.py: its own modules without
transformers' per-call plumbing, the same logits. Encoder-decoders and caches that are not plain `DynamicLayer`s
(sliding windows) cannot join a running batch: their rows wait until the batch is empty, then run together.
"""

from __future__ import annotations

import functools
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from types import ModuleType

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from tunelab.errors import one_line
from tunelab.generation.compiled import SoloSteps
from tunelab.generation.sampling import Sampling, next_tokens
from tunelab.generation.text import AnswerText
from tunelab.generation.weights import stack_int8
from tunelab.models.precision import autocast
from tunelab.speedups import decode_step_for


@dataclass(eq=False)
class Row:
    """One answer being generated. Subclasses hear of its progress through the three `on_` hooks (called from the
    decoding thread)."""

    prompt: list[int]
    sampling: Sampling
    text: AnswerText
    generator: torch.Generator | None = None
    finished: bool = False
    cancelled: bool = False
    reason: str | None = None  # "stop" or "length" once finished
    eos: int | None = None  # the end-of-sequence token the answer ended with (not part of its tokens or text)
    error: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def tokens(self) -> list[int]:
        return self.text.tokens

    def on_text(self, piece: str) -> None:
        """New text that will not change any more."""

    def on_done(self, reason: str) -> None:
        """The answer is complete (after its last on_text)."""

    def on_error(self, message: str) -> None:
        """The answer failed; no more events follow."""

    def cancel(self) -> None:
        """The reader went away: the row leaves the batch at the next step."""
        self.cancelled = True

    def finish(self, reason: str, cut: int | None = None) -> None:
        self.text.finish(cut)
        piece = self.text.rest()
        if piece:
            self.on_text(piece)
        self.finished, self.reason = True, reason
        self.on_done(reason)

    def fail(self, exc: BaseException) -> None:
        traceback.print_exc(file=sys.stderr)
        self.finished, self.error = True, failure(exc)
        self.on_error(self.error)

    def advance(self, token: int, eos_ids: set[int]) -> None:
        """Take the row's next token: end at end-of-sequence, a stop string or max_tokens; else stream the text
        that is final."""
        if token in eos_ids and not self.sampling.ignore_eos:
            self.eos = token
            self.finish("stop")
            return
        cut = self.text.add(token)
        if cut is not None:
            self.finish("stop", cut)
        elif len(self.tokens) >= self.sampling.max_tokens:
            self.finish("length")
        else:
            piece = self.text.release()
            if piece:
                self.on_text(piece)


class Decoder:
    """A causal LM with its running batch: `admit` rows, then `step` until `rows` is empty."""

    def __init__(self, model: torch.nn.Module, tokenizer, eos_ids: set[int], bf16: bool = False) -> None:
        self.model, self.tokenizer, self.bf16 = model, tokenizer, bf16  # in eval mode: the caller's to set
        self.eos_ids = set(eos_ids)
        self.pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft passes it on
        accepts = inspect.signature(self.base.forward).parameters
        self.keep_last = "logits_to_keep" in accepts
        self.cache_keyword = "cache" if "cache" in accepts else "past_key_values"  # renamed in transformers 5.x
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, width]: 1 where a row has a real token
        self.last: torch.Tensor | None = None  # [rows, 1]: each row's latest token, the next step's input
        self.steps = 0
        self.solo: SoloSteps | None = None  # compiled steps for a row decoded alone, once `compile_solo_steps`

    @functools.cached_property
    def plain(self) -> ModuleType | None:
        """A decode step without transformers' plumbing (speedups/decode_step.py) where it gives this model's own
        logits; found at the first forward, after any change of weight format (serve converts after building this)."""
        return decode_step_for(self.base, stack=stack_int8)

    def compile_solo_steps(self) -> bool:
        """From now on, a row that starts alone decodes through compiled steps (compiled.py), until another joins;
        False when this model's cache cannot hand such a row over to a batch (sliding windows)."""
        if full_attention(DynamicCache(config=self.model.config)):
            self.solo = SoloSteps(self.model, self.forward)
        return self.solo is not None

    @property
    def alone(self) -> bool:
        """Whether the one running row is decoding through the compiled steps."""
        return self.solo is not None and self.solo.active is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def can_join(self) -> bool:
        """Whether rows may join now: the batch is empty, or its cache is one this module can pad and merge."""
        return not self.rows or self.alone or full_attention(self.cache)

    # -- rows join ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def admit(self, rows: list[Row]) -> None:
        """Prefill `rows` together (their prompts left-padded), pick their first tokens, and merge them into the
        running batch."""
        rows = [row for row in rows if not row.cancelled]
        if not rows:
            return
        if self.solo is not None and not self.rows and len(rows) == 1:
            positions = len(rows[0].prompt) + rows[0].sampling.max_tokens
            if self.solo.fits(positions):
                self.admit_alone(rows[0], positions)
                return
        if self.alone:  # a row joins the one decoding alone: its states move to the eager batch's cache
            self.cache, self.mask = self.solo.hand_over()
        ids, mask = self.left_padded(rows)
        cache = DynamicCache(config=self.model.config)
        logits = self.forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
        tokens = self.pick(rows, logits)
        if self.rows:
            self.cache, self.mask = merge(self.cache, self.mask, cache, mask)
            self.last = torch.cat([self.last, tokens[:, None]])
        else:
            self.cache, self.mask, self.last = cache, mask, tokens[:, None]
        self.rows += rows
        self.hand(rows, tokens.tolist())
        self.drop_finished()

    def admit_alone(self, row: Row, positions: int) -> None:
        """Read a row's prompt into the compiled steps' static cache and pick its first token."""
        tokens = self.pick([row], self.solo.start(row.prompt, positions))
        self.rows, self.last = [row], tokens[:, None]
        self.hand([row], tokens.tolist())
        self.drop_finished()

    def left_padded(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' prompts as one left-padded batch: token ids and attention mask."""
        width = max(len(row.prompt) for row in rows)
        ids = torch.tensor([[self.pad] * (width - len(row.prompt)) + row.prompt for row in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(row.prompt)) + [1] * len(row.prompt) for row in rows],
                            device=self.device)
        return ids, mask

    # -- one step ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Decode one more token for every running row."""
        if self.alone:
            logits = self.solo.step(self.last)
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
            positions = self.mask.sum(-1, keepdim=True) - 1
            logits = self.forward(self.last, self.mask, positions, self.cache)
        tokens = self.pick(self.rows, logits)
        self.last = tokens[:, None]
        self.steps += 1
        self.take(tokens)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache,
                cache_position: torch.Tensor | None = None) -> torch.Tensor:
        """The model's next-token logits [rows, vocab] for the last position of each row."""
        if self.plain is not None and cache_position is None and self.plain.steps(self.base, cache, ids):
            with autocast(self.bf16):
                return self.plain.decode_step(self.base, ids, mask, positions, cache)
        extra = {"logits_to_keep": 1} if self.keep_last else {}
        if cache_position is not None:  # a static cache's slots (compiled.py)
            extra["cache_position"] = cache_position
        with autocast(self.bf16):  # bf16 matmuls where the machine runs them natively and the caller asks
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self.cache_keyword: cache}, **extra)
        return out.logits[:, -1]

    def pick(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token by its own settings; a row whose sampling raises fails alone (greedy token)."""
        eos = sorted(self.eos_ids)
        try:
            return next_tokens(logits, [r.sampling for r in rows], [r.generator for r in rows], eos)
        except Exception:  # noqa: BLE001 - find the row that raised, so that it fails alone
            tokens = logits.argmax(-1)
            for i, row in enumerate(rows):
                try:
                    tokens[i] = next_tokens(logits[i:i + 1], [row.sampling], [row.generator], eos)[0]
                except Exception as exc:  # noqa: BLE001 - the row ends with the error
                    row.fail(exc)
            return tokens

    def take(self, tokens: torch.Tensor) -> None:
        """Hand each row its token, then drop the rows that ended from the batch."""
        self.hand(self.rows, tokens.tolist())
        self.drop_finished()

    def hand(self, rows: list[Row], tokens: list[int]) -> None:
        """Each running row's next token (a cancelled row just ends)."""
        for row, token in zip(rows, tokens, strict=True):
            if row.finished:
                continue
            if row.cancelled:
                row.finished = True
                continue
            try:
                row.advance(token, self.eos_ids)
            except Exception as exc:  # noqa: BLE001 - a row that cannot be decoded ends alone
                row.fail(exc)

    # -- rows leave ----------------------------------------------------------------------------------------------
    def drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        first = int(self.mask.any(0).nonzero()[0])  # columns before it hold only padding now
        if first > 0 and full_attention(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]

    def fail_all(self, exc: BaseException) -> None:
        """The batch's forward raised: every running row ends with the error, and the batch starts afresh."""
        for row in self.rows:
            if not row.finished:
                row.fail(exc)
        self.reset()

    def cancel_all(self) -> None:
        for row in self.rows:
            row.cancel()

    def reset(self) -> None:
        self.rows, self.cache, self.mask, self.last = [], None, None, None
        if self.solo is not None:
            self.solo.active = None


def full_attention(cache: DynamicCache) -> bool:
    """Whether every layer of the cache is a plain `DynamicLayer` (no sliding window): one whose rows this module can
    pad, merge and trim."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def failure(exc: BaseException) -> str:
    """The one-line message a failed answer ends with."""
    return f"generation failed: {type(exc).__name__}: {one_line(exc, 200)}"


def merge(cache: DynamicCache, mask: torch.Tensor, joining: DynamicCache, joining_mask: torch.Tensor
          ) -> tuple[DynamicCache, torch.Tensor]:
    """The running batch's cache with the joining rows' appended: both right-aligned, the narrower left-padded."""
    width = max(mask.shape[1], joining_mask.shape[1])
    for layer, new in zip(cache.layers, joining.layers, strict=True):
        layer.keys = torch.cat([left_pad(layer.keys, width), left_pad(new.keys, width)])
        layer.values = torch.cat([left_pad(layer.values, width), left_pad(new.values, width)])
    return cache, torch.cat([left_pad_mask(mask, width), left_pad_mask(joining_mask, width)])


def left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, length, dim] states padded with zeros on the left of `length` to `width`."""
    missing = width - states.shape[-2]
    return torch.nn.functional.pad(states, (0, 0, missing, 0)) if missing else states


def left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return torch.nn.functional.pad(mask, (missing, 0)) if missing else mask
