"""Triton distillation KL: one program per logit row, two passes over the vocabulary.

Pass 1 keeps running maxima and sums of exponentials of both rows (online softmax) and the teacher-weighted sum
``A = sum_v exp(zt_v - m_t) * (zt_v - zs_v)``, rescaled whenever the teacher's maximum grows. With ``z = logits /
T``, ``lse = m + log(l)``: ``KL = A / l_t - lse_t + lse_s``. Pass 2 writes ``T * (p_s - p_t)`` over the student's
row. Everything in fp32; the exponentials use ``exp`` of non-positive arguments only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.utils.env import triton_interpret


@triton.jit(do_not_specialize=["V"])
def _kl_rows_kernel(s_ptr, t_ptr, loss_ptr, V, s_stride, t_stride, inv_t, t_sq, temp,
                    NEED_GRAD: tl.constexpr, BV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    cols = tl.arange(0, BV)
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    l_s = tl.zeros((), tl.float32)
    l_t = tl.zeros((), tl.float32)
    acc = tl.zeros((), tl.float32)
    for v0 in range(0, V, BV):
        c = v0 + cols
        ok = c < V
        zs = tl.load(s_row + c, mask=ok, other=0.0).to(tl.float32) * inv_t
        zt = tl.load(t_row + c, mask=ok, other=0.0).to(tl.float32) * inv_t
        ms_new = tl.maximum(m_s, tl.max(tl.where(ok, zs, -float("inf")), axis=0))
        l_s = l_s * tl.exp(m_s - ms_new) + tl.sum(tl.where(ok, tl.exp(zs - ms_new), 0.0), axis=0)
        m_s = ms_new
        mt_new = tl.maximum(m_t, tl.max(tl.where(ok, zt, -float("inf")), axis=0))
        alpha = tl.exp(m_t - mt_new)
        et = tl.where(ok, tl.exp(zt - mt_new), 0.0)
        l_t = l_t * alpha + tl.sum(et, axis=0)
        acc = acc * alpha + tl.sum(et * (zt - zs), axis=0)
        m_t = mt_new
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    tl.store(loss_ptr + row, (acc / l_t - lse_t + lse_s) * t_sq)
    if NEED_GRAD:
        for v0 in range(0, V, BV):
            c = v0 + cols
            ok = c < V
            zs = tl.load(s_row + c, mask=ok, other=0.0).to(tl.float32) * inv_t
            zt = tl.load(t_row + c, mask=ok, other=0.0).to(tl.float32) * inv_t
            g = (tl.exp(zs - lse_s) - tl.exp(zt - lse_t)) * temp
            tl.store(s_row + c, g, mask=ok)


def triton_kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                   need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """student_logits, teacher_logits: [c, V] fp32, last dim contiguous -> (sum of the rows' ``T^2 * KL`` [],
    the gradient written over ``student_logits`` or None). See :func:`sala.ops.kl.kl_rows`."""
    c, V = student_logits.shape
    losses = torch.empty(c, dtype=torch.float32, device=student_logits.device)
    bv = 64 if triton_interpret() else min(4096, triton.next_power_of_2(V))
    _kl_rows_kernel[(c,)](student_logits, teacher_logits, losses, V, student_logits.stride(0),
                          teacher_logits.stride(0), 1.0 / temperature, temperature**2, temperature,
                          NEED_GRAD=need_grad, BV=bv, num_warps=1 if triton_interpret() else 8)
    return losses.sum(), (student_logits if need_grad else None)
