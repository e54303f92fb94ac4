"""RMSNorm entry: the reference formula or one fused Triton kernel with the same rounding."""

from __future__ import annotations

import torch

from sala.ops.common.dispatch import resolve_backend
from sala.ops.norm.naive import naive_rms_norm

__all__ = ["naive_rms_norm", "residual_rms_norm", "rms_norm"]


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


def residual_rms_norm(h: torch.Tensor, y: torch.Tensor, alpha: float, weight: torch.Tensor, eps: float,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's residual add and the next norm: ``r = h + y * alpha`` (spec §3), then ``rms_norm(r)``.

    h, y: [..., D]; weight: [D] -> (r [..., D] in promote(h, y) dtype, normed r). One kernel on CUDA when both
    share a dtype and no gradient is needed; otherwise the two ops (each differentiable).
    """
    from sala.ops.elementwise import scaled_residual

    if h.shape != y.shape:
        raise ValueError(f"residual_rms_norm wants h and y of one shape; got {tuple(h.shape)}, {tuple(y.shape)}")
    if (resolve_backend(backend, h.device) == "triton" and h.dtype == y.dtype  # mixed (autocast): the two ops
            and h.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and weight.dim() == 1 and weight.shape[0] == h.shape[-1] and weight.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and h.is_contiguous() and y.is_contiguous()
            and not (torch.is_grad_enabled() and (h.requires_grad or y.requires_grad or weight.requires_grad))):
        from sala.ops.norm.fused import triton_residual_rms_norm

        return triton_residual_rms_norm(h, y, alpha, weight, eps)
    r = scaled_residual(h, y, alpha, backend)
    return r, rms_norm(r, weight, eps, backend)
