"""Triton RoPE: one kernel per tensor instead of a cast, a chunk, a negation, a concatenation, two multiplies,
an add and a cast back. fp32 math like the reference (the rounding of the two products before the add may
differ by fp32 contraction, far below the output dtype's resolution). Differentiable: rotation by -angle
(the same kernel with -sin) is the exact backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.common.triton_utils import interp_rne, rne_bf16
from sala.utils.env import triton_interpret


@triton.jit(do_not_specialize=["T"])
def _rope_kernel(x_ptr, c_ptr, s_ptr, o_ptr, T, H, s_xb, s_xt, s_xh, s_cb, s_ct, s_ob, s_ot, s_oh, sign,
                 HALF: tl.constexpr, BH: tl.constexpr, BHALF: tl.constexpr, RNE: tl.constexpr):
    i_r, i_hb = tl.program_id(0), tl.program_id(1)
    b = (i_r // T).to(tl.int64)
    t = (i_r % T).to(tl.int64)
    o_h = i_hb * BH + tl.arange(0, BH)
    o_d = tl.arange(0, BHALF)
    m_d = o_d < HALF
    m = (o_h < H)[:, None] & m_d[None, :]
    cos = tl.load(c_ptr + b * s_cb + t * s_ct + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    sin = sign * tl.load(s_ptr + b * s_cb + t * s_ct + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    p_x = x_ptr + b * s_xb + t * s_xt + o_h[:, None] * s_xh + o_d[None, :]
    x1 = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p_x + HALF, mask=m, other=0.0).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if RNE:
        o1 = rne_bf16(o1)
        o2 = rne_bf16(o2)
    p_o = o_ptr + b * s_ob + t * s_ot + o_h[:, None] * s_oh + o_d[None, :]
    tl.store(p_o, o1.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(p_o + HALF, o2.to(o_ptr.dtype.element_ty), mask=m)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(B, T, 1, D), sin.expand(B, T, 1, D)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = D // 2
    BHALF = triton.next_power_of_2(half)
    BH = max(1, min(triton.next_power_of_2(H), (16 if triton_interpret() else 4096) // BHALF))
    _rope_kernel[(B * T, triton.cdiv(H, BH))](
        x, cos, sin, out, T, H, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        out.stride(0), out.stride(1), out.stride(2), sign,
        HALF=half, BH=BH, BHALF=BHALF, RNE=interp_rne(x.dtype), num_warps=4,
    )
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def triton_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D] fp16/bf16/fp32; cos, sin: [B or 1, T, 1, D] fp32 (halves duplicated) -> rotated x."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, cos, sin)
    return _rotate(x, cos, sin, 1.0)
