"""The weight formats the generation engine decodes in besides fp32, each with the CPU kernel that measured fastest
for a decode step (benchmarks/decode_step.py; benchmarks/README.md, "Generation speed", has the numbers).

- bfloat16: the weights in bf16, each linear layer's reordered once into oneDNN's blocked layout (what inductor's
  weight freezing does for bf16 on CPUs), so that a step skips the reorder torch's bf16 `linear` does on every
  call. All of SmolLM2-135M's linear layers: 18.9 ms packed vs 27.7 ms plain bf16 for one row, 19.1 vs 29.4 ms for
  8 rows.
- int8: weight-only, one scale per output channel, bf16 activations (torch's `_weight_int8pack_mm`): a quarter of
  fp32's bytes, 15.0 ms for one row against 19.9 ms packed bf16. That kernel slows with every row (32.4 ms for 8,
  80.7 for 32, against 20.8 and 25.4 packed), so for more than 4 rows (a batch of answers, a prompt's prefill) the
  same weights, widened back to bf16 with their scales folded in and packed, go through oneDNN. That copy makes
  int8's weights 3/4 of fp32's in memory, where a step of one row reads only the int8 quarter. Layers that read the
  same input (q, k and v; gate and up) are stacked into one product for the decode step (`stack_int8`,
  speedups/decode_step.py): 22.4 -> 21.1 ms a step.

Both need a CPU that runs bf16 natively (AVX-512 BF16 or AMX): elsewhere bf16 is emulated, about 100x slower. GPT-2's
`Conv1D` layers count as linear layers; a model whose own code reads its linear layers' weights (T5) is refused.

Why by hand: no well-kept library gives these kernels in eager mode. torchao's Int8WeightOnlyConfig took 37.8 ms for
SmolLM2's output layer (49152x576, one row) against 1.3 ms here and 4.2 ms in fp32; torch's dynamic int8
quantization (fbgemm, int8 activations too) is fast on any x86 CPU but changed 23% of the symptom example's greedy
answers (exact match 0.82 -> 0.69), and still 6% with the most sensitive layers kept in fp32, against 2.4% for
weight-only int8 here (benchmarks/generation_exactness.py).
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from tunelab.errors import TunelabError, one_line
from tunelab.models.precision import bf16_supported

FORMATS = ("float32", "bfloat16", "int8")
AUTO = "auto"  # serve's default: the fastest format this machine runs the model in (auto_format)
PACKED_ABOVE_ROWS = 4  # int8: more rows than this go through the packed bf16 copy (measured crossover: 4-5 rows)


def use_format(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The model (changed in place) with its weights in format `name` (one of FORMATS), for decoding only."""
    if name == "float32":
        return model
    if name not in FORMATS:
        raise TunelabError(f"weight format '{name}' is not one of {', '.join(FORMATS)}")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if name == "bfloat16" and not on_cpu:
        return model.to(torch.bfloat16)
    if not on_cpu:
        raise TunelabError("int8 weights run on CPUs; on a GPU use bfloat16")
    if not bf16_supported():
        raise TunelabError(f"{name} weights decode with bf16 arithmetic, which this CPU has no instructions for "
                           f"(AVX-512 BF16 or AMX): emulated it is about 100x slower; use float32")
    model.to(torch.bfloat16)
    layer = PackedLinear if name == "bfloat16" else Int8Linear
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear | Conv1D):
                setattr(parent, child_name, layer(*weight_and_bias(child)))
    check_runs(model, name)
    return model


def auto_format(model: torch.nn.Module) -> tuple[str, str]:
    """The format `--dtype auto` decodes a text generator in, and why: int8 on a CPU with native bf16 (one answer
    1.64x fp32's tokens/s, 8 at once 1.8x; 98% of the symptom example's greedy answers equal fp32's, its exact match
    within the interval), bf16 on a GPU that has it, fp32 elsewhere (emulated bf16 is ~100x slower)."""
    if next(model.parameters()).device.type != "cpu":
        return ("bfloat16", "a GPU with bf16") if bf16_supported() else ("float32", "a GPU without bf16")
    if getattr(model.config, "is_encoder_decoder", False):
        return "float32", "int8 weights do not run encoder-decoders' own weight reads"
    if not bf16_supported():
        return "float32", "this CPU has no native bf16 (AVX-512 BF16 or AMX), which int8 weights decode with"
    return "int8", "this CPU runs bf16 natively"


def weight_and_bias(layer: torch.nn.Linear | Conv1D) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's weight [out, in] and bias; GPT-2's `Conv1D` keeps its weight the other way round."""
    weight = layer.weight.detach()
    return (weight.T if isinstance(layer, Conv1D) else weight), (None if layer.bias is None else layer.bias.detach())


def check_runs(model: torch.nn.Module, name: str) -> None:
    """One token generated, so that a model whose code reads its linear layers' weights itself (T5's feed-forward
    does) is refused now, in one line, rather than failing every request."""
    try:
        with torch.inference_mode():
            model.generate(input_ids=torch.zeros(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 1,
                           dtype=torch.long), max_new_tokens=1, do_sample=False, pad_token_id=0)
    except Exception as exc:  # noqa: BLE001 - any failure means this format cannot serve this model
        raise TunelabError(f"{name} weights do not run with {type(model).__name__} ({type(exc).__name__}: "
                           f"{one_line(exc, 120)}); use float32") from None


class PackedLinear(torch.nn.Module):
    """A bf16 linear layer whose weight oneDNN has reordered once into its own layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # an opaque oneDNN tensor, kept out of parameters and buffers so that `.to()` and state dicts pass it by
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous(), 1)
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights (symmetric, one scale per output channel) and bf16 activations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        integers = torch.round(weight / scale[:, None]).clamp(-127, 127)
        # plain attributes, not buffers, as PackedLinear's: a decode step calls 200+ of these layers, and a buffer's
        # lookup through Module.__getattr__ was half of the 10 us each call cost besides its kernel
        self.weight_int8 = integers.to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        self.bias = None if bias is None else bias.to(torch.bfloat16)
        self.widened = PackedLinear(integers * scale[:, None], None)  # for batches and prefill: see the module doc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= PACKED_ABOVE_ROWS:
            out = int8_product(rows, self.weight_int8, self.scale)
        else:
            out = self.widened(rows)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def stack_int8(layers: list[torch.nn.Module]) -> StackedInt8 | None:
    """`layers` as one `StackedInt8` where all are `Int8Linear`s over the same input size; else None (a LoRA layer
    around one, another format)."""
    int8 = all(isinstance(layer, Int8Linear) for layer in layers)
    return StackedInt8(layers) if int8 and len({layer.in_features for layer in layers}) == 1 else None


class StackedInt8:
    """Int8 layers that read the same input (a block's q, k and v; an MLP's gate and up) as one product: one kernel
    call instead of three or two (vLLM's fused QKV and gate-up). Their weights and scales are stacked, and the layers'
    own become views of the stack, so nothing is held twice; each layer's output is its slice, the same numbers. More
    rows than PACKED_ABOVE_ROWS go through each layer's packed bf16 copy, as the layer alone would."""

    def __init__(self, layers: list[Int8Linear]) -> None:
        self.layers = layers
        self.in_features = layers[0].in_features
        self.sizes = [layer.out_features for layer in layers]
        self.weight_int8 = torch.cat([layer.weight_int8 for layer in layers])
        self.scale = torch.cat([layer.scale for layer in layers])
        self.biases = [layer.bias for layer in layers]
        start = 0
        for layer, size in zip(layers, self.sizes, strict=True):
            layer.weight_int8, layer.scale = self.weight_int8[start:start + size], self.scale[start:start + size]
            start += size

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > PACKED_ABOVE_ROWS:
            return tuple(layer(x) for layer in self.layers)
        parts = int8_product(rows, self.weight_int8, self.scale).split(self.sizes, dim=-1)
        return tuple((part if bias is None else part + bias).reshape(*x.shape[:-1], -1)
                     for part, bias in zip(parts, self.biases, strict=True))


def int8_product(rows: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """rows [n, in] times int8 weights [out, in] with one scale per output channel, in bf16 (torch's weight-only int8
    kernel): the one place `Int8Linear` and `StackedInt8` multiply, so that a stacked product is each layer's own."""
    if rows.dtype != torch.bfloat16:
        rows = rows.to(torch.bfloat16)
    return torch.ops.aten._weight_int8pack_mm(rows, weight_int8, scale)
