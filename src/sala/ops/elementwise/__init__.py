"""Elementwise glue entries: SwiGLU product, sigmoid output gate, scaled residual add.

Each takes two tensors of one shape and dtype. The Triton path (one kernel, the reference's rounding points)
runs for fp16/bf16/fp32 CUDA tensors laid out as rows with unit column stride
(contiguous, or column slices of a wider tensor); anything else takes the reference formula.
"""

from __future__ import annotations

import torch

from sala.ops.common.dispatch import call, register, resolve
from sala.ops.elementwise.naive import naive_scaled_residual, naive_sigmoid_gate, naive_silu_mul

__all__ = ["GLUE_OPS", "scaled_residual", "sigmoid_gate", "silu_mul"]

GLUE_OPS = ("silu_mul", "sigmoid_gate")
"""The glue that feeds a linear layer (SwiGLU before down_proj, the output gate before o_proj): entries here of
these names, and what an fp8 linear can compute inside its activation quantiser (``sala.ops.fp8.fp8_glue_linear``)."""


def _fusable(a: torch.Tensor, b: torch.Tensor, *_) -> bool:
    if not (a.shape == b.shape and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return False
    from sala.ops.elementwise.fused import as_rows  # column slices of a fused GEMM's output qualify

    return as_rows(a) is not None and as_rows(b) is not None


register("silu_mul", "naive", naive_silu_mul)
register("sigmoid_gate", "naive", naive_sigmoid_gate)
register("scaled_residual", "naive", naive_scaled_residual)


@register("silu_mul", "triton", accepts=_fusable)
def _triton_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from sala.ops.elementwise.fused import SILU_MUL, triton_glue

    return triton_glue(SILU_MUL, gate, up)


@register("sigmoid_gate", "triton", accepts=_fusable)
def _triton_sigmoid_gate(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    from sala.ops.elementwise.fused import SIGMOID_GATE, triton_glue

    return triton_glue(SIGMOID_GATE, x, z)


@register("scaled_residual", "triton", accepts=_fusable)
def _triton_scaled_residual(h: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    from sala.ops.elementwise.fused import SCALED_RESIDUAL, triton_glue

    return triton_glue(SCALED_RESIDUAL, h, y, alpha)


def _fused(a: torch.Tensor, b: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` sends these two tensors to the fused Triton kernel (the three entries share the test)."""
    return resolve("silu_mul", backend, a.device, a, b) is _triton_silu_mul


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """SwiGLU ``silu(gate) * up``; gate, up: [..., I] -> [..., I]."""
    return call("silu_mul", backend, gate.device, gate, up)


def sigmoid_gate(x: torch.Tensor, z: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Output gate ``x * sigmoid(z)``; x, z: [..., W] -> [..., W]."""
    return call("sigmoid_gate", backend, x.device, x, z)


def scaled_residual(h: torch.Tensor, y: torch.Tensor, alpha: float, backend: str = "auto") -> torch.Tensor:
    """Residual add ``h + y * alpha`` (spec §3: alpha = scale_depth / sqrt(num_layers)); h, y: [..., hidden]."""
    return call("scaled_residual", backend, h.device, h, y, alpha)
