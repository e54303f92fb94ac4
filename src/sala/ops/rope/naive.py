"""Reference rotate-half (NeoX) RoPE (spec §4.1), the formula the model has always used."""

from __future__ import annotations

import torch


def naive_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, sin: [B, T, 1, D] (halves duplicated) in fp32/fp64 -> x rotated, in x's dtype."""
    xf = x.to(cos.dtype)
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
