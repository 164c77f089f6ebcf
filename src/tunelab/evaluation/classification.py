"""Classification metrics and batched scoring of texts with a sequence classifier."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(gold: list[int] | np.ndarray, predicted: list[int] | np.ndarray,
                           labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows = gold)."""
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(gold, predicted, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, predicted)),
        "macro_f1": float(f1_score(gold, predicted, labels=ids, average="macro", zero_division=0)),
        "per_class": {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "support": int(support[i])} for i, label in enumerate(labels)},
        "confusion_matrix": confusion_matrix(gold, predicted, labels=ids).tolist(),
    }


def autocast_context(bf16: bool, device: torch.device):
    """bf16 autocast on the model's device when asked for, else nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def predict_probabilities(model: torch.nn.Module, tokenizer, texts: list[str], pairs: list[str] | None = None,
                          batch_size: int = 64, max_length: int = 256, bf16: bool = False) -> np.ndarray:
    """Class probabilities for each text (rows in input order). Rows are batched by length to cut padding."""
    logits = predict_logits(model, tokenizer, texts, pairs, batch_size, max_length, bf16)
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy()


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, tokenizer, texts: list[str], pairs: list[str] | None = None,
                   batch_size: int = 64, max_length: int = 256, bf16: bool = False,
                   keep_end: bool = False) -> np.ndarray:
    """The head's outputs for each text (rows in input order), batched by length to cut padding.

    keep_end truncates long texts from the left: a reward model must see the response at the end of a transcript.
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]) + (len(pairs[i]) if pairs else 0))
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left" if keep_end else side
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            encoded = tokenizer([texts[i] for i in batch], [pairs[i] for i in batch] if pairs else None,
                                truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
            with autocast_context(bf16, device):
                logits[batch] = model(**encoded).logits.float().cpu().numpy()
    finally:
        tokenizer.truncation_side = side
    return logits
