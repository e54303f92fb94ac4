"""FP8 GEMM with DeepSeek-style 1 x 128 scales on both operands through cuBLAS block scaling (``torch._scaled_mm``;
cuBLASLt >= 12.9 on Hopper): activations one scale per token and 128 features, the weight one per output channel
and 128 features -- exactly the layout of ``group_size=128``, so the numbers are those of the Triton group GEMM,
with cuBLAS's tensor-core pipeline for prefill-sized M.

Whether a torch build takes these scales, and in which memory layout the weight's scales must come, differs
across torch and cuBLAS versions. So the first call on a device tries each candidate layout on a small problem and
keeps the first whose result matches the reference (``naive_fp8_linear``) within bf16 rounding; with none, the
caller keeps the Triton kernel. The check runs once per device and logs its outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from sala.ops.fp8.naive import naive_fp8_linear, quantize_groups

logger = logging.getLogger(__name__)

GROUP = 128
MIN_M = 64
"""Below this many tokens the Triton group GEMM stays (decode and small chunks: its launch plan is tuned for them)."""

# weight scale [N, G] -> the tensor passed as scale_b for mat_b = q_weight.t() [K, N]. torch 2.11 + cuBLAS 13 on an
# H200 took the first (Dec 5 2026); the others are tried where a build wants another layout.
WEIGHT_SCALE_LAYOUTS: tuple[tuple[str, Callable[[torch.Tensor], torch.Tensor]], ...] = (
    ("[G, N] row-major", lambda ws: ws.t().contiguous()),
    ("[N, G] column-major", lambda ws: ws.t().contiguous().t()),
    ("[N, G] row-major", lambda ws: ws.contiguous()),
)

_checked: dict[tuple[str, int | None], int | None] = {}


def _matmul(xq, xs_col, q_weight, ws_b, out_dtype, scaled_mm=None):
    scaled_mm = torch._scaled_mm if scaled_mm is None else scaled_mm
    return scaled_mm(xq, q_weight.t(), scale_a=xs_col, scale_b=ws_b, out_dtype=out_dtype)


def layout_for(device: torch.device) -> int | None:
    """The layout to use on ``device``: :func:`pick_layout`'s answer, found on first use; None where there is none,
    or while a CUDA graph is being captured before the check ran (it copies to the device and reads a result
    back, which a capture forbids)."""
    key = (device.type, device.index)
    if key not in _checked:
        if torch.cuda.is_current_stream_capturing():
            return None
        pick_layout(device)
    return _checked[key]


def forget(device: torch.device) -> None:
    """Stop using cuBLAS block scaling on ``device`` (it refused a shape the check did not cover)."""
    _checked[(device.type, device.index)] = None


def pick_layout(device: torch.device, scaled_mm=None) -> int | None:
    """Index into :data:`WEIGHT_SCALE_LAYOUTS` that ``scaled_mm`` (default ``torch._scaled_mm``) computes correctly
    on ``device``, or None; checked once per device on a 256 x 512 x 384 problem against the reference."""
    key = (device.type, device.index)
    if key in _checked and scaled_mm is None:
        return _checked[key]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (2 * torch.randn(256, 512, generator=g)).bfloat16().to(device)
    w = 0.05 * torch.randn(384, 512, generator=g)
    q_weight, w_scale = quantize_groups(w, GROUP)
    q_weight, w_scale = q_weight.to(device), w_scale.to(device)
    want = naive_fp8_linear(x, q_weight, w_scale, None, torch.bfloat16, GROUP).float()
    xq, xs = quantize_groups(x, GROUP)
    xs_col = xs.t().contiguous().t()
    chosen, notes = None, []
    for i, (name, to_b) in enumerate(WEIGHT_SCALE_LAYOUTS):
        try:
            got = _matmul(xq, xs_col, q_weight, to_b(w_scale), torch.bfloat16, scaled_mm).float()
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
            notes.append(f"{name}: {str(e).splitlines()[0][:120]}")
            continue
        err = ((got - want).norm() / want.norm()).item()
        if err <= 1e-2:
            chosen = i
            break
        notes.append(f"{name}: relative error {err:.2e}")
    if scaled_mm is None:
        _checked[key] = chosen
        if chosen is None:
            logger.info("fp8: cuBLAS 1x128 block scaling unavailable on %s (%s); groups of 128 use the Triton "
                        "GEMM", device, "; ".join(notes))
        else:
            logger.info("fp8: prefill GEMMs with groups of 128 use cuBLAS block scaling (weight scales %s)",
                        WEIGHT_SCALE_LAYOUTS[chosen][0])
    return chosen


def takes(x: torch.Tensor, q_weight: torch.Tensor, bias: torch.Tensor | None, group_size: int | None,
          out_dtype: torch.dtype) -> bool:
    """Shape and dtype conditions of the cuBLAS path (the device check is :func:`pick_layout`): groups of 128,
    M >= :data:`MIN_M`, K a multiple of 128, N of 16, bf16 out, no bias (a bias added after cuBLAS's rounding
    would round twice; SALA's projections have none)."""
    M, K = x.shape
    return (group_size == GROUP and x.device.type == "cuda" and M >= MIN_M and K % GROUP == 0
            and q_weight.shape[0] % 16 == 0 and out_dtype == torch.bfloat16 and bias is None)


def blockwise_fp8_linear(xq: torch.Tensor, x_scale: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor,
                         out_dtype: torch.dtype, layout: int) -> torch.Tensor:
    """xq [M, K] fp8 with x_scale [M, K / 128] fp32 in column-major strides (``triton_quantize_groups(...,
    scales_column_major=True)``), q_weight [N, K] fp8, w_scale [N, K / 128] fp32 -> [M, N] ``out_dtype``;
    ``layout`` from :func:`pick_layout`."""
    return _matmul(xq, x_scale, q_weight, WEIGHT_SCALE_LAYOUTS[layout][1](w_scale), out_dtype)
