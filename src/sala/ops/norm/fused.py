"""Triton RMSNorm: one pass, one kernel, the reference's rounding (spec §3).

The model runs five RMSNorms per layer (input, q, k, Lightning output, post-attention); as PyTorch ops each is
about eight kernels and as many passes over the activations (a cast to fp32, square, mean, rsqrt, scale, cast
back, weight). Here each is one read and one write. Statistics in fp32; the normalised value is rounded to x's
dtype before the weight multiply, as the reference does. Differentiable: the backward is one kernel too (dx and
per-program partial dw from the saved x; the reference formula's exact gradients, casts taken as identities).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.common.triton_utils import interp_rne, rne_bf16
from sala.utils.env import triton_interpret


# x is read as [R / I, I, D] with strides (s_xo, s_xi, 1): heads of a q/k slice of a fused projection
# output are normed in place of a copy (I = 1 for plain rows)
# With HAS_RES, x = h + y * alpha first (the scaled residual add, rounded like the reference's two ops; the
# launch turns FMA contraction off) and that sum is also stored to ``r_ptr``: the post-attention add and norm
# of a decoder layer in one pass.
@triton.jit(do_not_specialize=["R"])
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, y_ptr, r_ptr, R, D, I, s_xo, s_xi, s_or, eps, alpha,
                     BR: tl.constexpr, BD: tl.constexpr, RNE_X: tl.constexpr, RNE_O: tl.constexpr,
                     HAS_RES: tl.constexpr):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    rows = o_r.to(tl.int64)
    x_off = (rows // I) * s_xo + (rows % I) * s_xi
    x = tl.load(x_ptr + x_off[:, None] + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_RES:  # x, y, r: contiguous [R, D] rows
        y = tl.load(y_ptr + rows[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        y = y * alpha
        if RNE_X:
            y = rne_bf16(y)
        x = x + y.to(x_ptr.dtype.element_ty).to(tl.float32)
        if RNE_X:
            x = rne_bf16(x)
        x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(r_ptr + rows[:, None] * D + o_d[None, :], x.to(r_ptr.dtype.element_ty), mask=m)
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


def _as_outer_inner(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as a [O, I, D] view with unit stride along D (a contiguous copy if it has none)."""
    x3 = x.reshape(1, 1, -1) if x.dim() == 1 else (x[:, None] if x.dim() == 2 else None)
    if x3 is None:
        try:
            x3 = x.view(-1, *x.shape[-2:])  # leading dims collapse for slices of the last dim
        except RuntimeError:
            x3 = None
    if x3 is None or x3.stride(-1) != 1:
        x3 = x.contiguous().view(-1, *x.shape[-2:]) if x.dim() > 2 else x.contiguous().reshape(-1, 1, x.shape[-1])
    return x3


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, y: torch.Tensor | None = None, alpha: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (norm output, the residual sum h + y * alpha when ``y`` is given; x and y then contiguous)."""
    D = x.shape[-1]
    out = torch.empty((x.numel() // D if D else 0, D), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res = torch.empty(x.shape, dtype=x.dtype, device=x.device) if y is not None else None
    R = out.shape[0]
    if x.numel() == 0:
        return out.view(x.shape), res
    x3 = _as_outer_inner(x) if y is None else x.view(-1, 1, D)
    BD = triton.next_power_of_2(D)
    BR = max(1, min(64, 4096 // BD)) if not triton_interpret() else max(1, min(16, 1024 // BD))
    _rms_norm_kernel[(triton.cdiv(R, BR),)](
        x3, weight, out, y if y is not None else x3, res if res is not None else out, R, D, x3.shape[1],
        x3.stride(0), x3.stride(1), out.stride(0), eps, float(alpha),
        BR=BR, BD=BD, RNE_X=interp_rne(x.dtype), RNE_O=interp_rne(out.dtype), HAS_RES=y is not None,
        num_warps=min(32, max(4, BR * BD // 1024)),  # ptxas: no spills up to D = 32K (sm_90a, triton 3.6)
        enable_fp_fusion=y is None,  # h + y * alpha rounds the product first, like the reference's two ops
    )
    return out.view(x.shape), res


# Backward of the plain norm (no residual), per row with h = x * inv, inv = rsqrt(mean(x^2) + eps):
#   dx = inv * (dh - h * mean(dh * h)),  dh = dy * w;   dw = sum over rows of dy * round_x(h)
# The casts of the forward are identities for the gradient (as autograd treats them), so the statistics are fp32
# throughout. Each program writes its rows' partial dw; the host sums the [programs, D] partials.
@triton.jit(do_not_specialize=["R"])
def _rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_ptr, R, D, I, s_xo, s_xi, eps,
                         BR: tl.constexpr, BD: tl.constexpr, HAS_DW: tl.constexpr):
    pid = tl.program_id(0)
    o_r = pid * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    rows = o_r.to(tl.int64)
    x_off = (rows // I) * s_xo + (rows % I) * s_xi
    x = tl.load(x_ptr + x_off[:, None] + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    h = x * inv[:, None]
    dh = dy * w[None, :]
    c = tl.sum(dh * h, axis=1) / D
    dx = inv[:, None] * (dh - h * c[:, None])
    tl.store(dx_ptr + rows[:, None] * D + o_d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
    if HAS_DW:
        hr = h.to(x_ptr.dtype.element_ty).to(tl.float32)  # the forward rounds h to x's dtype before the weight
        tl.store(dw_ptr + pid * D + o_d, tl.sum(dy * hr, axis=0), mask=o_d < D)


def _backward(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, eps: float, need_dx: bool, need_dw: bool
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """x: [..., D]; weight: [D]; dy: like the forward's output -> (dx like x, dw like weight), each None if unneeded."""
    D = x.shape[-1]
    R = x.numel() // D if D else 0
    if R == 0:
        return (torch.zeros_like(x) if need_dx else None), (torch.zeros_like(weight) if need_dw else None)
    x3 = _as_outer_inner(x)
    dy2 = dy.reshape(R, D).contiguous()
    dx = torch.empty(R, D, dtype=x.dtype, device=x.device)
    BD = triton.next_power_of_2(D)
    BR = max(1, min(16, 4096 // BD)) if not triton_interpret() else max(1, min(16, 1024 // BD))
    programs = triton.cdiv(R, BR)
    partial = torch.empty(programs if need_dw else 1, D, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        x3, weight, dy2, dx, partial, R, D, x3.shape[1], x3.stride(0), x3.stride(1), eps,
        BR=BR, BD=BD, HAS_DW=need_dw, num_warps=min(32, max(4, BR * BD // 1024)),
    )
    dw = partial.sum(0).to(weight.dtype) if need_dw else None
    return (dx.view(x.shape) if need_dx else None), dw


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _forward(x, weight, eps)[0]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = _backward(x, weight, grad, ctx.eps, need_dx, need_dw)
        return dx, dw, None


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (see the module docstring). x: [..., D] fp16/bf16/fp32; weight: [D]."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return _forward(x, weight, eps)[0]


def triton_residual_rms_norm(h: torch.Tensor, y: torch.Tensor, alpha: float, weight: torch.Tensor, eps: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + y * alpha, RMSNorm of it) in one pass; h, y: contiguous [..., D] of one dtype (callers check);
    no autograd (callers take the two-op path when gradients are needed)."""
    normed, res = _forward(h, weight, eps, y, alpha)
    return res, normed
