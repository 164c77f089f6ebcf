"""Transfer-learning strategies for full and freeze: which weights train, when they start, and how fast.

- head only / top-N layers: `freeze_all_but`;
- embeddings frozen under full fine-tuning: `freeze_embeddings`;
- gradual unfreezing (one more block from the top each epoch, or an explicit schedule): `GradualUnfreezing`,
  a TrainerCallback that flips `requires_grad` at epoch boundaries;
- discriminative learning rates (each block learns at `decay` × the block above): `parameter_groups`.

"Embeddings" are every parameter registered before the first transformer block, "above the stack" every
parameter after the last one (pooler, final norm, head); both follow the module order HF models use.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from tunelab.console import say
from tunelab.errors import TunelabError
from tunelab.recipe import FreezeMethod, FullMethod, TrainConfig


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of repeated transformer blocks: the ModuleList holding the most parameters."""
    stacks = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList) and len(module) > 1]
    if not stacks:
        raise TunelabError(f"{type(model).__name__} has no stack of layers to unfreeze; use method.train_top_layers: 0")
    return max(stacks, key=lambda stack: sum(p.numel() for p in stack.parameters()))


def layer_depths(model: torch.nn.Module) -> dict[str, int]:
    """Depth of every parameter counted from the top: 0 above the stack, 1 for the top block, …, L + 1 below it."""
    layers = transformer_layers(model)
    block_of = {id(param): index for index, layer in enumerate(layers) for param in layer.parameters()}
    depths, seen_stack = {}, False
    for name, param in model.named_parameters():
        if id(param) in block_of:
            seen_stack = True
            depths[name] = len(layers) - block_of[id(param)]
        else:
            depths[name] = 0 if seen_stack else len(layers) + 1
    return depths


def top_layers_at_epoch(method: FreezeMethod, epoch: int, layer_count: int) -> int:
    """How many top blocks train in `epoch` (0-based) under the method's unfreezing schedule."""
    schedule = method.unfreeze_schedule
    if schedule is None:
        wanted = method.train_top_layers
    elif isinstance(schedule, int):
        wanted = method.train_top_layers + schedule * epoch
        return min(wanted, layer_count)  # "one more per epoch" simply stops when every block trains
    else:
        wanted = schedule[min(epoch, len(schedule) - 1)]
    if wanted > layer_count:
        field = "unfreeze_schedule" if schedule is not None else "train_top_layers"
        raise TunelabError(f"method.{field} asks for {wanted} layers but the model has {layer_count} layers; "
                           f"use at most {layer_count}")
    return wanted


def freeze_all_but(model: torch.nn.Module, heads: list[str], top_layers: int) -> torch.nn.Module:
    """Freeze every weight except the head modules and the top `top_layers` transformer blocks."""
    for param in model.parameters():
        param.requires_grad = False
    modules = dict(model.named_modules())
    trainable = [modules[name] for name in heads]
    if top_layers:
        layers = transformer_layers(model)
        if top_layers > len(layers):
            raise TunelabError(f"method.train_top_layers is {top_layers} but the model has {len(layers)} layers; "
                               f"use at most {len(layers)}")
        trainable += list(layers[-top_layers:])
    for module in trainable:
        for param in module.parameters():
            param.requires_grad = True
    return model


def apply_freeze(model: torch.nn.Module, method: FreezeMethod, heads: list[str]) -> torch.nn.Module:
    """Head plus the blocks that train in the first epoch; later epochs may unfreeze more (GradualUnfreezing)."""
    layer_count = len(transformer_layers(model)) if method.unfreeze_schedule or method.train_top_layers else 0
    top = top_layers_at_epoch(method, 0, layer_count) if layer_count else 0
    if method.unfreeze_schedule is not None:
        top_layers_at_epoch(method, 10**6, layer_count)  # refuse a schedule beyond the model before training
    return freeze_all_but(model, heads, top)


def apply_full(model: torch.nn.Module, method: FullMethod) -> torch.nn.Module:
    """Every weight trains, except the embeddings when `freeze_embeddings` is set."""
    for param in model.parameters():
        param.requires_grad = True
    if method.freeze_embeddings:
        depths = layer_depths(model)
        below = max(depths.values())
        for name, param in model.named_parameters():
            if depths[name] == below:
                param.requires_grad = False
    return model


def parameter_groups(model: torch.nn.Module, learning_rate: float, weight_decay: float,
                     decay: float | None) -> list[dict]:
    """AdamW groups for every parameter (frozen ones too, so unfreezing later needs no new optimizer).

    With `decay`, a parameter at depth d (0 above the stack, 1 for the top block, …) learns at rate × decay^d.
    Biases and norm weights (1-D) get no weight decay, as in the HF Trainer.
    """
    depths = layer_depths(model) if decay is not None else dict.fromkeys(dict(model.named_parameters()), 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        depth, decays = depths[name], param.ndim >= 2
        group = groups.setdefault((depth, decays), {
            "params": [], "names": [], "lr": learning_rate * (decay ** depth if decay is not None else 1.0),
            "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def method_optimizer(model: torch.nn.Module, method, train: TrainConfig) -> torch.optim.Optimizer | None:
    """The optimizer a strategy needs, or None to let the Trainer build its default one.

    The Trainer's default optimizer only holds parameters that train when it is built, so a block unfrozen later
    would never update; discriminative rates need one group per depth. Parameters without a gradient (still
    frozen) are skipped by AdamW, weight decay included.
    """
    decay = getattr(method, "layer_lr_decay", None)
    gradual = isinstance(method, FreezeMethod) and method.unfreeze_schedule is not None
    if decay is None and not gradual:
        return None
    groups = parameter_groups(model, train.learning_rate, train.weight_decay, decay)
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=train.learning_rate, weight_decay=train.weight_decay)


def method_callbacks(model: torch.nn.Module, method) -> list[TrainerCallback]:
    """Trainer callbacks a strategy needs while training (gradual unfreezing)."""
    if isinstance(method, FreezeMethod) and method.unfreeze_schedule is not None:
        return [GradualUnfreezing(transformer_layers(model), method)]
    return []


class GradualUnfreezing(TrainerCallback):
    """At the start of each epoch, unfreeze the top blocks the schedule asks for (blocks never freeze again)."""

    def __init__(self, layers: torch.nn.ModuleList, method: FreezeMethod) -> None:
        self.layers = layers
        self.method = method
        self.unfrozen_by_epoch: dict[int, int] = {}

    def on_epoch_begin(self, args, state, control, **kwargs):
        """Flip requires_grad on for the blocks this epoch trains; a resumed run lands in the right epoch too."""
        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        top = top_layers_at_epoch(self.method, epoch, len(self.layers))
        for layer in list(self.layers)[len(self.layers) - top:]:
            layer.requires_grad_(True)
        previous = self.unfrozen_by_epoch.get(epoch - 1)
        if previous is not None and top > previous:
            say(f"tunelab: epoch {epoch + 1}: the top {top} of {len(self.layers)} layers train now")
        self.unfrozen_by_epoch[epoch] = top
