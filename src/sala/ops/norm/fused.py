"""Triton RMSNorm: one pass, one kernel, the reference's rounding (spec §3).

The model runs five RMSNorms per layer (input, q, k, Lightning output, post-attention); as PyTorch ops each is
about eight kernels and as many passes over the activations (a cast to fp32, square, mean, rsqrt, scale, cast
back, weight). Here each is one read and one write. Statistics in fp32; the normalised value is rounded to x's
dtype before the weight multiply, as the reference does. Differentiable: the backward recomputes the
reference formula under autograd (exact gradients, no saved intermediates beyond x).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.common.triton_utils import interp_rne, rne_bf16
from sala.ops.norm.naive import naive_rms_norm
from sala.utils.env import triton_interpret


@triton.jit(do_not_specialize=["R"])
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, R, D, s_xr, s_or, eps,
                     BR: tl.constexpr, BD: tl.constexpr, RNE_X: tl.constexpr, RNE_O: tl.constexpr):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    rows = o_r.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * s_xr + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    h = x * inv[:, None]
    if RNE_X:  # interpreter: round to bf16 like the GPU cast does
        h = rne_bf16(h)
    h = h.to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds to x's dtype before the weight
    w = tl.load(w_ptr + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    out = h * w[None, :]
    if RNE_O:
        out = rne_bf16(out)
    tl.store(o_ptr + rows[:, None] * s_or + o_d[None, :], out.to(o_ptr.dtype.element_ty), mask=m)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    R = x2.shape[0]
    if R == 0:
        return out.view(x.shape)
    BD = triton.next_power_of_2(D)
    BR = max(1, min(64, 4096 // BD)) if not triton_interpret() else max(1, min(16, 1024 // BD))
    _rms_norm_kernel[(triton.cdiv(R, BR),)](
        x2, weight, out, R, D, x2.stride(0), out.stride(0), eps,
        BR=BR, BD=BD, RNE_X=interp_rne(x.dtype), RNE_O=interp_rne(out.dtype),
        num_warps=min(32, max(4, BR * BD // 1024)),  # ptxas: no spills up to D = 32K (sm_90a, triton 3.6)
    )
    return out.view(x.shape)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _forward(x, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            xx, ww = x.detach().requires_grad_(ctx.needs_input_grad[0]), weight.detach().requires_grad_(ctx.needs_input_grad[1])
            out = naive_rms_norm(xx, ww, ctx.eps)
            inputs = [t for t, need in ((xx, ctx.needs_input_grad[0]), (ww, ctx.needs_input_grad[1])) if need]
            grads = iter(torch.autograd.grad(out, inputs, grad))
        return (next(grads) if ctx.needs_input_grad[0] else None, next(grads) if ctx.needs_input_grad[1] else None, None)


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (see the module docstring). x: [..., D] fp16/bf16/fp32; weight: [D]."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _forward(x, weight, eps)
