"""Length-grouped training order (speedups/batch_order.py): every row once an epoch, batches of similar length in
random order, less padding than HF's sampler, and tunelab's trainers use it in a run."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from tunelab.speedups import speedups_for_run
from tunelab.speedups.batch_order import GROUP_BATCHES, ShuffledLengthBatches
from tunelab.trainer import FilledBatches, MeteredTrainer, TunelabTrainer

RANDOM = random.Random(0)
LENGTHS = [RANDOM.randint(17, 76) for _ in range(250)]  # like symptom_to_diagnosis's MiniLM rows


def batches_of(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def padding_fraction(order: list[int], size: int) -> float:
    batches = [[LENGTHS[i] for i in batch] for batch in batches_of(order, size)]
    return 1 - sum(map(sum, batches)) / sum(max(batch) * len(batch) for batch in batches)


def test_each_epoch_yields_every_row_once_in_batches_of_similar_length():
    torch.manual_seed(0)
    sampler = ShuffledLengthBatches(LENGTHS, batch_size=16)
    first, second = list(sampler), list(sampler)
    assert len(sampler) == 250 and sorted(first) == sorted(second) == list(range(250))
    assert first != second  # a new order every epoch
    for batch in batches_of(first, 16):
        lengths = sorted(LENGTHS[i] for i in batch)
        assert lengths[-1] - lengths[0] <= 8  # 250 rows over 60 lengths: a batch spans a few of them
    assert len(batches_of(first, 16)[-1]) == 250 % 16  # the short batch comes last, where the DataLoader cuts it


def test_batches_come_in_random_order_not_longest_first():
    torch.manual_seed(0)
    firsts = [max(LENGTHS[i] for i in list(ShuffledLengthBatches(LENGTHS, 16))[:16]) for _ in range(20)]
    assert len(set(firsts)) > 5


def test_it_pads_far_less_than_hf_length_grouping():
    torch.manual_seed(0)
    ours = [padding_fraction(list(ShuffledLengthBatches(LENGTHS, 16)), 16) for _ in range(10)]
    hf = [padding_fraction(list(LengthGroupedSampler(16, lengths=LENGTHS)), 16) for _ in range(10)]
    assert max(ours) < 0.07 and min(hf) > 0.12  # measured: 4.7% against 17.6% on average


def test_rows_are_sorted_only_within_groups_of_batches():
    """A data set larger than a group is shuffled across groups: each group's rows are a random draw."""
    lengths = list(range(16 * GROUP_BATCHES * 3))
    torch.manual_seed(0)
    order = list(ShuffledLengthBatches(lengths, 16))
    assert sorted(order) == lengths
    spans = [max(batch) - min(batch) for batch in batches_of(order, 16)]
    assert max(spans) < len(lengths) / 10  # three groups of a third of the rows each: batches stay narrow


def test_tunelab_trainers_group_by_length_with_it_and_the_plain_trainer_does_not(tiny_bert, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = [{"input_ids": [2] * length, "labels": 0} for length in (3, 9, 4, 8)]
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, train_sampling_strategy="group_by_length",
                             report_to="none", use_cpu=True)
    with speedups_for_run():
        tuned = TunelabTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    plain = MeteredTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    sampler = tuned._get_train_sampler()
    assert isinstance(sampler, ShuffledLengthBatches) and sampler.lengths == [3, 9, 4, 8]
    assert type(plain._get_train_sampler()) is LengthGroupedSampler


def test_padding_free_batches_keep_hf_length_grouping(tiny_llama, tmp_path):
    """Padding-free rows have no padding to save: sorting them would only make every epoch's batches alike."""
    from trl import SFTConfig

    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2)
    rows = [{"input_ids": [2] * length, "labels": 0} for length in (3, 9, 4, 8)]
    args = SFTConfig(str(tmp_path), per_device_train_batch_size=2, train_sampling_strategy="group_by_length",
                     padding_free=True, report_to="none", use_cpu=True)
    with speedups_for_run():
        tuned = TunelabTrainer(model=model, args=args, train_dataset=rows,
                             processing_class=AutoTokenizer.from_pretrained(tiny_llama))
    assert type(tuned._get_train_sampler()) is LengthGroupedSampler


def test_a_filler_row_fills_the_short_batch_and_nothing_else():
    torch.manual_seed(0)
    sampler = FilledBatches(ShuffledLengthBatches([5, 1, 4, 2, 3], batch_size=4), batch_size=4, filler=5)
    order = list(sampler)
    assert len(order) == 8 == len(sampler)
    assert sorted(order[:5]) == [0, 1, 2, 3, 4] and order[5:] == [5, 5, 5]
