"""One Triton kernel for each piece of elementwise glue the model runs per layer (SwiGLU product, sigmoid
output gate, scaled residual add), each with the reference's rounding points: every intermediate PyTorch
would round to the tensor dtype is rounded here too, ``exp`` is libdevice's ``expf`` and divisions are IEEE,
and FMA contraction is off, so results match the reference up to ``expf``'s own ulp-level differences. Saves a launch per op at decode and a full read/write of the activations per op at prefill.
Differentiable: the backward recomputes the reference formula under autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from sala.ops.common.triton_utils import interp_rne, rne_bf16
from sala.ops.elementwise.naive import naive_scaled_residual, naive_sigmoid_gate, naive_silu_mul
from sala.utils.env import triton_interpret

SILU_MUL, SIGMOID_GATE, SCALED_RESIDUAL = 0, 1, 2
_NAIVE = {SILU_MUL: naive_silu_mul, SIGMOID_GATE: naive_sigmoid_gate, SCALED_RESIDUAL: naive_scaled_residual}


@triton.jit
def _round(x, dtype: tl.constexpr, RNE: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` and back (what storing an intermediate tensor in that dtype does)."""
    if RNE:
        x = rne_bf16(x)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _exp(x, ACCURATE: tl.constexpr):
    """expf as torch computes it (libdevice ``__nv_expf``) on the GPU; ``tl.exp`` (ex2.approx) in the interpreter."""
    if ACCURATE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def glue_value(a, b, alpha, OP: tl.constexpr, dt: tl.constexpr, RNE: tl.constexpr, ACCURATE: tl.constexpr):
    """``OP`` on fp32 tiles a, b loaded from ``dt`` tensors -> the result as the reference stores it (rounded to
    ``dt``), kept in fp32. Launch without FP fusion (``enable_fp_fusion=False``): ``a + b * alpha`` must round the
    product first, like the reference's two ops. Shared with the fp8 quantiser, which quantises this value."""
    if OP == 0:  # silu(a) * b
        out = _round(tl.div_rn(a, 1.0 + _exp(-a, ACCURATE)), dt, RNE) * b
    elif OP == 1:  # a * sigmoid(b)
        out = a * _round(tl.div_rn(1.0, 1.0 + _exp(-b, ACCURATE)), dt, RNE)
    else:  # a + b * alpha
        out = a + _round(b * alpha, dt, RNE)
    return _round(out, dt, RNE)


# Rows of C elements with their own row strides (the inputs may be column slices of one fused GEMM's output);
# C and the strides are specialised on purpose (multiples of 16 let the loads vectorise; the model's sizes are)
@triton.jit(do_not_specialize=["R"])
def _glue_kernel(a_ptr, b_ptr, o_ptr, R, C, s_a, s_b, alpha, OP: tl.constexpr, BLOCK: tl.constexpr,
                 RNE: tl.constexpr, ACCURATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows on axis 0: axis 1 allows only 65,535 programs
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    a = tl.load(a_ptr + row * s_a + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * s_b + cols, mask=m, other=0.0).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    tl.store(o_ptr + row * C + cols, glue_value(a, b, alpha, OP, dt, RNE, ACCURATE).to(dt), mask=m)


def as_rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` [..., C] as a [R, C] view with unit column stride (None if its layout has no such view)."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _launch(op: int, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    a2, b2 = as_rows(a), as_rows(b)
    R, C = a2.shape
    if R and C:
        BLOCK = min(1024 if triton_interpret() else 2048, triton.next_power_of_2(C))
        # no FMA contraction: a + b * alpha must round the product first, like the reference's two ops
        _glue_kernel[(R, triton.cdiv(C, BLOCK))](a2, b2, out, R, C, a2.stride(0), b2.stride(0), float(alpha), OP=op,
                                                BLOCK=BLOCK, RNE=interp_rne(a.dtype), ACCURATE=not triton_interpret(),
                                                num_warps=8 if BLOCK >= 2048 else 4, enable_fp_fusion=False)
    return out


class _Glue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, alpha, a, b):
        ctx.save_for_backward(a, b)
        ctx.op, ctx.alpha = op, alpha
        return _launch(op, a, b, alpha)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        need = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            aa, bb = a.detach().requires_grad_(need[0]), b.detach().requires_grad_(need[1])
            out = _NAIVE[ctx.op](aa, bb, ctx.alpha)
            wanted = [t for t, nd in ((aa, need[0]), (bb, need[1])) if nd]
            got = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return None, None, next(got) if need[0] else None, next(got) if need[1] else None


def triton_glue(op: int, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``op`` on same-shape, same-dtype tensors with a row view (``as_rows``; callers check), result contiguous
    in their dtype."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _Glue.apply(op, alpha, a, b)
    return _launch(op, a, b, alpha)
