"""Small Triton helpers shared by the kernels of several ops."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.utils.env import triton_interpret


def interp_rne(dtype: torch.dtype) -> bool:
    """Whether kernels must round bf16 outputs by hand (only the interpreter needs it)."""
    return triton_interpret() and dtype == torch.bfloat16


@triton.jit
def rne_bf16(x):
    """Round fp32 to the nearest-even bf16 value, kept in fp32 (the CPU interpreter's casts truncate)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)
