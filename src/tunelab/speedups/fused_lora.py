"""LoRA's base and adapter products in one pass on a CPU.

peft's `lora.Linear` computes `base(x) + lora_B(lora_A(dropout(x.to(fp32)))) * scaling`. Under bf16 autocast with
a bf16 frozen base (what tunelab trains adapters with on a CPU) that is, per layer and step: a cast of the input to
fp32 and autocast's cast straight back, a product scaled in a separate pass, a sum in another, and the same again
in backward. On SmolLM2 LoRA SFT those passes over the activations cost 16% of a training step, against 3% of its
FLOPs for the adapters' products.

Here the adapter's second product is added into the base output by `addmm` (scaling folded into it), the input
stays in bf16, and backward forms the four gradient products directly. The figures are those of peft's path under
autocast (bf16 products, fp32 adapter weights and gradients); only the passes are fewer. No library does this for
CPUs (Unsloth's fused LoRA kernels are Triton, GPU-only), hence this module.

A layer goes through peft's own forward whenever this does not apply: adapters disabled or merged, several or
mixed adapters, a LoRA variant (DoRA, …), a base that is not a plain frozen `nn.Linear` in the compute precision,
or a tensor off the CPU. It reads peft's layer attributes and stands in for `lora.Linear.forward` on each layer
(nothing of peft's is patched: the layer's own forward is shadowed on that instance), hence the peft range below
(checked by tests/test_fused_lora.py) and the attribute check.
"""

from __future__ import annotations

import inspect
import types

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

CHECKED_WITH = {"peft": ("0.21", "0.22")}
LAYER_ATTRIBUTES = ("base_layer", "active_adapters", "disable_adapters", "merged", "lora_A", "lora_B", "lora_dropout",
                    "scaling", "lora_variant")  # what fused_forward reads of a layer


def missing_internals() -> list[str]:
    """The peft `lora.Linear` attributes the fused forward reads that a layer of the installed peft lacks."""
    with torch.random.fork_rng(devices=[]):  # a layer to look at, drawn without moving the run's random stream
        tiny = get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig(r=1, target_modules=["0"]))
    layer = next((module for module in tiny.modules() if isinstance(module, LoraLinear)), None)
    if layer is None:
        return ["lora.Linear (peft's LoRA layer for nn.Linear)"]
    missing = [f"lora.Linear.{name}" for name in LAYER_ATTRIBUTES if not hasattr(layer, name)]
    if tuple(inspect.signature(LoraLinear.forward).parameters)[:2] != ("self", "x"):
        missing.append("lora.Linear.forward(self, x, ...)")
    return missing


class FusedLoraProduct(torch.autograd.Function):
    """`x·Wᵀ (+ b) + scaling · (x_lora·Aᵀ)·Bᵀ` for a frozen W (and b); x_lora is x with the adapter's dropout, or
    None for x itself. Every tensor is in one precision (bf16 under autocast)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling: float):  # type: ignore[override]
        rows = x.reshape(-1, x.shape[-1])
        rows_lora = rows if x_lora is None else x_lora.reshape(-1, x.shape[-1])
        hidden = rows_lora @ lora_a.t()
        out = torch.nn.functional.linear(rows, weight, bias).addmm_(hidden, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows_lora, hidden, weight, lora_a, lora_b)
        ctx.scaling, ctx.shape, ctx.separate = scaling, x.shape, x_lora is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        rows_lora, hidden, weight, lora_a, lora_b = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_hidden = (grad @ lora_b).mul_(ctx.scaling)
        grad_a = grad_hidden.t() @ rows_lora if ctx.needs_input_grad[4] else None
        grad_b = (grad.t() @ hidden).mul_(ctx.scaling) if ctx.needs_input_grad[5] else None
        grad_x = (grad @ weight) if ctx.needs_input_grad[0] else None
        grad_x_lora = (grad_hidden @ lora_a).view(ctx.shape) if ctx.needs_input_grad[1] else None
        if grad_x is not None and not ctx.separate:
            grad_x.addmm_(grad_hidden, lora_a)
        return None if grad_x is None else grad_x.view(ctx.shape), grad_x_lora, None, None, grad_a, grad_b, None


def fused_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's `lora.Linear.forward`, in one pass where it applies (see the module's docstring)."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    base = self.base_layer
    adapters = [name for name in self.active_adapters if name in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1 or adapters[0] in self.lora_variant
            or self.lora_B[adapters[0]].bias is not None or type(base) is not torch.nn.Linear
            or base.weight.requires_grad or base.weight.dtype != dtype or hasattr(base.weight, "ds_id")
            or (base.bias is not None and (base.bias.requires_grad or base.bias.dtype != dtype))
            or x.device.type != "cpu"):  # ds_id: a ZeRO-3 shard, gathered only when its own module is called
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    dropout = self.lora_dropout[name]
    x = x.to(dtype)
    x_lora = dropout(x) if self.training and getattr(dropout, "p", 0.0) > 0 else None
    lora_a, lora_b = self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)
    with torch.autocast("cpu", enabled=False):
        return FusedLoraProduct.apply(x, x_lora, base.weight, base.bias, lora_a, lora_b, self.scaling[name])


def use_fused_lora(model: torch.nn.Module) -> int:
    """Let each peft `lora.Linear` of `model` compute in one pass where it applies; return how many may."""
    layers = [module for module in model.modules() if isinstance(module, LoraLinear)]
    for layer in layers:
        layer.forward = types.MethodType(fused_forward, layer)
    return len(layers)
