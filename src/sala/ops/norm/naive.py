"""Reference RMSNorm (spec §3), the formula the model has always used."""

from __future__ import annotations

import torch


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``to_dtype(x32 * rsqrt(mean(x32^2) + eps)) * w`` over the last dim: fp32 statistics (fp64 for fp64
    inputs), rounded to x's dtype before the weight. x: [..., D]; weight: [D] -> promote(x, weight) dtype."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight
