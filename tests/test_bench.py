"""The benchmark's arithmetic and bookkeeping on tiny inputs: FLOPs and MFU, token counts, schedules, tables."""

from __future__ import annotations

import pytest
import torch

from tunelab.bench import (
    compare,
    derive_figures,
    flops_per_token,
    format_comparison,
    format_table,
    matmul_flops,
    mfu,
    rounded_samples,
    selected_jobs,
    steps_for_samples,
)
from tunelab.errors import TunelabError
from tunelab.trainer import TrainingMeter, batch_token_counts


def test_model_flops_follow_the_6n_full_and_4n_adapter_convention():
    assert flops_per_token(1_000, "full") == 6_000
    assert flops_per_token(1_000, "lora") == 4_000
    with pytest.raises(ValueError, match="freeze"):
        flops_per_token(1_000, "freeze")


def test_mfu_is_achieved_over_peak_and_a_2048_matmul_is_2n_cubed_flops():
    assert matmul_flops(2048) == 2 * 2048 ** 3
    assert mfu(25e9, 100e9) == pytest.approx(0.25)
    assert mfu(25e9, 0.0) is None


def test_real_tokens_are_those_the_attention_mask_keeps_and_padded_tokens_are_all():
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    assert batch_token_counts(batch) == (2, 8, 10)
    assert batch_token_counts({"input_ids": torch.zeros(3, 4, dtype=torch.long)}) == (3, 12, 12)


def test_a_padding_free_batch_counts_a_row_per_position_restart_and_no_padding():
    packed = {"input_ids": torch.zeros(1, 9, dtype=torch.long),
              "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])}
    assert batch_token_counts(packed) == (3, 9, 9)


def test_meter_sums_batches_and_leaves_evaluation_time_out(monkeypatch):
    meter = TrainingMeter()
    clock = iter([0.0, 2.0, 10.0, 13.0])  # train begins, step ends, evaluation ends, next step ends
    monkeypatch.setattr(meter, "_now", lambda: next(clock))
    meter.on_train_begin(None, None, None)
    meter.count_batch({"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])})
    meter.on_step_end(None, None, None)
    meter.on_evaluate(None, None, None)
    meter.on_step_end(None, None, None)
    assert meter.summary() == {"train_loop_seconds": 5.0, "train_loop_samples": 2, "train_tokens": 5,
                               "train_padded_tokens": 8, "train_tokens_per_second": 1.0}


def test_sample_caps_give_every_way_whole_steps_of_the_same_samples():
    assert rounded_samples(30, [4, 16, 16]) == 32
    assert rounded_samples(32, [4, 16]) == 32
    assert steps_for_samples(32, 4) == 8 and steps_for_samples(32, 16) == 2


def test_figures_and_ratios_come_from_counts_and_seconds():
    raw = {"samples": 32, "tokens": 1_000, "padded_tokens": 4_000, "train_seconds": 10.0,
           "non_embedding_params": 1_000_000}
    figures = derive_figures(raw, "full", {"bf16": 1e9, "fp32": 0.5e9})
    assert figures["samples_per_second"] == pytest.approx(3.2)
    assert figures["tokens_per_second"] == pytest.approx(100.0)
    assert figures["padded_tokens_per_second"] == pytest.approx(400.0)
    assert figures["padding_fraction"] == pytest.approx(0.75)
    assert figures["mfu_bf16"] == pytest.approx(0.6)  # 6e6 FLOPs/token × 100 tokens/s ÷ 1e9
    assert figures["mfu_fp32"] == pytest.approx(1.2)
    ours = {"samples_per_second": 30.0, "tokens_per_second": 1_000.0, "train_seconds": 1.0, "peak_rss_gib": 1.0,
            "accuracy": 0.90}
    theirs = {"samples_per_second": 5.0, "tokens_per_second": 100.0, "train_seconds": 6.0, "peak_rss_gib": 2.0,
              "accuracy": 0.885}
    ratios = compare(ours, theirs)
    assert ratios["samples_per_second"] == pytest.approx(6.0)
    assert ratios["tokens_per_second"] == pytest.approx(10.0)
    assert ratios["peak_rss_gib"] == pytest.approx(0.5)
    assert ratios["accuracy_points"] == pytest.approx(1.5)
    assert format_comparison("tutorial", ratios) == ("tunelab vs tutorial: 6.00x samples/s, 10.00x real tokens/s, "
                                                     "0.50x peak RSS, accuracy +1.5 points")


def test_table_has_a_header_a_rule_and_one_aligned_row_per_way():
    rows = [{"way": "tutorial", "samples": 32, "samples_per_second": 0.5, "tokens_per_second": 20.0,
             "padded_tokens_per_second": 64.0, "train_seconds": 64.0, "peak_rss_gib": 1.1, "accuracy": 0.5,
             "accuracy_best_checkpoint": None, "mfu_bf16": 0.002, "mfu_fp32": 0.013, "peak_cuda_gib": None},
            {"way": "tunelab", "samples": 32, "samples_per_second": 2.25, "tokens_per_second": 94.0,
             "padded_tokens_per_second": 130.0, "train_seconds": 14.2, "peak_rss_gib": 1.2, "accuracy": 0.625,
             "accuracy_best_checkpoint": 0.75, "mfu_bf16": 0.016, "mfu_fp32": 0.063, "peak_cuda_gib": None}]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split()[:3] == ["way", "samples", "samples/s"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len({len(line) for line in lines}) == 1
    assert lines[2].startswith("tutorial") and "0.50" in lines[2] and "–" in lines[2] and "1.3%" in lines[2]
    assert lines[3].split()[-4:] == ["0.625", "0.750", "1.6%", "6.3%"]
    assert "peak CUDA GiB" not in lines[0]
    rows[1]["peak_cuda_gib"] = 3.5
    assert "peak CUDA GiB" in format_table(rows).splitlines()[0]


def test_unknown_job_names_are_refused_with_the_valid_ones():
    assert [job.name for job in selected_jobs("minilm-lora, minilm-full")] == ["minilm-lora", "minilm-full"]
    with pytest.raises(TunelabError, match="smollm2-lora-tweets"):
        selected_jobs("minilm,bert")
