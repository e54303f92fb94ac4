"""RMSNorm entry: the reference formula or one fused Triton kernel with the same rounding."""

from __future__ import annotations

import torch

from sala.ops.common.dispatch import resolve_backend
from sala.ops.norm.naive import naive_rms_norm

__all__ = ["naive_rms_norm", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """``to_dtype(x32 * rsqrt(mean(x32^2) + eps)) * w`` over the last dim (spec §3).

    x: [..., D]; weight: [D] -> [..., D] in promote(x.dtype, weight.dtype). fp64 inputs always take the reference.
    """
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm wants x [..., D] and weight [D]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if (resolve_backend(backend, x.device) == "triton" and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and weight.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        from sala.ops.norm.fused import triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    return naive_rms_norm(x, weight, eps)
