"""FP8 (e4m3) weight-and-activation linear for inference. Two scale layouts:

* row-wise (``group_size=None``): one scale per output channel of the weight, one dynamic scale per token of the
  activation; the GEMM is ``torch._scaled_mm`` with row-wise scales (cuBLASLt on CUDA, also on CPU);
* group-wise (``group_size=g``, a power of two from 32 to 1024): one scale per ``g`` consecutive input features,
  for each output channel and for each token (finer: a loud group no longer coarsens its whole row); the GEMM is
  our Triton kernel (``triton_gemm.py``), which applies the two scales to each group's fp32 partial sum. On CUDA,
  up to :data:`FUSED_QUANT_MAX_M` tokens (decode) are quantised inside that kernel; prefill-sized inputs with
  groups of 128 run cuBLAS block scaling (``blockwise.py``) where the device's one-time check passes; the rest
  get one Triton quantisation pass, then the kernel.

``naive`` dequantises both operands to fp32 and multiplies (any device; the oracle). It models the activation
quantisation too, so a backend's only difference from it is the GEMM's accumulation order and output rounding.
``cpu``: ``torch._scaled_mm`` on CPU tensors for row-wise scales (no dequantised fp32 weight copy); group-wise
scales take the reference there. ``triton``: ``torch._scaled_mm`` on CUDA for row-wise scales, the Triton kernel
for group-wise ones (CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import logging

import torch

from sala.ops.common.dispatch import call, register, resolve_backend
from sala.ops.elementwise import GLUE_OPS
from sala.ops.fp8 import blockwise
from sala.ops.fp8.naive import (FP8_DTYPE, FP8_MAX, dequantize_groups, naive_fp8_linear, num_groups,
                                quantize_groups, quantize_rows)
from sala.utils import env
from sala.utils.env import triton_interpret

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "dequantize_fp8_weight",
    "fp8_glue_linear",
    "fp8_linear",
    "naive_fp8_linear",
    "quantize_fp8_activation",
    "quantize_fp8_weight",
    "check_group_size",
]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


FUSED_QUANT_MAX_M = 16
"""Up to this many tokens, group-wise fp8 linears quantise activations inside the GEMM (decode); more tokens get
one quantisation pass first (its cost is shared by every output tile)."""

logger = logging.getLogger(__name__)

GROUP_SIZES = tuple(2**i for i in range(5, 11))
"""Group sizes the group-wise layout takes: powers of two (the Triton kernel's K step; fp8 tensor-core dots want
K >= 32)."""


def check_group_size(group_size: int | None) -> int | None:
    """``group_size`` itself when it is None (row-wise) or one of :data:`GROUP_SIZES`; otherwise a ValueError."""
    if group_size is not None and (isinstance(group_size, bool) or group_size not in GROUP_SIZES):
        raise ValueError(f"FP8 group_size must be None (row-wise scales) or a power of two from 32 to 1024; got "
                         f"{group_size!r}")
    return group_size


def quantize_fp8_weight(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [out, in] float -> (q [out, in] float8_e4m3fn, scale float32): ``w ~= q * scale`` expanded.

    Row-wise (``group_size=None``): scale [out], absmax / 448 of each output channel. Group-wise: scale
    [out, ceil(in / group_size)], one per channel and group of input features. An all-zero group gets scale 1."""
    check_group_size(group_size)
    if w.dim() != 2 or not w.is_floating_point() or w.dtype == FP8_DTYPE:
        raise ValueError(f"quantize_fp8_weight wants a float weight [out, in]; got {w.dtype} {tuple(w.shape)}")
    q, scale = quantize_groups(w.detach(), group_size)
    return q, (scale[:, 0] if group_size is None else scale)


def dequantize_fp8_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """(q [out, in] float8_e4m3fn, scale [out] or [out, G]) -> fp32 weight [out, in]."""
    return dequantize_groups(q, scale[:, None] if group_size is None else scale, group_size)


def quantize_fp8_activation(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., in] float -> (q [..., in] float8_e4m3fn, scale [..., G] float32): dynamic scales, one per token
    (G = 1) or per token and group of ``group_size`` features (G = ceil(in / group_size))."""
    check_group_size(group_size)
    if x.dim() < 1 or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"quantize_fp8_activation wants a float tensor [..., in]; got {x.dtype} {tuple(x.shape)}")
    return quantize_groups(x.detach(), group_size)


def _check_linear(name: str, x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, group_size: int | None) -> None:
    """The argument checks of :func:`fp8_linear` (``name``: the entry, for the messages)."""
    check_group_size(group_size)
    if x.dtype not in _FLOAT:
        raise ValueError(f"{name} wants x in float16, bfloat16 or float32; got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} wants x [..., in]; got a 0-d tensor")
    if q_weight.dtype != FP8_DTYPE:
        raise ValueError(f"{name} wants q_weight of dtype {FP8_DTYPE} (see quantize_fp8_weight); got "
                         f"{q_weight.dtype}")
    if q_weight.dim() != 2 or q_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{name} wants q_weight [out, in] with in = x.shape[-1] = {x.shape[-1]}; got "
                         f"q_weight {tuple(q_weight.shape)}")
    out_features = q_weight.shape[0]
    want = (out_features,) if group_size is None else (out_features, num_groups(q_weight.shape[1], group_size))
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != want:
        layout = "row-wise" if group_size is None else f"group_size={group_size}"
        raise ValueError(f"{name} ({layout}) wants w_scale {list(want)} float32; got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name} wants bias [out] = [{out_features}] or None; got {tuple(bias.shape)}")
    if out_dtype not in _FLOAT:
        raise ValueError(f"{name}'s out_dtype must be float16, bfloat16 or float32; got {out_dtype}")
    tensors = [x, q_weight, w_scale] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{name} wants every tensor on one device; got {[str(t.device) for t in tensors]}")


def fp8_linear(x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = None, backend: str = "auto",
               group_size: int | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` with W the dequantised weight and x quantised to e4m3 on the fly with the same layout.

    x: [..., in] fp16/bf16/fp32; q_weight: [out, in] float8_e4m3fn; w_scale: [out] float32 (row-wise,
    ``group_size=None``) or [out, ceil(in / group_size)] float32 (group-wise); bias: [out] or None
    -> [..., out] in ``out_dtype`` (default: x's dtype). Meant for inference: with autograd on x the reference runs,
    its fp8 casts passing gradients straight through; the quantised weight is a constant.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_linear("fp8_linear", x, q_weight, w_scale, bias, out_dtype, group_size)
    # implementations see 2-D activations [tokens, in]
    out = call("fp8_linear", backend, x.device, x.reshape(-1, x.shape[-1]), q_weight, w_scale, bias, out_dtype,
               group_size)
    return out.reshape(*x.shape[:-1], q_weight.shape[0])


register("fp8_linear", "naive", naive_fp8_linear)


def _quantize_rows_fast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantisation: the one-pass Triton kernel on CUDA, the PyTorch reference elsewhere (same numbers)."""
    if x.device.type == "cuda":
        from sala.ops.fp8.triton_gemm import triton_quantize_groups

        return triton_quantize_groups(x, None)
    return quantize_rows(x)


def _scaled_mm_rowwise(x: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """One ``torch._scaled_mm``: x [M, in] quantised per token, @ q_weight^T, with scale_a [M, 1] and scale_b
    [1, out] (per channel) applied to the fp32 accumulator, bias added there, then one rounding to ``out_dtype``."""
    xq, xs = _quantize_rows_fast(x)
    return torch._scaled_mm(xq, q_weight.t(), scale_a=xs, scale_b=w_scale[None, :],
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)


def _no_grad(x: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and x.requires_grad)


@register("fp8_linear", "cpu", accepts=lambda x, qw, ws, b, out_dtype, group_size:
          x.device.type == "cpu" and _no_grad(x) and group_size is None)
def _cpu_fp8_linear(x, q_weight, w_scale, bias, out_dtype, group_size) -> torch.Tensor:
    # CPU _scaled_mm takes row-wise scales and any of the three output dtypes; it avoids the reference's fp32
    # dequantised copy of the whole weight on every call.
    return _scaled_mm_rowwise(x, q_weight, w_scale, bias, out_dtype)


def _triton_takes(x, q_weight, w_scale, bias, out_dtype, group_size) -> bool:
    """Group-wise: the Triton kernel (CUDA or the interpreter). Row-wise: CUDA tensors whose GEMM cuBLASLt accepts
    (in and out multiples of 16, the fp8 operand alignment)."""
    if not _no_grad(x):
        return False
    if group_size is not None:
        return x.device.type == "cuda" or triton_interpret()
    return x.device.type == "cuda" and q_weight.shape[1] % 16 == 0 and q_weight.shape[0] % 16 == 0


def _quantises_in_gemm(m: int, group_size: int) -> bool:
    """Decode-sized M with groups <= 128: the group GEMM quantises its few rows itself (no separate pass)."""
    return m <= FUSED_QUANT_MAX_M and group_size <= 128


def _quantised_group_linear(x, q_weight, w_scale, bias, out_dtype, group_size, glue=None) -> torch.Tensor:
    """x (or ``glue=(name, y)``: name(x, y)) quantised by one Triton pass, then cuBLAS block scaling (prefill, groups
    of 128, where the device's check passed) or the Triton group GEMM; both give the reference's numbers."""
    from sala.ops.fp8.triton_gemm import triton_fp8_group_gemm, triton_quantize_groups

    if blockwise.takes(x, q_weight, bias, group_size, out_dtype) and env.fp8_cublas_blockwise():
        layout = blockwise.layout_for(x.device)
        if layout is not None:
            xq, xs = triton_quantize_groups(x, group_size, scales_column_major=True, glue=glue)
            try:
                return blockwise.blockwise_fp8_linear(xq, xs, q_weight, w_scale, out_dtype, layout)
            except RuntimeError as e:  # a shape the one-time check did not cover: Triton from now on
                logger.warning("fp8: cuBLAS block scaling refused [%d, %d] x [%d, %d] (%s); using the Triton "
                               "GEMM", *x.shape, *q_weight.shape, str(e).splitlines()[0][:160])
                blockwise.forget(x.device)
            return triton_fp8_group_gemm(xq, xs, q_weight, w_scale, bias, out_dtype, group_size)
    xq, xs = triton_quantize_groups(x, group_size, glue=glue)
    return triton_fp8_group_gemm(xq, xs, q_weight, w_scale, bias, out_dtype, group_size)


@register("fp8_linear", "triton", accepts=_triton_takes)
def _triton_fp8_linear(x, q_weight, w_scale, bias, out_dtype, group_size) -> torch.Tensor:
    if group_size is not None:
        if _quantises_in_gemm(x.shape[0], group_size):
            from sala.ops.fp8.triton_gemm import triton_fp8_group_gemm

            return triton_fp8_group_gemm(x, None, q_weight, w_scale, bias, out_dtype, group_size)
        return _quantised_group_linear(x, q_weight, w_scale, bias, out_dtype, group_size)
    if out_dtype == torch.bfloat16:  # row-wise scaling on CUDA produces bf16 only
        return _scaled_mm_rowwise(x, q_weight, w_scale, bias, out_dtype)
    # fp16/fp32 outputs: the fp8 GEMM with unit tensor-wise scales into fp32, then the two scales and the bias
    # applied in fp32 (one extra elementwise pass; a bias is not fused by _scaled_mm for fp32 outputs)
    xq, xs = _quantize_rows_fast(x)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    acc = torch._scaled_mm(xq, q_weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    acc = acc * xs * w_scale[None, :]
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def fp8_glue_linear(op: str, a: torch.Tensor, b: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, group_size: int | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """``fp8_linear(glue(a, b), ...)`` for the glue ``op`` ("silu_mul": SwiGLU before a down projection;
    "sigmoid_gate": an output gate before o_proj), with the same numbers. a, b: [..., in], one shape and dtype
    -> [..., out] in a's dtype. Where the linear quantises its input in a separate pass (prefill-sized, group-wise
    scales, Triton backend), that pass computes the glue itself: the glue's output is never written and read back.
    """
    if op not in GLUE_OPS:
        raise ValueError(f"fp8_glue_linear's op must be one of {GLUE_OPS}; got {op!r}")
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"fp8_glue_linear wants a and b of one shape and dtype; got {tuple(a.shape)} {a.dtype}, "
                         f"{tuple(b.shape)} {b.dtype}")
    _check_linear("fp8_glue_linear", a, q_weight, w_scale, bias, a.dtype, group_size)
    from sala.ops.elementwise.fused import as_rows

    a2, b2 = as_rows(a), as_rows(b)
    if (group_size is not None and bias is None and a2 is not None and b2 is not None
            and resolve_backend(backend, a.device) == "triton" and _no_grad(b)
            and _triton_takes(a2, q_weight, w_scale, bias, a.dtype, group_size)
            and not _quantises_in_gemm(a2.shape[0], group_size)):
        out = _quantised_group_linear(a2, q_weight, w_scale, None, a.dtype, group_size, glue=(op, b2))
        return out.reshape(*a.shape[:-1], q_weight.shape[0])
    from sala.ops import elementwise

    return fp8_linear(getattr(elementwise, op)(a, b, backend), q_weight, w_scale, bias, group_size=group_size,
                      backend=backend)
