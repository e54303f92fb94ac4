"""FP8 (e4m3) quantisation and the reference FP8 linear: everything dequantised to fp32, one plain matmul.

Scales are per row of the tensor quantised: per output channel for a weight [out, in], per token for an activation
[..., in]. ``scale = absmax(row) / 448`` (448: the largest finite e4m3 value), so a row's largest element maps to
+-448 and the others keep e4m3's ~3 significant bits relative to their own size, not to the tensor's largest row.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., n] float -> (q [..., n] float8_e4m3fn, scale [..., 1] float32) with ``x ~= q * scale``.

    scale = absmax / 448 per row; an all-zero row gets scale 1 (its q is zeros either way, and nothing divides by
    zero). Values are clamped to +-448 before the cast: a scale rounded down by a hair would otherwise push the
    absmax element past e4m3's largest finite value, and float8_e4m3fn has no inf, so the cast would give NaN.
    """
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x32 / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q: [..., n] float8, scale broadcastable to it -> fp32 ``q * scale``."""
    return q.float() * scale


def naive_fp8_linear(x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """The reference: x [..., in] is quantised per token (as the fp8 GEMMs do), both operands are dequantised to
    fp32 and multiplied; bias [out] is added in fp32, then one rounding to ``out_dtype``. -> [..., out]."""
    xq, xs = quantize_rows(x)
    w = dequantize_rows(q_weight, w_scale[:, None])  # [out, in]
    out = dequantize_rows(xq, xs) @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
