"""The eval loss of generative runs: the mean cross-entropy over every counted token of the eval rows.

The Trainer's `evaluate()` reports the mean of its per-batch mean losses, so the figure moves with the eval batch
size (symptom SFT: 4.5627 in batches of 64 against 4.5698 in batches of 8) and with the number of processes,
which deal each other different batches (tiny Llama SFT: 2.646 on one process against 2.799 on two). Summing the
token losses and dividing by the tokens once gives one number for the rows, whatever the batching. The pieces
are the Trainer's own: its dataset preparation (TRL packs pretrain blocks there), its collator and its model's
loss (TRL's fused LM head for decoders: no logits over the whole vocabulary).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from trl import SFTTrainer

from tunelab.data.sft_encoding import IGNORE_INDEX
from tunelab.distributed import score_sharded
from tunelab.models.precision import autocast


def token_weighted_loss(trainer, rows) -> float:
    """Mean token cross-entropy of the Trainer's model over `rows` (encoded), each process summing its block."""
    if isinstance(trainer, SFTTrainer):  # tokenized rows pass through; pretrain's texts become packed blocks
        packing = trainer.args.packing if trainer.args.eval_packing is None else trainer.args.eval_packing
        rows = trainer._prepare_dataset(rows, trainer.processing_class, trainer.args, packing,
                                        trainer._formatting_func, "eval")
    rows = trainer._remove_unused_columns(rows, description="evaluation")

    def sums(block) -> list[tuple[float, int]]:
        trainer.model.eval()
        loader = DataLoader(block, batch_size=trainer.args.per_device_eval_batch_size,
                            collate_fn=trainer.data_collator)
        return [batch_sums(trainer, trainer._prepare_inputs(batch)) for batch in loader]

    parts = score_sharded(rows, sums, lambda blocks: [part for block in blocks for part in block], trainer.model)
    total, count = (sum(values) for values in zip(*parts, strict=True)) if parts else (0.0, 0)
    return total / max(count, 1)


@torch.no_grad()
def batch_sums(trainer, inputs: dict) -> tuple[float, int]:
    """(summed token cross-entropy, counted tokens) of one collated batch."""
    model = trainer.model
    with autocast(trainer.args.bf16):
        if isinstance(trainer, SFTTrainer) and not whole_weights_under_zero3(model):
            outputs = model(**inputs, use_cache=False, fused_lm_head=True)  # zero on ignored positions
            return float(-outputs.log_probs.sum()), int(outputs.label_mask.sum())
        labels = inputs["labels"]
        # the model's mean over its counted tokens: decoders predict each next token, encoder-decoders each label
        counted = labels[..., 1:] if not model.config.is_encoder_decoder else labels
        count = int((counted != IGNORE_INDEX).sum())
        return float(model(**inputs).loss) * count, count


def whole_weights_under_zero3(model) -> bool:
    """Before training under ZeRO-3 every process still holds the whole weights, and TRL's fused head would
    gather them as ZeRO-3 shards (which they are not yet): that one scoring takes the model's own loss."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() and not hasattr(next(model.parameters()), "ds_status")
