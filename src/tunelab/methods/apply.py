"""Apply a recipe's method to a loaded model: one entry point for full, freeze (see freeze.py) and every peft method."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

from tunelab.errors import TunelabError, one_line
from tunelab.methods.freeze import apply_freeze, apply_full
from tunelab.models.loading import HEAD_NAMES, load_causal_lm
from tunelab.recipe import FreezeMethod, FullMethod, IA3Method, LoraMethod, VirtualTokenMethod


@dataclass(frozen=True)
class TrainableCount:
    """How many parameters train, out of how many."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        """Trainable share of all parameters, in percent."""
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"{self.trainable:,} of {self.total:,} parameters train ({self.percent:.2f}%)"


def count_parameters(model: torch.nn.Module) -> TrainableCount:
    """Count trainable and total parameters."""
    params = list(model.parameters())
    return TrainableCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def head_modules(model: torch.nn.Module, new_modules: list[str]) -> list[str]:
    """Names of the modules that must always train: the task head and anything freshly initialised."""
    present = {name for name, _ in model.named_modules()}
    return sorted({name for name in HEAD_NAMES if name in present} | {m for m in new_modules if m in present})


def apply_method(model: torch.nn.Module, method, new_modules: list[str],
                 task_type: TaskType = TaskType.SEQ_CLS, bf16: bool = False) -> torch.nn.Module:
    """Return the model prepared for training with `method`; the head always trains. With `bf16` (training under
    bf16 autocast) an adapter method's frozen base is stored in bf16. (The trainer fits the run's speed-ups to it:
    tunelab.speedups.)"""
    prepared = with_method(model, method, new_modules, task_type)
    adapter = not isinstance(method, FullMethod | FreezeMethod)
    return frozen_weights_in_bf16(prepared) if bf16 and adapter else prepared


def with_method(model: torch.nn.Module, method, new_modules: list[str], task_type: TaskType) -> torch.nn.Module:
    """The model with `method`'s trainable weights chosen (full, freeze) or its peft adapters added."""
    heads = head_modules(model, new_modules)
    if isinstance(method, FullMethod):
        return apply_full(model, method)
    if isinstance(method, FreezeMethod):
        return apply_freeze(model, method, heads)
    if method.name == "prefix" and task_type == TaskType.SEQ_CLS:
        # peft 0.21 hands prefixes to the backbone as past_key_values, which transformers 5.x classifiers refuse
        # at the first forward pass; say so now rather than after the baseline has been scored.
        raise TunelabError("method 'prefix' does not work for classification with the installed transformers/peft "
                           "(the classifier cannot take prefix key/values); use method 'prompt' or 'lora'")
    try:
        adapted = get_peft_model(model, peft_config(method, heads, task_type))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TunelabError(f"method '{method.name}' cannot be applied to {type(model).__name__}: "
                           f"{one_line(exc, 200)}; set method.target_modules or pick another method") from None
    if isinstance(method, LoraMethod) and method.loraplus_lr_ratio is not None:
        adapted.loraplus_lr_ratio = method.loraplus_lr_ratio  # the Trainer's optimizer reads it: TunelabMixin
    return adapted


def load_trainable_decoder(location: str, method, bf16: bool, sharding: dict | None = None) -> torch.nn.Module:
    """A decoder (causal LM) ready to train with `method`: its base loaded in 4-bit for qlora (or sharded over the
    processes, for fsdp), then the method applied (the shared start of the sft, dpo, kto and grpo stages)."""
    return apply_method(load_causal_lm(location, quantize_4bit=method.name == "qlora", sharding=sharding), method,
                        [], TaskType.CAUSAL_LM, bf16)


def frozen_weights_in_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Store the weights that do not train in bf16; return the model (for adapter methods under bf16 autocast).

    Under autocast their matmuls run in bf16 anyway, so a frozen base needs no fp32 copy: bf16 halves its memory
    and spares autocast's cast of every weight in every step. What trains (adapters, the head) stays fp32, so the
    optimizer updates full-precision weights. The base is never saved (a run saves its adapter), so its files
    keep their precision. Quantized (qlora) weights are left as they are.
    """
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(torch.bfloat16)
    return model


LORA_INITS: dict[str, bool | str] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def peft_config(method, heads: list[str], task_type: TaskType) -> PeftConfig:
    """The peft config for a recipe method; the head modules are saved and trained in full."""
    if isinstance(method, LoraMethod):
        return LoraConfig(task_type=task_type, r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                          target_modules=method.target_modules, use_dora=method.name == "dora",
                          use_rslora=method.use_rslora, init_lora_weights=LORA_INITS[method.init_lora_weights],
                          modules_to_save=heads)
    if isinstance(method, IA3Method):
        return IA3Config(task_type=task_type, target_modules=method.target_modules,
                         feedforward_modules=method.feedforward_modules, modules_to_save=heads)
    if isinstance(method, VirtualTokenMethod):
        config_class = PrefixTuningConfig if method.name == "prefix" else PromptTuningConfig
        return config_class(task_type=task_type, num_virtual_tokens=method.num_virtual_tokens, modules_to_save=heads)
    raise TunelabError(f"method '{method.name}' is not a peft method")
