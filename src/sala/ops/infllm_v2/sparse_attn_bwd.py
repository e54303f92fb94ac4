"""Triton backward of InfLLM-v2 block-sparse attention (spec §5.6), the training path's gradients.

Two kernels, no T x L tensor anywhere:

* ``_bwd_dq_kernel``, one program per (token, KV group) with the group's G heads as rows (like the forward's
  token kernel): pass 1 recomputes the row's log-sum-exp over its selected blocks (and stores it), pass 2
  accumulates ``dq = scale * sum_j ds_j k_j`` with ``ds = p * (dp - delta)``, ``dp = do . v``,
  ``delta = rowsum(do * o)``.
* ``_bwd_dkdv_kernel``: the keys' side runs over an *inverted* list. Every (KV group, block) pair gathers the
  tokens that selected it (a stable sort of the selections, built with PyTorch); the pair's token list is cut
  into work items of at most ``CHUNK`` tokens, so the sink and local blocks, which nearly every token selects,
  spread over many programs. A program keeps the block's K/V tile and accumulates
  ``dv = p^T do`` and ``dk = scale * ds^T q`` over its tokens (BT tokens x G heads per step), then adds them
  to fp32 dk/dv with atomics (one [block, D] add per item, not per token).

Statistics and accumulators are fp32; inputs may be fp16/bf16/fp32 (fp32 dots in IEEE precision, as the
forward). Gradients are returned in the input dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sala.ops.common.launch import interpreter_configs
from sala.ops.infllm_v2.topk import dot_precision, load_group_rows
from sala.utils.env import triton_interpret

_LOG2E = 1.4426950408889634


@triton.jit
def _load_kv(k_ptr, v_ptr, list_ptr, s0, K, L, i_h, s_kl, s_kh, s_vl, s_vh,
             BS: tl.constexpr, NBI: tl.constexpr, BD: tl.constexpr, D: tl.constexpr, CAST: tl.constexpr):
    """NBI selected blocks from list slot s0 on: (k [N, BD], v [N, BD], key positions [N], valid [N])."""
    o_n = tl.arange(0, NBI * BS)
    o_d = tl.arange(0, BD)
    slot = s0 + o_n // BS
    blk = tl.load(list_ptr + slot, mask=slot < K, other=-1)
    kpos = blk * BS + o_n % BS
    kval = (blk >= 0) & (kpos < L)
    kpos64 = kpos.to(tl.int64)
    m = kval[:, None] & (o_d < D)[None, :]
    b_k = tl.load(k_ptr + i_h * s_kh + kpos64[:, None] * s_kl + o_d[None, :], mask=m, other=0.0)
    b_v = tl.load(v_ptr + i_h * s_vh + kpos64[:, None] * s_vl + o_d[None, :], mask=m, other=0.0)
    if CAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    return b_k, b_v, kpos, kval


@triton.jit(do_not_specialize=["T", "L", "K"])
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, pos_ptr, list_ptr, delta_ptr, lse_ptr, dq_ptr, T, L, K,
    s_qt, s_qh, s_kl, s_kh, s_vl, s_vh, s_dt, s_dh, s_lh, s_lt, s_et, s_gt, s_gh, scale_log2, scale,
    G: tl.constexpr, MB: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, NBI: tl.constexpr,
    CAST: tl.constexpr, PREC: tl.constexpr,
):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    b_q, pos, m_r, head, tok = load_group_rows(q_ptr, pos_ptr, i_t, i_h, T, s_qt, s_qh, G, MB, 1, D, BD, CAST)
    b_do, _, _, _, _ = load_group_rows(do_ptr, pos_ptr, i_t, i_h, T, s_dt, s_dh, G, MB, 1, D, BD, CAST)
    lst = list_ptr + i_h * s_lh + i_t.to(tl.int64) * s_lt
    # pass 1: log-sum-exp of the row's scores over its selected keys (log2 domain)
    b_m = tl.full([MB], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([MB], dtype=tl.float32)
    for s0 in range(0, K, NBI):
        b_k, b_v, kpos, kval = _load_kv(k_ptr, v_ptr, lst, s0, K, L, i_h, s_kl, s_kh, s_vl, s_vh, BS, NBI, BD, D, CAST)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale_log2
        ok = kval[None, :] & (kpos[None, :] <= pos[:, None])
        b_s = tl.where(ok, b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_l = b_l * tl.exp2(b_m - m_safe) + tl.sum(tl.exp2(b_s - m_safe[:, None]), axis=1)
        b_m = m_new
    lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("inf"))  # +inf: p = 0 everywhere
    tok64 = tok.to(tl.int64)
    tl.store(lse_ptr + tok64 * s_et + head, lse, mask=m_r)
    delta = tl.load(delta_ptr + tok64 * s_et + head, mask=m_r, other=0.0)
    # pass 2: dq
    b_dq = tl.zeros([MB, BD], dtype=tl.float32)
    for s0 in range(0, K, NBI):
        b_k, b_v, kpos, kval = _load_kv(k_ptr, v_ptr, lst, s0, K, L, i_h, s_kl, s_kh, s_vl, s_vh, BS, NBI, BD, D, CAST)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale_log2
        ok = kval[None, :] & (kpos[None, :] <= pos[:, None])
        b_p = tl.where(ok, tl.exp2(b_s - lse[:, None]), 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    o_d = tl.arange(0, BD)
    p_dq = dq_ptr + tok64[:, None] * s_gt + head[:, None] * s_gh + o_d[None, :]
    tl.store(p_dq, (b_dq * scale).to(dq_ptr.dtype.element_ty), mask=m_r[:, None] & (o_d < D)[None, :])


@triton.jit(do_not_specialize=["T", "L", "n_items"])
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, pos_ptr, lse_ptr, delta_ptr, tok_ptr, item_ptr, dk_ptr, dv_ptr, T, L, n_items,
    s_qt, s_qh, s_kl, s_kh, s_vl, s_vh, s_dt, s_dh, s_et, s_gl, s_gh, scale_log2, scale,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr,
    CAST: tl.constexpr, PREC: tl.constexpr,
):
    i_w = tl.program_id(0)
    # work item: (KV group, block, first entry, entry count) into the inverted token list
    i_h = tl.load(item_ptr + i_w * 4)
    blk = tl.load(item_ptr + i_w * 4 + 1)
    e_lo = tl.load(item_ptr + i_w * 4 + 2)
    e_n = tl.load(item_ptr + i_w * 4 + 3)
    o_n = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    kpos = blk * BS + o_n
    kval = kpos < L
    kpos64 = kpos.to(tl.int64)
    m_kd = kval[:, None] & m_d[None, :]
    b_k = tl.load(k_ptr + i_h * s_kh + kpos64[:, None] * s_kl + o_d[None, :], mask=m_kd, other=0.0)
    b_v = tl.load(v_ptr + i_h * s_vh + kpos64[:, None] * s_vl + o_d[None, :], mask=m_kd, other=0.0)
    if CAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    b_dk = tl.zeros([BS, BD], dtype=tl.float32)
    b_dv = tl.zeros([BS, BD], dtype=tl.float32)
    o_r = tl.arange(0, BT * GP)
    g = o_r % GP
    for e0 in range(0, e_n, BT):
        e = e0 + o_r // GP
        m_e = (e < e_n) & (g < G)
        tok = tl.load(tok_ptr + e_lo + e, mask=m_e, other=0).to(tl.int64)
        head = i_h * G + g
        pos = tl.load(pos_ptr + tok, mask=m_e, other=-1)
        m_rd = m_e[:, None] & m_d[None, :]
        b_q = tl.load(q_ptr + tok[:, None] * s_qt + head[:, None] * s_qh + o_d[None, :], mask=m_rd, other=0.0)
        b_do = tl.load(do_ptr + tok[:, None] * s_dt + head[:, None] * s_dh + o_d[None, :], mask=m_rd, other=0.0)
        if CAST:
            b_q = b_q.to(tl.float32)
            b_do = b_do.to(tl.float32)
        lse = tl.load(lse_ptr + tok * s_et + head, mask=m_e, other=float("inf"))
        delta = tl.load(delta_ptr + tok * s_et + head, mask=m_e, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * scale_log2  # [R, BS]
        ok = m_e[:, None] & kval[None, :] & (kpos[None, :] <= pos[:, None])
        b_p = tl.where(ok, tl.exp2(b_s - lse[:, None]), 0.0)
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PREC)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - delta[:, None])
        b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=PREC)
    p_out = kpos64[:, None] * s_gl + i_h * s_gh + o_d[None, :]
    tl.atomic_add(dk_ptr + p_out, b_dk * scale, mask=m_kd)
    tl.atomic_add(dv_ptr + p_out, b_dv, mask=m_kd)


# GPU launch configuration, not yet timed on a GPU; chosen so that ptxas (triton 3.6, sm_90a) reports no spills
# at D=128 and 64: fp32 inputs need 16-row dk/dv tiles and one stage (64 rows spill ~30 KB per thread).
# The interpreter uses small tiles unless sala.ops.common.launch.gpu_launch_configs() asks for these.
GPU_CONFIG = dict(dq_keys=64, dq_warps=4, dkdv_rows=64, dkdv_stages=3, dkdv_rows_fp32=16, dkdv_stages_fp32=1,
                  dkdv_warps=8, chunk=256)
_INTERP_CONFIG = dict(dq_keys=16, dq_warps=4, dkdv_rows=16, dkdv_stages=1, dkdv_rows_fp32=16, dkdv_stages_fp32=1,
                      dkdv_warps=4, chunk=8)


def _cfg() -> dict:
    return _INTERP_CONFIG if interpreter_configs() else GPU_CONFIG


def _work_items(topk_idx: torch.Tensor, n_blk: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted selection lists -> (tokens [E] int32 grouped by (group, block), items [W, 4] int32 of
    (group, block, first entry, count <= chunk))."""
    Hkv, T, K = topk_idx.shape
    dev = topk_idx.device
    flat = topk_idx.reshape(Hkv, T * K).long()
    h = torch.arange(Hkv, device=dev).view(Hkv, 1).expand(Hkv, T * K)
    t = torch.arange(T, device=dev).view(1, T, 1).expand(Hkv, T, K).reshape(Hkv, T * K)
    valid = flat >= 0
    key = (h * n_blk + flat)[valid]
    toks = t[valid]
    order = torch.argsort(key, stable=True)  # tokens ascending inside each (group, block)
    tokens = toks[order].to(torch.int32)
    counts = torch.bincount(key, minlength=Hkv * n_blk)
    starts = torch.cumsum(counts, 0) - counts
    n_chunks = (counts + chunk - 1) // chunk
    pair = torch.repeat_interleave(torch.arange(Hkv * n_blk, device=dev), n_chunks)
    first_chunk = torch.cumsum(n_chunks, 0) - n_chunks
    c = torch.arange(pair.numel(), device=dev) - first_chunk[pair]
    lo = starts[pair] + c * chunk
    n = torch.minimum(counts[pair] - c * chunk, torch.full_like(lo, chunk))
    items = torch.stack([pair // n_blk, pair % n_blk, lo, n], dim=1).to(torch.int32).contiguous()
    return tokens, items


def triton_sparse_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    do: torch.Tensor,
    topk_idx: torch.Tensor,
    q_pos: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``o = block_sparse_attention(q, k, v, topk_idx, q_pos)`` (see the module docstring).

    q, o, do: [T, H, D]; k, v: [L, Hkv, D]; topk_idx: [Hkv, T, K] int32 (unique per row, -1 unused);
    q_pos: [T] -> (dq [T, H, D], dk, dv [L, Hkv, D]) in the input dtypes.
    """
    T, H, D = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    G = H // Hkv
    K = topk_idx.shape[-1]
    cfg = _cfg()
    q, k, v, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, do))
    topk_idx = topk_idx.to(torch.int32).contiguous()
    wide = 2 if q.dtype == torch.float32 else 1
    common = dict(D=D, BD=triton.next_power_of_2(D), BS=block_size, CAST=triton_interpret(),
                  PREC=dot_precision(q.dtype))
    scale_log2 = scale * _LOG2E
    delta = (do.float() * o.float()).sum(-1)  # [T, H]
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    dk = torch.zeros(L, Hkv, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if T == 0 or K == 0:
        return dq.zero_(), dk.to(k.dtype), dv.to(v.dtype)
    _bwd_dq_kernel[(T, Hkv)](
        q, k, v, do, q_pos, topk_idx, delta, lse, dq, T, L, K,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        topk_idx.stride(0), topk_idx.stride(1), lse.stride(0), dq.stride(0), dq.stride(1), scale_log2, scale,
        G=G, MB=max(16, triton.next_power_of_2(G)), NBI=max(1, cfg["dq_keys"] // wide // block_size),
        num_warps=cfg["dq_warps"], **common,
    )
    tokens, items = _work_items(topk_idx, triton.cdiv(L, block_size), cfg["chunk"])
    if items.shape[0]:
        GP = triton.next_power_of_2(G)
        fp32 = "_fp32" if q.dtype == torch.float32 else ""
        _bwd_dkdv_kernel[(items.shape[0],)](
            q, k, v, do, q_pos, lse, delta, tokens, items, dk, dv, T, L, items.shape[0],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            lse.stride(0), dk.stride(0), dk.stride(1), scale_log2, scale,
            G=G, GP=GP, BT=max(1, cfg["dkdv_rows" + fp32] // GP), num_warps=cfg["dkdv_warps"],
            num_stages=cfg["dkdv_stages" + fp32], **common,
        )
    return dq, dk.to(k.dtype), dv.to(v.dtype)
