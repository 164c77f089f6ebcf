"""Encoder-decoders (T5) through the same rows: their rows run together to the end inside `admit`, through
`generate`, with each row's own sampling (a logits processor) and its own end (a stopping criterion). Their
cross-attention cache would need merging of its own to let rows join a running batch; no tunelab example serves
one at scale, so they batch the way `tunelab serve` did before continuous batching."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from tunelab.generation.decoder import Decoder, Row
from tunelab.models.precision import autocast


class WholeBatchDecoder(Decoder):
    """A `Decoder` whose `admit` runs its rows to their end; `step` is never needed."""

    def can_join(self) -> bool:
        return True

    def compile_solo_steps(self) -> bool:
        return False  # its rows run inside `generate`

    @torch.inference_mode()
    def admit(self, rows: list[Row]) -> None:
        rows = [row for row in rows if not row.cancelled]
        if not rows:
            return
        ids, mask = self.left_padded(rows)
        settings = GenerationConfig(max_new_tokens=max(row.sampling.max_tokens for row in rows), do_sample=False,
                                    pad_token_id=self.pad, eos_token_id=sorted(self.eos_ids) or None)
        special = any(not row.sampling.greedy or row.sampling.ignore_eos for row in rows)
        self.rows = rows
        try:
            with autocast(self.bf16):
                self.model.generate(input_ids=ids, attention_mask=mask, generation_config=settings,
                                    logits_processor=LogitsProcessorList([RowPicker(self, rows)] if special else []),
                                    stopping_criteria=StoppingCriteriaList([RowTaker(self, rows)]))
        finally:
            for row in rows:
                if not row.finished:  # generate stopped on its own length limit first
                    row.finish("length")
            self.reset()


class RowPicker(LogitsProcessor):
    """Each row's token picked by its own settings; the scores made one-hot so that greedy `generate` takes it."""

    def __init__(self, decoder: Decoder, rows: list[Row]) -> None:
        self.decoder, self.rows = decoder, rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = self.decoder.pick(self.rows, scores)
        picked = torch.full_like(scores, float("-inf"))
        picked[torch.arange(len(self.rows)), tokens] = 0
        return picked


class RowTaker(StoppingCriteria):
    """After each step: hand each row its token; say which rows are done."""

    def __init__(self, decoder: Decoder, rows: list[Row]) -> None:
        self.decoder, self.rows = decoder, rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.decoder.hand(self.rows, input_ids[:, -1].tolist())
        return torch.tensor([row.finished for row in self.rows], device=input_ids.device)
