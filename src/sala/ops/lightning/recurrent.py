"""Triton Lightning decode step (spec §4.3, §6.1): one token per sequence, state updated in place.

    S = gamma * S + k^T v        o = scale * q S          (gamma = exp(-slope), S: [K, V] fp32)

The step is a pure stream over the state (read + write 2 x 4 x K x V bytes per head), so one program
owns a [K, BV] tile of one (sequence, head) and does the update and the q S reduction in registers.
CUDA-graph capturable: one launch, no host sync, the only allocation is the output; launch parameters
are cached per (device, shape). ``slopes`` must already be on the device for capture.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from sala.ops.common.fallback import log_fp64_fallback
from sala.ops.common.launch import num_sms

logger = logging.getLogger(__name__)


@triton.jit
def _lightning_step_kernel(
    q,  # [N, H, K] (strides sqn, sqh, 1)
    k,  # [N, H, K]
    v,  # [N, H, V]
    slopes,  # [H]
    state,  # [S, H, K, V] contiguous fp32, updated in place (S = N without rows)
    rows,  # [N] int: state row of each sequence (HAS_ROWS)
    o,  # [N, H, V] contiguous
    scale,
    H,
    sqn,
    sqh,
    skn,
    skh,
    svn,
    svh,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_sh = (tl.load(rows + i_n).to(tl.int64) * H + i_h) if HAS_ROWS else i_nh.to(tl.int64)
    acc_ty = state.dtype.element_ty  # fp32
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    b_q = tl.load(q + i_n * sqn + i_h * sqh + o_k, mask=m_k, other=0.0).to(acc_ty)
    b_k = tl.load(k + i_n * skn + i_h * skh + o_k, mask=m_k, other=0.0).to(acc_ty)
    b_v = tl.load(v + i_n * svn + i_h * svh + o_v, mask=m_v, other=0.0).to(acc_ty)
    gamma = tl.exp(-tl.load(slopes + i_h).to(acc_ty))  # spec §4.2: per-step decay
    p_s = state + i_sh * K * V + o_k[:, None] * V + o_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0.0)
    b_s = b_s * gamma + b_k[:, None] * b_v[None, :]
    tl.store(p_s, b_s, mask=m_s)
    b_o = tl.sum(b_s * b_q[:, None], axis=0) * scale  # [BV]; the current token is included
    tl.store(o + i_nh.to(tl.int64) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)


@functools.lru_cache(maxsize=256)
def _plan(sms: int, n: int, h: int, kd: int, vd: int) -> tuple[int, int, int, tuple[int, int]]:
    """(BK, BV, num_warps, grid): the widest V tile that still gives >= 2 programs per SM."""
    bk = triton.next_power_of_2(kd)
    bv = min(64, triton.next_power_of_2(vd))
    while bv > 16 and n * h * triton.cdiv(vd, bv) < 2 * sms:
        bv //= 2
    warps = 4 if bk * bv >= 4096 else 2
    return bk, bv, warps, (triton.cdiv(vd, bv), n * h)


def triton_lightning_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    state: torch.Tensor,
    output_dtype: torch.dtype,
    state_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step; same contract as ``sala.ops.lightning.lightning_step``.

    q, k: [N, H, K]; v: [N, H, V]; slopes: [H]; state: [N, H, K, V] (or [S, H, K, V] indexed by ``state_rows``
    [N]) fp32, contiguous, updated in place -> o: [N, H, V] in ``output_dtype``. An fp64 state (fp64 model) runs
    the PyTorch reference.
    """
    if state.dtype == torch.float64:
        log_fp64_fallback("lightning step", "Triton's exp is fp32-accurate only")
        from sala.ops.lightning.naive import naive_lightning_step_rows

        return naive_lightning_step_rows(q, k, v, slopes, scale, state, state_rows).to(output_dtype)
    if not state.is_contiguous():
        raise ValueError("lightning step updates the state in place, so it must be contiguous; got strides "
                         f"{tuple(state.stride())}; pass state.contiguous() and keep that tensor")  # fmt: skip
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if state_rows is not None:
        state_rows = state_rows.contiguous()  # the kernel reads rows[n] at unit stride
    if slopes.device != q.device:
        slopes = slopes.to(q.device)  # not capturable: keep slopes on the device for CUDA graphs
    N, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty(N, H, V, dtype=output_dtype, device=q.device)
    bk, bv, warps, grid = _plan(num_sms(q.device), N, H, K, V)
    _lightning_step_kernel[grid](
        q, k, v, slopes, state, state_rows if state_rows is not None else o, o, scale, H,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        K=K, V=V, BK=bk, BV=bv, HAS_ROWS=state_rows is not None, num_warps=warps,
    )  # fmt: skip
    return o
