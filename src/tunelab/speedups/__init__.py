"""tunelab's speed-ups: hand-written paths that train faster than the libraries' own on a CPU, in one place.

Each module holds one, with the measured reason it exists in its docstring and an equivalence test against the
library's result in tests/:

| module | what it changes | applies to |
|---|---|---|
| fused_head.py | TRL's fused LM head: CPU-sized tiles, labelled positions only, bf16 products | TRL trainers, CPU |
| fused_lora.py | peft LoRA layers' base and adapter products in one pass | causal-LM adapters, CPU |
| packed_attention.py | a padding-free batch's rows attend each to itself (row by row) | padding-free SFT, CPU |
| fast_dropout.py | dropout masks drawn from 16 random bits per element | models with dropout, CPU |
| glibc_malloc.py | freed memory kept in glibc's heap while training | training under glibc, CPU |
| batch_order.py | length-grouped batches sorted over whole groups, in random order | padded batches |
| decode_step.py | a decode step through the model's own modules, minus transformers' plumbing | Llama-family decoders |

A run applies them through one call: `api.train` runs its stage inside `speedups_for_run(recipe.train.speedups)`,
and each trainer the stage builds (trainer.TunelabMixin) takes that run's `Speedups` (`speedups_of_this_run()`) to fit
its model, order its batches and keep freed memory while it trains. Patches of library modules (the fused head's six
TRL attributes) are given back to the library when the block ends, however it ends; what is fitted to a model (its
dropout modules, LoRA forwards, attention function) stays with that model.

Off switch: `train.speedups: false` in the recipe, or TUNELAB_SPEEDUPS=0 in the environment (which wins over the
recipe): nothing here is applied and every step takes the libraries' own path (TRL's fused head as TRL sets it,
peft's LoRA forward, SDPA or the model's own attention, torch's dropout, HF's sampler, glibc's default malloc).
A speed-up whose library is not at a version it was checked against falls back the same way (guard.py).
Decoding (generation/decoder.py) takes its step from `decode_step_for(model, stack)`, under the same switch and guard.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from types import ModuleType

from torch.utils.data import Sampler

from tunelab.speedups.guard import usable

SWITCH = "TUNELAB_SPEEDUPS"  # 0 / false / off / no: every speed-up off, whatever the recipe says
OFF_VALUES = ("0", "false", "off", "no")


def switched_off_by_environment() -> bool:
    """Whether TUNELAB_SPEEDUPS turns the speed-ups off."""
    return os.environ.get(SWITCH, "").strip().lower() in OFF_VALUES


class Speedups:
    """The speed-ups of one run: whether they are on, and the library patches to give back when the run ends."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.patches = ExitStack()  # closed at the end of the run: every library attribute back as it was
        self.head_fitted = False

    def module(self, name: str) -> ModuleType | None:
        """The speed-up module `name` when speed-ups are on and it was checked against the installed libraries."""
        return usable(name) if self.enabled else None

    def fit(self, trainer) -> bool:
        """Fit the speed-ups that apply to `trainer` (a Trainer whose model is prepared for training): TRL's fused
        head for the rest of the run, the model's dropout, LoRA layers (causal LMs) and, for padding-free batches,
        its attention. Return whether a padding-free batch's rows now attend each to itself alone."""
        if not self.head_fitted and (head := self.module("fused_head")) is not None:
            self.head_fitted = self.patches.enter_context(head.fused_head_fitted_to_cpu())
        model = trainer.model
        if (dropout := self.module("fast_dropout")) is not None:  # after peft added its dropout modules
            dropout.use_fast_dropout(model)
        if adapts_causal_lm(model) and (lora := self.module("fused_lora")) is not None:
            lora.use_fused_lora(model)  # measured on SmolLM2 SFT; classifiers keep peft's forward
        if getattr(trainer, "padding_free", False) and (rows := self.module("packed_attention")) is not None:
            return rows.use_packed_attention(model)
        return False

    def while_training(self) -> AbstractContextManager:
        """A block inside which training keeps freed memory in the heap for the next step (CPU, glibc)."""
        malloc = self.module("glibc_malloc")
        return malloc.heap_kept_for_training() if malloc is not None else nullcontext()

    def batch_order(self, lengths: list[int], batch_size: int) -> Sampler[int] | None:
        """Length-grouped batches of `batch_size` rows sorted over whole groups, in random order; None: HF's."""
        order = self.module("batch_order")
        return order.ShuffledLengthBatches(lengths, batch_size) if order is not None else None


_runs: list[Speedups] = []  # the run in progress (api.train does not nest, but a test may)


@contextmanager
def speedups_for_run(enabled: bool = True) -> Iterator[Speedups]:
    """Inside the block a run's trainers take its speed-ups (`enabled` and not TUNELAB_SPEEDUPS=0); at its end,
    however it ends, every library attribute they patched is the library's own again."""
    speedups = Speedups(enabled and not switched_off_by_environment())
    _runs.append(speedups)
    try:
        with speedups.patches:
            yield speedups
    finally:
        _runs.remove(speedups)


def speedups_of_this_run() -> Speedups:
    """The speed-ups of the run in progress; outside `speedups_for_run`, none (the libraries' own paths)."""
    return _runs[-1] if _runs else Speedups(enabled=False)


def decode_step_for(model, stack: Callable) -> ModuleType | None:
    """speedups/decode_step.py where its step gives `model`'s own logits (a Llama-family model as transformers
    builds it) and TUNELAB_SPEEDUPS does not turn it off; else None (the model's own forward). The model's q/k/v and
    gate/up products are then stacked into one each where `stack` (generation/weights.py's `stack_int8`) can
    (`stack_products`, once per model): a change to the model."""
    if switched_off_by_environment():
        return None
    step = usable("decode_step")
    if step is None or not step.fits(model):
        return None
    step.stack_products(model, stack)
    return step


def adapts_causal_lm(model) -> bool:
    """Whether `model` carries peft adapters for a causal LM (the decoders of sft, pretrain, dpo, kto and grpo)."""
    return any(config.task_type == "CAUSAL_LM" for config in getattr(model, "peft_config", {}).values())
