"""Replay for preference training: a language-model loss on general text added to each training step.

DPO and KTO train on pairs or judged completions, so data.replay's texts cannot be mixed into their rows as sft's
are. They are replayed the way InstructGPT's PPO-ptx mixes pretraining gradients into PPO: every training step also
takes the next few replay texts, computes the policy's mean next-token loss on them (every token a label), and adds
it to the preference loss. TRL's preference trainers have no such option (their "sft" loss term trains on the chosen
responses, not on outside text), so this mixin adds it in a dozen lines.

Rows per step: data.replay.fraction × train.batch_size (at least one), so an epoch replays about fraction × train
rows, the same meaning as for sft. The position in the replay texts follows the optimizer step, so a resumed run and
every process of a distributed run read their own rows.
"""

from __future__ import annotations

import datasets
import torch


class ReplayLossMixin:
    """A Trainer mixin (put it before the TRL trainer): `replay` (a `text` column) and `replay_rows` per step make
    training minimise preference loss + language-model loss on the replay texts; `replay_loss` is logged."""

    def __init__(self, *args, replay: datasets.Dataset | None = None, replay_rows: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replay_texts = list(replay["text"]) if replay is not None else []
        self.replay_rows = replay_rows
        self.replay_calls = None  # micro-batches done since the start of training (set at the first replayed step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not self.replay_texts or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        replay_loss = model(**self.next_replay_batch(loss.device)).loss
        self.record_replay_loss(float(replay_loss.detach()))
        loss = loss + replay_loss
        return (loss, outputs) if return_outputs else loss

    def next_replay_batch(self, device: torch.device) -> dict:
        """The next `replay_rows` texts (+ EOS), right-padded, with every real token a label."""
        if self.replay_calls is None:
            self.replay_calls = self.state.global_step * self.args.gradient_accumulation_steps
        start = (self.replay_calls * self.args.world_size + self.args.process_index) * self.replay_rows
        self.replay_calls += 1
        texts = [self.replay_texts[(start + i) % len(self.replay_texts)] for i in range(self.replay_rows)]
        tokenizer = self.processing_class
        batch = tokenizer([text + tokenizer.eos_token for text in texts], truncation=True,
                          max_length=self.args.max_length, padding=True, padding_side="right", return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                "labels": labels.to(device)}

    def record_replay_loss(self, value: float) -> None:
        """Into the trainer's logged training metrics (DPO/KTO keep `_metrics`, TRL's CPO/ORPO `store_metrics`)."""
        if hasattr(self, "_metrics"):
            self._metrics["train"]["replay_loss"].append(value)
        elif hasattr(self, "store_metrics"):
            self.store_metrics({"replay_loss": value}, train_eval="train")
