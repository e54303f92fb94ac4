"""FP8 (e4m3) weight-and-activation linear for inference: per-output-channel weight scales, dynamic per-token
activation scales, one fp8 GEMM (``torch._scaled_mm`` with row-wise scales) where the hardware has one.

``naive`` dequantises both operands to fp32 and multiplies (any device; the oracle). It models the activation
quantisation too, so a backend's only difference from it is the GEMM's accumulation order and output rounding.
``cpu``: ``torch._scaled_mm`` on CPU tensors (same arithmetic, no dequantised fp32 weight copy). ``triton``: the
CUDA GEMM (cuBLASLt/CUTLASS behind ``torch._scaled_mm``, no Triton kernel of ours); CUDA tensors only.
"""

from __future__ import annotations

import torch

from sala.ops.common.dispatch import call, register
from sala.ops.fp8.naive import FP8_DTYPE, FP8_MAX, dequantize_rows, naive_fp8_linear, quantize_rows

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "dequantize_fp8_weight",
    "fp8_linear",
    "naive_fp8_linear",
    "quantize_fp8_activation",
    "quantize_fp8_weight",
]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] float -> (q [out, in] float8_e4m3fn, scale [out] float32), ``w ~= q * scale[:, None]``.

    One scale per output channel (row): absmax / 448; an all-zero row gets scale 1."""
    if w.dim() != 2 or not w.is_floating_point() or w.dtype == FP8_DTYPE:
        raise ValueError(f"quantize_fp8_weight wants a float weight [out, in]; got {w.dtype} {tuple(w.shape)}")
    q, scale = quantize_rows(w.detach())
    return q, scale[:, 0]


def dequantize_fp8_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q [out, in] float8_e4m3fn, scale [out]) -> fp32 weight [out, in]."""
    return dequantize_rows(q, scale[:, None])


def quantize_fp8_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., in] float -> (q [..., in] float8_e4m3fn, scale [..., 1] float32): one dynamic scale per token."""
    if x.dim() < 1 or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"quantize_fp8_activation wants a float tensor [..., in]; got {x.dtype} {tuple(x.shape)}")
    return quantize_rows(x.detach())


def fp8_linear(x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """``x @ W^T + bias`` with W = q_weight * w_scale[:, None] and x quantised to e4m3 per token on the fly.

    x: [..., in] fp16/bf16/fp32; q_weight: [out, in] float8_e4m3fn; w_scale: [out] float32; bias: [out] or None
    -> [..., out] in ``out_dtype`` (default: x's dtype). Meant for inference: with autograd on x the reference runs,
    its fp8 casts passing gradients straight through; the quantised weight is a constant.
    """
    if x.dtype not in _FLOAT:
        raise ValueError(f"fp8_linear wants x in float16, bfloat16 or float32; got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("fp8_linear wants x [..., in]; got a 0-d tensor")
    if q_weight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_linear wants q_weight of dtype {FP8_DTYPE} (see quantize_fp8_weight); got "
                         f"{q_weight.dtype}")
    if q_weight.dim() != 2 or q_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"fp8_linear wants q_weight [out, in] with in = x.shape[-1] = {x.shape[-1]}; got "
                         f"q_weight {tuple(q_weight.shape)}")
    out_features = q_weight.shape[0]
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (out_features,):
        raise ValueError(f"fp8_linear wants w_scale [out] = [{out_features}] float32; got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"fp8_linear wants bias [out] = [{out_features}] or None; got {tuple(bias.shape)}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT:
        raise ValueError(f"fp8_linear's out_dtype must be float16, bfloat16 or float32; got {out_dtype}")
    tensors = [x, q_weight, w_scale] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"fp8_linear wants every tensor on one device; got {[str(t.device) for t in tensors]}")
    return call("fp8_linear", backend, x.device, x, q_weight, w_scale, bias, out_dtype)


register("fp8_linear", "naive", naive_fp8_linear)


def _scaled_mm_rowwise(x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """One ``torch._scaled_mm``: xq [M, in] @ q_weight^T with scale_a [M, 1] (per token) and scale_b [1, out]
    (per channel) applied to the fp32 accumulator, bias added there, then one rounding to ``out_dtype``."""
    lead = x.shape[:-1]
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = torch._scaled_mm(xq, q_weight.t(), scale_a=xs, scale_b=w_scale[None, :],
                           bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
    return out.reshape(*lead, q_weight.shape[0])


def _no_grad(x: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


@register("fp8_linear", "cpu", accepts=lambda x, qw, ws, b, out_dtype: x.device.type == "cpu" and _no_grad(x))
def _cpu_fp8_linear(x, q_weight, w_scale, bias, out_dtype) -> torch.Tensor:
    # CPU _scaled_mm takes row-wise scales and any of the three output dtypes; it avoids the reference's fp32
    # dequantised copy of the whole weight on every call.
    return _scaled_mm_rowwise(x, q_weight, w_scale, bias, out_dtype)


def _cuda_gemm_takes(x, q_weight, w_scale, bias, out_dtype) -> bool:
    """CUDA tensors whose GEMM cuBLASLt accepts: in and out multiples of 16 (fp8 operand alignment)."""
    return (x.device.type == "cuda" and _no_grad(x)
            and q_weight.shape[1] % 16 == 0 and q_weight.shape[0] % 16 == 0)


@register("fp8_linear", "triton", accepts=_cuda_gemm_takes)
def _cuda_fp8_linear(x, q_weight, w_scale, bias, out_dtype) -> torch.Tensor:
    if out_dtype == torch.bfloat16:  # row-wise scaling on CUDA produces bf16 only
        return _scaled_mm_rowwise(x, q_weight, w_scale, bias, out_dtype)
    # fp16/fp32 outputs: the fp8 GEMM with unit tensor-wise scales into fp32, then the two scales and the bias
    # applied in fp32 (one extra elementwise pass; a bias is not fused by _scaled_mm for fp32 outputs)
    lead = x.shape[:-1]
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]))
    one = torch.ones((), dtype=torch.float32, device=x.device)
    acc = torch._scaled_mm(xq, q_weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    acc = acc * xs * w_scale[None, :]
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype).reshape(*lead, q_weight.shape[0])
