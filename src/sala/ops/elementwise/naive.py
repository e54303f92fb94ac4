"""Reference formulas of the model's elementwise glue (spec §3-5), exactly as the modeling code wrote them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_silu_mul(gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up`` (``alpha`` unused)."""
    return F.silu(gate) * up


def naive_sigmoid_gate(x: torch.Tensor, z: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Output gate: ``x * sigmoid(z)`` (``alpha`` unused)."""
    return x * torch.sigmoid(z)


def naive_scaled_residual(h: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Residual branch: ``h + y * alpha`` (two roundings in a half-precision model, like the reference)."""
    return h + y * alpha
