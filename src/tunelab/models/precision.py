"""Which precision this machine runs natively, and bf16 autocast where it does."""

from __future__ import annotations

import contextlib

import torch


def bf16_supported() -> bool:
    """Whether bf16 autocast runs natively here (CUDA with bf16, or a CPU with AVX-512 bf16 / AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(bf16: bool):
    """bf16 autocast on the model's device type when asked, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
