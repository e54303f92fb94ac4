"""Triton FP8 GEMM with group-wise scales: ``out = sum_g (Aq_g @ Bq_g^T) * a_scale[:, g] * b_scale[:, g]``.

A [M, K] float8_e4m3fn (activations, one scale per token and group of ``GROUP`` columns), B [N, K] float8_e4m3fn
(weight, one scale per output channel and group). Each K step (a group, or 128 columns of a larger one): the fp8
``tl.dot`` accumulates its products in fp32, its group's two scales multiply that partial sum, and the running sum
stays fp32. This is DeepSeek-V3's fine-grained FP8 (promote out of the tensor cores, whose fp8 accumulation keeps
fewer bits, every <= 128 columns) with 1 x GROUP weight groups instead of 128 x 128 blocks. A ragged last group is
masked. No autotuning: the launch plan depends on M only, so the first call compiles one kernel and times nothing
(a server's first request pays no tuning).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.common.triton_utils import interp_rne, rne_bf16
from sala.utils.env import triton_interpret


@triton.jit(do_not_specialize=["M"])
def _fp8_group_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, NK,
                           s_am, s_asm, s_bn, s_bsn, s_cm,
                           GROUP: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           HAS_BIAS: tl.constexpr, RNE_O: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # One loop over K steps of BK = min(GROUP, 128); each step's fp32 partial product takes its group's two scales
    # (a group past 128 spans several steps; scaling distributes over their sum). A static inner loop over a large
    # group's steps made the pipeliner keep every step's tiles live: 384 KB of shared memory for GROUP=512.
    for kk in range(0, NK):
        k = kk * BK + rk
        k_ok = k < K
        a = tl.load(a_ptr + rm[:, None] * s_am + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * s_bn + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        g = (kk * BK) // GROUP
        sa = tl.load(as_ptr + rm * s_asm + g, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptr + rn * s_bsn + g, mask=n_ok, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RNE_O:
        acc = rne_bf16(acc)
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def launch_plan(m: int) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) for M rows: decode-sized M reads each weight tile once per 16 rows; prefill
    takes 128 x 128 tiles. The interpreter takes small tiles (it runs every program in Python)."""
    if triton_interpret():
        return 16, 32, 1, 1
    if m <= 16:
        return 16, 64, 4, 4
    if m <= 64:
        return 64, 128, 4, 3
    return 128, 128, 8, 3


def triton_fp8_group_gemm(xq: torch.Tensor, x_scale: torch.Tensor, q_weight: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None, out_dtype: torch.dtype, group_size: int) -> torch.Tensor:
    """xq [M, K] fp8, x_scale [M, G] fp32, q_weight [N, K] fp8, w_scale [N, G] fp32, bias [N] | None
    -> [M, N] in ``out_dtype``; G = ceil(K / group_size), group_size a power of two >= 16."""
    M, K = xq.shape
    N = q_weight.shape[0]
    groups = x_scale.shape[1]
    xq, q_weight = xq.contiguous(), q_weight.contiguous()
    x_scale, w_scale = x_scale.contiguous(), w_scale.contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0:
        return out
    bm, bn, warps, stages = launch_plan(M)
    bk = min(group_size, 128)
    if groups != triton.cdiv(K, group_size):
        raise ValueError(f"x_scale has {groups} groups per row; K={K} in groups of {group_size} needs "
                         f"{triton.cdiv(K, group_size)}")
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _fp8_group_gemm_kernel[grid](
        xq, x_scale, q_weight, w_scale, bias if bias is not None else w_scale, out, M, N, K, triton.cdiv(K, bk),
        xq.stride(0), x_scale.stride(0), q_weight.stride(0), w_scale.stride(0), out.stride(0),
        GROUP=group_size, BK=bk, BM=bm, BN=bn, HAS_BIAS=bias is not None, RNE_O=interp_rne(out_dtype),
        num_warps=warps, num_stages=stages)
    return out
