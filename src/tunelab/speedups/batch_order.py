"""Training order for length-grouped batching: batches of rows of similar length, the batches in random order.

Written here because HF's LengthGroupedSampler sorts rows only within mega-batches of at most a quarter of the
data set (so small data sets keep much of their padding: MiniLM on symptom_to_diagnosis, 250 rows in batches of
16, still pads 17.6% of its tokens) and then yields each mega-batch longest batch first. Sorting a whole group
of up to GROUP_BATCHES batches and shuffling the batches pads 4.7% there. Each epoch draws new groups, but a
data set of at most one group (250 rows at batch 16) is sorted whole, so its batches change between epochs only
among rows of equal length.

The Trainer takes it through its private `_get_train_sampler` hook (TunelabMixin overrides it, in place of HF's
`LengthGroupedSampler`, whose `lengths` it reuses), hence the transformers range below (checked by
tests/test_batch_order.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

CHECKED_WITH = {"transformers": ("5.24", "5.26")}
GROUP_BATCHES = 50  # HF's largest mega-batch: rows are sorted by length within groups of this many batches


def missing_internals() -> list[str]:
    """The transformers names the training order relies on that the installed version lacks."""
    missing = [] if hasattr(Trainer, "_get_train_sampler") else ["Trainer._get_train_sampler"]
    if "lengths" not in inspect.signature(LengthGroupedSampler).parameters:
        missing.append("LengthGroupedSampler(lengths=...)")
    return missing


class ShuffledLengthBatches(Sampler[int]):
    """Row indices in which each run of `batch_size` (one batch) holds rows of similar length, the batches in
    random order (from torch's global generator, which the Trainer seeds), and the one short batch (if any) last.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.lengths)).tolist()
        group_rows = self.batch_size * GROUP_BATCHES
        batches = []
        for start in range(0, len(order), group_rows):
            group = sorted(order[start:start + group_rows], key=self.lengths.__getitem__)
            batches += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        # the DataLoader cuts this flat list every batch_size rows, so a short batch must stay at the end
        full = [batch for batch in batches if len(batch) == self.batch_size]
        short = [batch for batch in batches if len(batch) < self.batch_size]
        for position in torch.randperm(len(full)).tolist():
            yield from full[position]
        for batch in short:
            yield from batch

