"""FP8 (e4m3) quantisation and the reference FP8 linear: everything dequantised to fp32, one plain matmul.

A scale covers one row (``group_size=None``: per output channel for a weight [out, in], per token for an activation
[..., in]) or one group of ``group_size`` consecutive elements along the row (the last group of a row may be
shorter). ``scale = absmax(group) * (1 / 448)`` (448: the largest finite e4m3 value), so a group's largest element maps
to +-448 and the others keep e4m3's ~3 significant bits relative to their own group, not to the row's largest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# scale = absmax * (1 / 448) with the reciprocal rounded to fp32 once: CUDA torch turns "tensor / scalar" into that
# product while CPU torch divides, so a quotient would give scales 1 ulp apart across devices (and from the Triton
# quantiser); the product is the same number everywhere
INV_FP8_MAX = 1.0 / FP8_MAX


def num_groups(n: int, group_size: int | None) -> int:
    """Scales per row of length ``n``: 1 for row-wise scales, else ceil(n / group_size)."""
    return 1 if group_size is None else -(-n // group_size)


def quantize_groups(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., n] float -> (q [..., n] float8_e4m3fn, scale [..., G] float32) with ``x ~= q * expand(scale)``,
    G = :func:`num_groups` (1 for row-wise scales).

    An all-zero group gets scale 1 (its q is zeros either way, and nothing divides by zero), and so does a group
    whose absmax is so small (below 224 * 2^-149) that absmax / 448 underflows to 0: its codes round to zero. Values
    are clamped to +-448 before the cast: a scale rounded down by a hair would otherwise push the absmax element
    past e4m3's largest finite value, and float8_e4m3fn has no inf, so the cast would give NaN.
    """
    n = x.shape[-1]
    size = n if group_size is None else group_size
    groups = num_groups(n, group_size)
    x32 = x.float()
    if groups * size != n:  # ragged last group: zero padding changes no absmax
        x32 = F.pad(x32, (0, groups * size - n))
    g = x32.reshape(*x.shape[:-1], groups, size)
    amax = g.abs().amax(dim=-1, keepdim=True)
    scale = amax * INV_FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # absmax 0, or below 224 * 2^-149: the product is 0
    q = (g / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(*x.shape[:-1], groups * size)
    if groups * size != n:
        q = q[..., :n].contiguous()
    return q, scale[..., 0]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., n] float -> (q [..., n] float8_e4m3fn, scale [..., 1] float32): one scale per row."""
    return quantize_groups(x, None)


def expand_scales(scale: torch.Tensor, n: int, group_size: int | None) -> torch.Tensor:
    """scale [..., G] -> [..., n]: each group's scale repeated over its elements (row-wise: broadcastable [..., 1])."""
    if group_size is None:
        return scale
    return scale.repeat_interleave(group_size, dim=-1)[..., :n]


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """q: [..., n] float8, scale [..., G] -> fp32 ``q * expand(scale)``."""
    return q.float() * expand_scales(scale, q.shape[-1], group_size)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q: [..., n] float8, scale broadcastable to it -> fp32 ``q * scale``."""
    return q.float() * scale


def naive_fp8_linear(x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype, group_size: int | None = None) -> torch.Tensor:
    """The reference: x [..., in] is quantised per token (or per group of ``group_size``) as the fp8 GEMMs do, both
    operands are dequantised to fp32 and multiplied; bias [out] is added in fp32, then one rounding to
    ``out_dtype``. w_scale: [out] (row-wise) or [out, G]. -> [..., out]."""
    xq, xs = quantize_groups(x, group_size)
    ws = w_scale[:, None] if group_size is None else w_scale
    w = dequantize_groups(q_weight, ws, group_size)  # [out, in]
    out = dequantize_groups(xq, xs, group_size) @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def gptq_fp8_weight(w: torch.Tensor, hessian: torch.Tensor, group_size: int | None = None, block: int = 128,
                    damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2022) for e4m3 weights: quantise w [out, in] column by column and fold each column's
    rounding error into the columns not yet quantised, weighted by the inverse of ``hessian`` [in, in] = X^T X
    of the layer's calibration inputs, so that ``x @ q^T`` (not q itself) stays close to ``x @ w^T``.

    The scales are the round-to-nearest ones of w (absmax / 448 per row or group) and stay fixed; only the codes
    change. ``damp`` * mean(diag) is added to the diagonal (a column no input touches gets 1). With a diagonal
    hessian no error moves and the result equals round-to-nearest. -> (q [out, in] float8_e4m3fn, scale as
    :func:`quantize_groups` gives it: [out, G]).
    """
    n = w.shape[1]
    if hessian.shape != (n, n):
        raise ValueError(f"gptq_fp8_weight wants hessian [in, in] = [{n}, {n}]; got {tuple(hessian.shape)}")
    _, scale = quantize_groups(w, group_size)
    col_scale = expand_scales(scale, n, group_size).expand(w.shape[0], n).float()
    W = w.float().clone()
    H = hessian.float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype, device=H.device)
    # upper Cholesky factor of H^-1: row i holds the weights of column i's error on the later columns
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty(W.shape, dtype=FP8_DTYPE, device=W.device)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        Wb = W[:, b0:b1].clone()
        err = torch.empty_like(Wb)
        for j in range(b1 - b0):
            i = b0 + j
            s = col_scale[:, i]
            code = (Wb[:, j] / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            codes[:, i] = code
            q = code.float() * s
            e = (Wb[:, j] - q) / hinv[i, i]
            Wb[:, j:] -= e[:, None] * hinv[i, b0 + j:b1][None, :]
            err[:, j] = e
        W[:, b1:] -= err @ hinv[b0:b1, b1:]
    return codes, scale
