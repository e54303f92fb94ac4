"""Triton key compression for InfLLM-v2 (spec §5.3): mean of each complete window of the K cache.

Same contract as :func:`sala.ops.infllm_v2.naive.naive_compress_keys`: the sum runs in fp32, is divided by the
window size, then rounded once to k's dtype (what torch's CPU mean does for bf16/fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.infllm_v2.naive import num_windows
from sala.ops.infllm_v2.topk import interp_rne, rne_bf16
from sala.utils.env import triton_interpret


# lengths change every decode step: no per-value specialisation, so no recompiles mid-decode
@triton.jit(do_not_specialize=["n_out", "start"])
def _compress_kernel(
    k_ptr,
    o_ptr,
    n_out,
    start,
    s_kl,
    s_kh,
    s_ol,
    s_oh,
    D: tl.constexpr,
    BD: tl.constexpr,
    KS: tl.constexpr,
    ST: tl.constexpr,
    BW: tl.constexpr,
    RNE: tl.constexpr,
):
    i_w, i_h = tl.program_id(0), tl.program_id(1)
    o_w = i_w * BW + tl.arange(0, BW)  # output row = window (start + o_w)
    o_d = tl.arange(0, BD)
    m_w = o_w < n_out
    m_wd = m_w[:, None] & (o_d[None, :] < D)
    tok0 = (start + o_w).to(tl.int64) * ST  # first token of each window
    p_k = k_ptr + i_h * s_kh + tok0[:, None] * s_kl + o_d[None, :]
    b_acc = tl.zeros([BW, BD], dtype=tl.float32)
    for j in range(KS):
        b_acc += tl.load(p_k + j * s_kl, mask=m_wd, other=0.0).to(tl.float32)
    b_o = b_acc / KS  # divide (not multiply by 1/KS) like torch's mean
    if RNE:  # the CPU interpreter's bf16 cast truncates; round to nearest even like the GPU
        b_o = rne_bf16(b_o)
    p_o = o_ptr + i_h * s_oh + o_w.to(tl.int64)[:, None] * s_ol + o_d[None, :]
    tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_wd)


def triton_compress_keys(k: torch.Tensor, kernel_size: int, kernel_stride: int, start: int = 0) -> torch.Tensor:
    """Mean of each complete window ``k[st*i : st*i + ks]`` for i >= ``start``, in k's dtype.

    k: [L, Hkv, D] -> [n - start, Hkv, D] with n = num_windows(L, ks, st).
    """
    L, Hkv, D = k.shape
    n = num_windows(L, kernel_size, kernel_stride)
    n_out = max(0, n - start)
    out = k.new_empty(n_out, Hkv, D)
    if n_out == 0 or Hkv == 0 or D == 0:
        return out
    if k.stride(-1) != 1:
        k = k.contiguous()
    BD = triton.next_power_of_2(D)
    BW = 16 if triton_interpret() else max(1, min(64, 8192 // BD))
    grid = (triton.cdiv(n_out, BW), Hkv)
    _compress_kernel[grid](
        k, out, n_out, start, k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        D=D, BD=BD, KS=kernel_size, ST=kernel_stride, BW=BW, RNE=interp_rne(k.dtype), num_warps=4,
    )
    return out
