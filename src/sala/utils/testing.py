"""Numerical comparison used by tests and benchmark verify steps."""

from __future__ import annotations

import torch


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error ||a - e|| / ||e|| computed in float64; NaN/Inf anywhere gives ``inf``."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("inf")
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "tensor") -> None:
    """Assert relative L2 error <= ``rtol``; NaN never passes."""
    err = rel_l2(actual, expected)
    if not err <= rtol:
        raise AssertionError(f"{name}: relative L2 error {err:.3e} exceeds {rtol:.1e}")


def default_rtol(dtype: torch.dtype) -> float:
    """Tolerance by dtype: fp64 1e-10, fp32 1e-5, tf32/fp16 1e-3, bf16 1e-2."""
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
