"""Implicit rewards of a preference-tuned decoder, one per completion: β · (log p_policy(y|x) − log p_ref(y|x)).

TRL's KTOTrainer logs only batch means of these rewards, so held-out pairwise accuracy (is the chosen response's
reward above the rejected one's?) needs each completion's log-prob; no library exposes a per-example scorer for
it, hence this module. Sequences are built the way TRL's KTO and DPO trainers build them: prompt tokens, then the
completion with EOS, where the completion starts at the first token the two tokenizations do not share, cut to
max_length from the right.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from trl.data_utils import common_prefix_length
from trl.trainer.utils import selective_log_softmax, use_adapter

from tunelab.evaluation.classification import autocast_context
from tunelab.evaluation.uncertainty import ROWS_KEY


def completion_tokens(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """The ids of prompt + completion + EOS (at most max_length) and where the completion starts."""
    ending = "" if completion.endswith(tokenizer.eos_token or "") else (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + completion + ending)["input_ids"]
    return full_ids[:max_length], common_prefix_length(prompt_ids, full_ids)


def completion_logps(model, tokenizer, prompts: list[str], completions: list[str], max_length: int,
                     batch_size: int, bf16: bool, per_token: bool = False) -> np.ndarray:
    """The summed log-prob of each completion's tokens after its prompt (a completion cut off entirely scores 0),
    or with per_token its mean over those tokens (the length-normalised log-prob SimPO and ORPO reward)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows = [completion_tokens(tokenizer, p, c, max_length)
                for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size], strict=True)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        scored = torch.zeros_like(input_ids)
        for row, (ids, completion_start) in enumerate(rows):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            scored[row, completion_start:len(ids)] = 1
        input_ids, attention, scored = input_ids.to(device), attention.to(device), scored.to(device)
        with torch.no_grad(), autocast_context(bf16, device):
            logits = model(input_ids=input_ids, attention_mask=attention).logits
        # prompt-learning adapters prepend virtual tokens: keep the positions of the real ones
        logits = logits[:, -width:][:, :-1].float()
        token_logps = selective_log_softmax(logits, input_ids[:, 1:])
        row_sums = (token_logps * scored[:, 1:]).sum(-1)
        sums.extend((row_sums / scored[:, 1:].sum(-1).clamp(min=1) if per_token else row_sums).tolist())
    return np.asarray(sums)


def pair_completions(prompts: list[str], chosen: list[str], rejected: list[str]) -> tuple[list[str], list[str]]:
    """Each pair's prompt twice, with its chosen responses first and its rejected ones after (reward_metrics' order)."""
    return list(prompts) * 2, list(chosen) + list(rejected)


def reference_context(trainer) -> tuple[torch.nn.Module, AbstractContextManager]:
    """The reference model of a TRL preference trainer and the context that makes it active: its frozen copy
    (full fine-tuning), or the policy with the frozen "ref" adapter TRL keeps (or with adapters switched off)."""
    if trainer.ref_model is not None:
        return trainer.ref_model, nullcontext()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "peft_config"):
        return model, nullcontext()
    return model, use_adapter(model, "ref" if "ref" in model.peft_config else None)


def reward_metrics(rewards: np.ndarray, logps: np.ndarray, labels: list[bool] | None) -> dict:
    """Pairs (labels None: the first half chosen, the second rejected): preference accuracy, mean margin and the
    mean log-probs of chosen and rejected. Unpaired: the share of good completions rewarded above 0 and of bad ones
    below (label accuracy), the margin between the mean rewards of good and bad, and their mean log-probs."""
    if labels is None:
        half = len(rewards) // 2
        chosen, rejected = rewards[:half], rewards[half:]
        return {"preference_accuracy": float((chosen > rejected).mean()),
                ROWS_KEY: {"preference_accuracy": (chosen > rejected).astype(int).tolist()},
                "reward_margin": float((chosen - rejected).mean()),
                "logp_chosen": float(logps[:half].mean()), "logp_rejected": float(logps[half:].mean())}
    good = np.asarray(labels, dtype=bool)
    right = np.where(good, rewards > 0, rewards < 0)
    return {"label_accuracy": float(right.mean()), ROWS_KEY: {"label_accuracy": right.astype(int).tolist()},
            "reward_margin": float(rewards[good].mean() - rewards[~good].mean()),
            "logp_good": float(logps[good].mean()), "logp_bad": float(logps[~good].mean())}
