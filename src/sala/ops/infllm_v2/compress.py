"""Triton key compression for InfLLM-v2 (spec §5.3): mean of each complete window of the K cache.

Same contract as :func:`sala.ops.infllm_v2.naive.naive_compress_keys`: the sum runs in fp32, is divided by the
window size, then rounded once to k's dtype (what torch's CPU mean does for bf16/fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.common.launch import interpreter_configs
from sala.ops.infllm_v2.naive import num_windows
from sala.ops.infllm_v2.topk import interp_rne, rne_bf16


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
    BW = 16 if interpreter_configs() else max(1, min(64, 8192 // BD))
    grid = (triton.cdiv(n_out, BW), Hkv)
    _compress_kernel[grid](
        k, out, n_out, start, k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        D=D, BD=BD, KS=kernel_size, ST=kernel_stride, BW=BW, RNE=interp_rne(k.dtype), num_warps=4,
    )
    return out


@triton.jit
def _window_mean(base, end, s_kl, o_d, m_d, KS: tl.constexpr):
    """Mean of the KS keys ending at position ``end`` (exclusive), summed in order like ``_compress_kernel``."""
    b_acc = tl.zeros(o_d.shape, dtype=tl.float32)
    for j in tl.static_range(KS):  # unrolled: every load in flight at once, additions still in order
        b_acc += tl.load(base + (end - KS + j).to(tl.int64) * s_kl + o_d, mask=m_d, other=0.0).to(tl.float32)
    return b_acc / KS


@triton.jit
def _append_windows_kernel(
    k_ptr, c1_ptr, c2_ptr, slot_ptr, pos_ptr, n1, n2,
    s_ks, s_kl, s_kh, s_1s, s_1n, s_1h, s_2s, s_2n, s_2h,
    D: tl.constexpr, BD: tl.constexpr, KS1: tl.constexpr, ST1: tl.constexpr, KS2: tl.constexpr, ST2: tl.constexpr,
    RNE: tl.constexpr,
):
    i_r, i_h = tl.program_id(0), tl.program_id(1)
    i_slot = tl.load(slot_ptr + i_r).to(tl.int64)
    length = tl.load(pos_ptr + i_r).to(tl.int32) + 1
    base = k_ptr + i_slot * s_ks + i_h * s_kh
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    w1 = (length - KS1) // ST1
    if (length >= KS1) & ((length - KS1) % ST1 == 0) & (w1 < n1):  # the token completed a fine window
        b_o = _window_mean(base, length, s_kl, o_d, m_d, KS1)
        if RNE:
            b_o = rne_bf16(b_o)
        tl.store(c1_ptr + i_slot * s_1s + w1.to(tl.int64) * s_1n + i_h * s_1h + o_d, b_o.to(c1_ptr.dtype.element_ty), mask=m_d)
    w2 = (length - KS2) // ST2
    if (length >= KS2) & ((length - KS2) % ST2 == 0) & (w2 < n2):  # ... and a coarse one
        b_o = _window_mean(base, length, s_kl, o_d, m_d, KS2)
        if RNE:
            b_o = rne_bf16(b_o)
        tl.store(c2_ptr + i_slot * s_2s + w2.to(tl.int64) * s_2n + i_h * s_2h + o_d, b_o.to(c2_ptr.dtype.element_ty), mask=m_d)


def triton_append_compressed_keys(
    keys: torch.Tensor, ck1: torch.Tensor, ck2: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor,
    kernel_size: int, kernel_stride: int,
) -> None:
    """After a decode token was written at ``keys[slot[t], pos[t]]``: store the fine / coarse window it
    completed, if any, into ck1 / ck2 (in place; graph-safe, no host sync).

    keys: [S, C, Hkv, D]; ck1: [S, n1, Hkv, D]; ck2: [S, n2, Hkv, D]; slot, pos: [N]. Windows as
    :func:`triton_compress_keys` (coarse tier: 4x window and stride), bit-identical to it.
    """
    N = slot.shape[0]
    S, C, Hkv, D = keys.shape
    if N == 0:
        return
    if keys.stride(-1) != 1 or ck1.stride(-1) != 1 or ck2.stride(-1) != 1:
        raise ValueError("append_compressed_keys needs caches contiguous in the head dim")
    _append_windows_kernel[(N, Hkv)](
        keys, ck1, ck2, slot, pos, ck1.shape[1], ck2.shape[1],
        keys.stride(0), keys.stride(1), keys.stride(2), *ck1.stride()[:3], *ck2.stride()[:3],
        D=D, BD=triton.next_power_of_2(D), KS1=kernel_size, ST1=kernel_stride, KS2=4 * kernel_size,
        ST2=4 * kernel_stride, RNE=interp_rne(keys.dtype), num_warps=1,
    )
