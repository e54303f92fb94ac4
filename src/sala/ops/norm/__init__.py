"""RMSNorm entry: the reference formula or one fused Triton kernel with the same rounding."""

from __future__ import annotations

import torch

from sala.ops.common.dispatch import call, register
from sala.ops.norm.naive import naive_rms_norm

__all__ = ["naive_rms_norm", "residual_rms_norm", "rms_norm"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """``to_dtype(x32 * rsqrt(mean(x32^2) + eps)) * w`` over the last dim (spec §3).

    x: [..., D]; weight: [D] -> [..., D] in promote(x.dtype, weight.dtype). fp64 inputs always take the reference.
    """
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm wants x [..., D] and weight [D]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return call("rms_norm", backend, x.device, x, weight, eps)


register("rms_norm", "naive", naive_rms_norm)


@register("rms_norm", "triton", accepts=lambda x, weight, eps: x.dtype in _FLOAT and weight.dtype in _FLOAT)
def _triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from sala.ops.norm.fused import triton_rms_norm

    return triton_rms_norm(x, weight, eps)


def residual_rms_norm(h: torch.Tensor, y: torch.Tensor, alpha: float, weight: torch.Tensor, eps: float,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's residual add and the next norm: ``r = h + y * alpha`` (spec §3), then ``rms_norm(r)``.

    h, y: [..., D]; weight: [D] -> (r [..., D] in promote(h, y) dtype, normed r). One kernel on CUDA when both
    share a dtype and no gradient is needed; otherwise the two ops (each differentiable).
    """
    if h.shape != y.shape:
        raise ValueError(f"residual_rms_norm wants h and y of one shape; got {tuple(h.shape)}, {tuple(y.shape)}")
    return call("residual_rms_norm", backend, h.device, h, y, alpha, weight, eps)


@register("residual_rms_norm", "naive", takes_backend=True)
def _residual_then_norm(h: torch.Tensor, y: torch.Tensor, alpha: float, weight: torch.Tensor, eps: float,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two entries one after the other, each on ``backend``."""
    from sala.ops.elementwise import scaled_residual

    r = scaled_residual(h, y, alpha, backend)
    return r, rms_norm(r, weight, eps, backend)


def _fusable_residual_norm(h, y, alpha, weight, eps) -> bool:
    return (h.dtype == y.dtype and h.dtype in _FLOAT  # mixed (autocast): the two ops
            and weight.dim() == 1 and weight.shape[0] == h.shape[-1] and weight.dtype in _FLOAT
            and h.is_contiguous() and y.is_contiguous()
            and not (torch.is_grad_enabled() and (h.requires_grad or y.requires_grad or weight.requires_grad)))


@register("residual_rms_norm", "triton", accepts=_fusable_residual_norm)
def _triton_residual_rms_norm(h, y, alpha, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    from sala.ops.norm.fused import triton_residual_rms_norm

    return triton_residual_rms_norm(h, y, alpha, weight, eps)
