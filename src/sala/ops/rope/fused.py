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


@triton.jit
def _norm_rope_heads(x_ptr, w_ptr, o_ptr, c_ptr, s_ptr, i_r, T, H, s_xb, s_xt, s_xh, s_cb, s_ct, eps,
                     D: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr, BHALF: tl.constexpr,
                     ROPE: tl.constexpr, RNE_X: tl.constexpr, RNE_O: tl.constexpr):
    """RMSNorm (then RoPE) of the H heads of token row i_r = b * T + t, stored to o [B, T, H, D] contiguous,
    rounded to the output dtype at the reference's points."""
    b = (i_r // T).to(tl.int64)
    t = (i_r % T).to(tl.int64)
    o_h = tl.arange(0, BH)
    o_d = tl.arange(0, BHALF)
    m_d = o_d < HALF
    m = (o_h < H)[:, None] & m_d[None, :]
    p_x = x_ptr + b * s_xb + t * s_xt + o_h[:, None] * s_xh + o_d[None, :]
    x1 = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p_x + HALF, mask=m, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
    x_ty = x_ptr.dtype.element_ty
    o_ty = o_ptr.dtype.element_ty
    h1 = x1 * inv
    h2 = x2 * inv
    if RNE_X:
        h1 = rne_bf16(h1)
        h2 = rne_bf16(h2)
    w1 = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + HALF + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    n1 = h1.to(x_ty).to(tl.float32) * w1  # the norm rounds to x's dtype before the weight, then to its output's
    n2 = h2.to(x_ty).to(tl.float32) * w2
    if RNE_O:
        n1 = rne_bf16(n1)
        n2 = rne_bf16(n2)
    n1 = n1.to(o_ty).to(tl.float32)
    n2 = n2.to(o_ty).to(tl.float32)
    if ROPE:
        cos = tl.load(c_ptr + b * s_cb + t * s_ct + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(s_ptr + b * s_cb + t * s_ct + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
        r1 = n1 * cos - n2 * sin
        r2 = n2 * cos + n1 * sin
        n1 = r1
        n2 = r2
        if RNE_O:
            n1 = rne_bf16(n1)
            n2 = rne_bf16(n2)
    p_o = o_ptr + (i_r.to(tl.int64) * H + o_h[:, None]) * D + o_d[None, :]
    tl.store(p_o, n1.to(o_ty), mask=m)
    tl.store(p_o + HALF, n2.to(o_ty), mask=m)


# q and k in one launch (axis 1 picks which). Compiled Triton wants a variable assigned in both branches of an
# ``if`` to have one type, and q's and k's tiles differ in height: so each branch is a single call, no assignments.
@triton.jit(do_not_specialize=["T"])
def _qk_norm_rope_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, oq_ptr, ok_ptr, c_ptr, s_ptr, T, HQ, HK,
                         s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_cb, s_ct, eps_q, eps_k,
                         D: tl.constexpr, HALF: tl.constexpr, BHQ: tl.constexpr, BHK: tl.constexpr,
                         BHALF: tl.constexpr, ROPE: tl.constexpr, RNE_X: tl.constexpr, RNE_O: tl.constexpr):
    if tl.program_id(1) == 0:
        _norm_rope_heads(q_ptr, wq_ptr, oq_ptr, c_ptr, s_ptr, tl.program_id(0), T, HQ, s_qb, s_qt, s_qh, s_cb, s_ct,
                         eps_q, D, HALF, BHQ, BHALF, ROPE, RNE_X, RNE_O)
    else:
        _norm_rope_heads(k_ptr, wk_ptr, ok_ptr, c_ptr, s_ptr, tl.program_id(0), T, HK, s_kb, s_kt, s_kh, s_cb, s_ct,
                         eps_k, D, HALF, BHK, BHALF, ROPE, RNE_X, RNE_O)


def triton_qk_norm_rope(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps_q: float,
                        eps_k: float, cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then RoPE when cos/sin are given, in one launch (no autograd; callers check
    shapes and dtypes). q: [B, T, H, D], k: [B, T, Hkv, D] with unit stride along D; wq, wk: [D] of one dtype;
    cos, sin: [B|1, T, 1, D] fp32 -> contiguous q', k' in promote(x, w) dtype."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    o_dtype = torch.promote_types(q.dtype, wq.dtype)
    oq = torch.empty((B, T, HQ, D), dtype=o_dtype, device=q.device)
    ok = torch.empty((B, T, HK, D), dtype=o_dtype, device=q.device)
    if B * T == 0:
        return oq, ok
    rope = cos is not None
    if rope:
        cos, sin = cos.expand(B, T, 1, D), sin.expand(B, T, 1, D)
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
    else:
        cos = sin = oq  # never read
    half = D // 2
    _qk_norm_rope_kernel[(B * T, 2)](
        q, k, wq, wk, oq, ok, cos, sin, T, HQ, HK, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), cos.stride(0) if rope else 0, cos.stride(1) if rope else 0, eps_q, eps_k,
        D=D, HALF=half, BHQ=triton.next_power_of_2(HQ), BHK=triton.next_power_of_2(HK),
        BHALF=triton.next_power_of_2(half), ROPE=rope, RNE_X=interp_rne(q.dtype), RNE_O=interp_rne(o_dtype),
        num_warps=4,
    )
    return oq, ok


def triton_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D] fp16/bf16/fp32; cos, sin: [B or 1, T, 1, D] fp32 (halves duplicated) -> rotated x."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, cos, sin)
    return _rotate(x, cos, sin, 1.0)
