"""Triton block-sparse attention for InfLLM-v2 stage 2 (spec §5.6).

Each query token t of KV group g attends to the tokens of its own selected blocks ``topk_idx[g, t]`` with
the token-level causal mask (key position <= q_pos[t]); the G query heads of a group share the list, so
they are folded into the rows of one tile and share every K/V block load. A flash-attention forward with an
online softmax (log2 domain, fp32 statistics and accumulator) runs over the selected blocks.

Two strategies, picked by the number of queries:

* **Prefill** (tile + token). Neighbouring tokens share many of their blocks (always the sink and the local
  window). ``_split_lists_kernel`` splits each tile of BT tokens' lists into the blocks chosen by at least
  ``share_min`` of its tokens (the tile list, each block once with the bit mask of the tokens that chose it)
  and the rest (``private``, per token). ``_sparse_tile_kernel`` attends the tile list with BT x G rows (a
  128-row MMA on GPU, K/V loaded once for BT tokens; rows of tokens that did not choose a block are masked);
  ``_sparse_token_kernel`` attends each token's private blocks with G rows and merges both softmax states.
  A 128-row step costs about 3.6 16-row steps on an H200, so a block pays off in the tile from 4 choosers
  (``share_min`` 4: 10% faster than tiling only the blocks all 8 tokens chose, on block-clustered queries).
* **Decode / short chunks** (flash-decoding). ``_sparse_token_kernel`` alone, its list split over S programs
  writing (o, lse) partials that ``_merge_partials_kernel`` combines. ``triton_sparse_decode_batch`` is the
  same with one cache slot per row (graph-safe batched decode).

Backward (``SALA_SPARSE_BACKWARD``): the Triton kernels of ``sparse_attn_bwd`` (dq per token; dk/dv over
inverted selection lists), by default on CUDA and wherever ``SALA_SPARSE_BACKWARD=triton`` (block_size >= 16);
otherwise a recompute-based PyTorch backward over the selected blocks, in query chunks
(``_sparse_backward_torch``; exact softmax gradients in fp32, memory bounded per chunk): by default off CUDA
(the CPU interpreter), for blocks under 16 keys, and with ``SALA_SPARSE_BACKWARD=torch``.

Contract: block indices in a row must be unique (``select_blocks`` guarantees it); -1 marks an unused slot.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from sala.ops.common.launch import interpreter_configs, num_sms, smem_per_block
from sala.ops.infllm_v2.tma import head_block_descriptor
from sala.ops.infllm_v2.topk import load_group_rows, check_dtype, dot_precision, interp_rne, rne_bf16
from sala.utils.env import sparse_backward, triton_interpret

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634
_BWD_CHUNK_BYTES = 256 * 2**20


@triton.jit
def _attend(
    b_q, pos, b_m, b_l, b_acc, list_ptr, lo, hi, k_ptr, v_ptr, L, i_h,
    s_kl, s_kh, s_vl, s_vh, scale_log2, bits_ptr, tloc, full,
    BS: tl.constexpr, NBI: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Online softmax over the blocks in list slots [lo, hi), NBI blocks (NBI * BS keys) per step.
    MASKED: slot s also has a token bit mask ``bits_ptr[s]``; row r attends only where bit ``tloc[r]`` is set
    (``full``: the mask of every token in the tile, for which no row needs masking)."""
    o_n = tl.arange(0, NBI * BS)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    min_pos = tl.min(pos, axis=0)  # padding rows carry -1 and keep the mask on
    for s0 in range(lo, hi, NBI):
        slot = s0 + o_n // BS
        blk = tl.load(list_ptr + slot, mask=slot < hi, other=-1)
        kpos = blk * BS + o_n % BS
        kval = (blk >= 0) & (kpos < L)
        kpos64 = kpos.to(tl.int64)
        b_kt = tl.load(k_ptr + i_h * s_kh + kpos64[None, :] * s_kl + o_d[:, None], mask=kval[None, :] & m_d[:, None], other=0.0)
        b_v = tl.load(v_ptr + i_h * s_vh + kpos64[:, None] * s_vl + o_d[None, :], mask=kval[:, None] & m_d[None, :], other=0.0)
        if CAST:
            b_kt = b_kt.to(tl.float32)
            b_v = b_v.to(tl.float32)
        b_s = tl.dot(b_q, b_kt, input_precision=PREC) * scale_log2  # [M, NBI*BS]
        n_bad = tl.sum((kval == 0).to(tl.int32), axis=0)
        if MASKED:
            bits = tl.load(bits_ptr + slot, mask=slot < hi, other=0)
            n_bad += tl.sum((bits != full).to(tl.int32), axis=0)
        if (n_bad > 0) | (tl.max(kpos, axis=0) > min_pos):  # spec §5.6: token-level causal mask, edge blocks only
            ok = kval[None, :] & (kpos[None, :] <= pos[:, None])
            if MASKED:
                ok = ok & (((bits[None, :] >> tloc[:, None]) & 1) != 0)
            b_s = tl.where(ok, b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(b_m - m_safe)
        b_p = tl.exp2(b_s - m_safe[:, None])
        b_l = b_l * alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)  # [M, BD]
        b_m = m_new
    return b_m, b_l, b_acc


@triton.jit
def _attend_desc(
    b_q, pos, b_m, b_l, b_acc, list_ptr, lo, hi, k_desc, v_desc, L, i_h, scale_log2, bits_ptr, tloc, full,
    BS: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, CAST: tl.constexpr,
):
    """``_attend`` with K/V blocks loaded by TMA (tensor descriptors over [L, Hkv * D], box [BS, D]): one bulk
    copy per block, straight into swizzled shared memory, one block per step (two per step measured slower). On
    an H200 at T=128K this takes the tile kernel from 271-278 to 401-408 TFLOP/s and the token kernel 67.4 ->
    53.4 ms (random lists). List entries in [lo, hi) must be valid blocks (split_lists' output); rows past L
    read as 0 and are masked."""
    min_pos = tl.min(pos, axis=0)
    col = i_h * D
    for s0 in range(lo, hi):
        blk = tl.load(list_ptr + s0)
        b_k = k_desc.load([blk * BS, col])
        if CAST:
            b_k = b_k.to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2  # [M, BS]
        need = (blk * BS + BS > L) | (blk * BS + BS - 1 > min_pos)
        if MASKED:
            bits = tl.load(bits_ptr + s0)
            need = need | (bits != full)
        if need:  # spec §5.6: token-level causal mask (and token bits), edge blocks only
            kpos = blk * BS + tl.arange(0, BS)
            ok = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] < L)
            if MASKED:
                ok = ok & (((bits >> tloc[:, None]) & 1) != 0)
            b_s = tl.where(ok, b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(b_m - m_safe)
        b_p = tl.exp2(b_s - m_safe[:, None])
        b_l = b_l * alpha + tl.sum(b_p, axis=1)
        b_v = v_desc.load([blk * BS, col])
        if CAST:
            b_v = b_v.to(tl.float32)
        b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = m_new
    return b_m, b_l, b_acc


@triton.jit
def _rank(keep):
    """Exclusive prefix count of ``keep`` [KP] (the compaction slot of each kept entry)."""
    k = keep.to(tl.int32)
    return tl.cumsum(k, axis=0) - k


@triton.jit
def _tile_row(base, tj, s_it, o_k, K, T, n_blk):
    """Token tj's block list (-1 past K or past T) -> (list [KP], in range of the scratch row, token exists)."""
    in_t = (o_k * 0 + tj) < T  # vector form: the interpreter rejects masks broadcast from a scalar bool
    lj = tl.load(base + tj.to(tl.int64) * s_it + o_k, mask=(o_k < K) & in_t, other=-1)
    return lj, (lj >= 0) & (lj < n_blk), in_t


# lengths change every decode step: no per-value specialisation, so no recompiles mid-decode
@triton.jit(do_not_specialize=["T", "K", "n_blk", "n_work"])
def _split_lists_kernel(
    idx_ptr, scr_ptr, sh_ptr, shb_ptr, shc_ptr, pr_ptr, prc_ptr, T, K, n_blk, n_work,
    s_ih, s_it, s_sh, s_st, s_ch, s_ph, s_pt, s_qh,
    BT: tl.constexpr, KP: tl.constexpr, CMIN: tl.constexpr,
):
    """Per tile of BT tokens and KV group: every block chosen by >= CMIN of the tokens goes once to the tile
    list, with the bit mask of the tokens that chose it; each token keeps its other blocks in its private list.

    Persistent: program p walks tiles p, p + P, ... and tallies choices in its own zeroed scratch row
    ``scr[p, block]`` (token bits in the low 16 bits, the count above) with L2 atomics; the read-back and the
    reset bypass L1 (``.cg``), so the three passes (tally, read + split, reset) need nothing but CTA barriers
    between them. 1.1 ms at T=128K on an H200 (6.7 ms with atomic read-backs and [KP, KP] rank sums)."""
    pid = tl.program_id(0)
    scr = scr_ptr + pid.to(tl.int64) * n_blk
    o_k = tl.arange(0, KP)
    n_tiles = tl.cdiv(T, BT)
    for w in range(pid, n_work, tl.num_programs(0)):
        i_h = w // n_tiles
        i_t = w % n_tiles
        t0 = i_t * BT
        base = idx_ptr + i_h * s_ih
        for j in range(BT):
            lj, valid, _ = _tile_row(base, t0 + j, s_it, o_k, K, T, n_blk)
            tl.atomic_add(scr + lj, o_k * 0 + (65536 + (1 << j)), mask=valid)
        tl.debug_barrier()
        n_sh = tl.sum(o_k * 0, axis=0)  # int32 scalar (a plain 0 would not be a tensor in the loop)
        p_sh = i_h * s_sh + i_t.to(tl.int64) * s_st
        for j in range(BT):
            tj = t0 + j
            lj, valid, in_t = _tile_row(base, tj, s_it, o_k, K, T, n_blk)
            tally = tl.load(scr + lj, mask=valid, other=0, cache_modifier=".cg")  # from L2: no stale L1 line
            bits = tally & 65535
            to_tile = valid & ((tally >> 16) >= CMIN)
            new = to_tile & ((bits & ((1 << j) - 1)) == 0)  # no earlier token of the tile holds it: list it once
            rank = n_sh + _rank(new)
            tl.store(sh_ptr + p_sh + rank, lj, mask=new)
            tl.store(shb_ptr + p_sh + rank, bits, mask=new)
            n_sh += tl.sum(new.to(tl.int32), axis=0)
            keep = valid & (to_tile == 0)
            tl.store(pr_ptr + i_h * s_ph + tj.to(tl.int64) * s_pt + _rank(keep), lj, mask=keep & in_t)
            tl.store(prc_ptr + i_h * s_qh + tj, tl.sum(keep.to(tl.int32), axis=0), mask=tj < T)
        tl.store(shc_ptr + i_h * s_ch + i_t, n_sh)
        tl.debug_barrier()
        for j in range(BT):
            lj, valid, _ = _tile_row(base, t0 + j, s_it, o_k, K, T, n_blk)
            tl.store(scr + lj, o_k * 0, mask=valid, cache_modifier=".cg")
        tl.debug_barrier()


# lengths change every decode step: no per-value specialisation, so no recompiles mid-decode
@triton.jit(do_not_specialize=["T", "L"])
def _sparse_tile_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, list_ptr, bits_ptr, cnt_ptr, o_ptr, lse_ptr, T, L,
    s_qt, s_qh, s_kl, s_kh, s_vl, s_vh, s_lh, s_lt, s_ch, s_ot, s_oh, s_et, scale_log2,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BS: tl.constexpr, NBI: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr, RNE: tl.constexpr,
    TMA: tl.constexpr,
):
    """TMA: k_ptr / v_ptr are tensor descriptors (``_attend_desc``), else plain pointers (``_attend``)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    b_q, pos, m_r, head, tok = load_group_rows(q_ptr, pos_ptr, i_t, i_h, T, s_qt, s_qh, G, GP, BT, D, BD, CAST)
    cnt = tl.load(cnt_ptr + i_h * s_ch + i_t)
    b_m = tl.full([BT * GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BT * GP], dtype=tl.float32)
    b_acc = tl.zeros([BT * GP, BD], dtype=tl.float32)
    full = (1 << tl.minimum(BT, T - i_t * BT)) - 1  # every token of this tile chose the block
    off = i_h * s_lh + i_t.to(tl.int64) * s_lt
    if TMA:
        b_m, b_l, b_acc = _attend_desc(
            b_q, pos, b_m, b_l, b_acc, list_ptr + off, 0, cnt, k_ptr, v_ptr, L, i_h, scale_log2, bits_ptr + off,
            tok - i_t * BT, full, BS, D, True, CAST,
        )
    else:
        b_m, b_l, b_acc = _attend(
            b_q, pos, b_m, b_l, b_acc, list_ptr + off, 0, cnt, k_ptr, v_ptr, L, i_h,
            s_kl, s_kh, s_vl, s_vh, scale_log2, bits_ptr + off, tok - i_t * BT, full, BS, NBI, D, BD, CAST, PREC, True,
        )
    has = b_l > 0
    b_o = b_acc / tl.where(has, b_l, 1.0)[:, None]
    if RNE:
        b_o = rne_bf16(b_o)
    o_d = tl.arange(0, BD)
    tok64 = tok.to(tl.int64)
    p_o = o_ptr + tok64[:, None] * s_ot + head[:, None] * s_oh + o_d[None, :]
    tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_r[:, None] & (o_d < D)[None, :])
    tl.store(lse_ptr + tok64 * s_et + head, tl.where(has, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("-inf")), mask=m_r)


# lengths change every decode step: no per-value specialisation, so no recompiles mid-decode
@triton.jit(do_not_specialize=["T", "L", "K", "per_split"])
def _sparse_token_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, list_ptr, cnt_ptr, pa_ptr, pl_ptr, o_ptr, lse_ptr, T, L, K, per_split,
    s_qt, s_qh, s_ks, s_kl, s_kh, s_vs, s_vl, s_vh, s_lh, s_lt, s_ch, s_ct, s_pt, s_ph, s_ps, s_ot, s_oh, s_es, s_et,
    scale_log2,
    G: tl.constexpr, MB: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, NBI: tl.constexpr,
    HAS_CNT: tl.constexpr, HAS_PRIOR: tl.constexpr, PARTIAL: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr,
    RNE: tl.constexpr, BATCHED: tl.constexpr, TMA: tl.constexpr,
):
    """TMA (prefill private lists only: valid entries, no slots): k_ptr / v_ptr are tensor descriptors."""
    i_t, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if BATCHED:  # decode batch: each token reads its own cache slot
        i_slot = tl.load(slot_ptr + i_t).to(tl.int64)
        k_ptr += i_slot * s_ks
        v_ptr += i_slot * s_vs
    b_q, pos, m_r, head, tok = load_group_rows(q_ptr, pos_ptr, i_t, i_h, T, s_qt, s_qh, G, MB, 1, D, BD, CAST)
    if HAS_CNT:
        n = tl.load(cnt_ptr + i_h * s_ch + i_t * s_ct)
    else:
        n = K
    if BATCHED:
        # L is the slot capacity here: never load past the row's own position, whose V may be unwritten
        # memory (NaN * 0 is NaN in the PV product even though the score is masked)
        L = tl.minimum(L, tl.max(pos, axis=0) + 1)
        if PARTIAL:  # split this row's own list length evenly (the host sized S for the capacity)
            n_split = tl.num_programs(2)
            per_split = tl.cdiv(tl.cdiv(n, n_split), NBI) * NBI
    lo = i_s * per_split
    hi = tl.minimum(lo + per_split, n)
    b_m = tl.full([MB], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([MB], dtype=tl.float32)
    b_acc = tl.zeros([MB, BD], dtype=tl.float32)
    p_list = list_ptr + i_h * s_lh + i_t.to(tl.int64) * s_lt
    if TMA:
        b_m, b_l, b_acc = _attend_desc(
            b_q, pos, b_m, b_l, b_acc, p_list, lo, hi, k_ptr, v_ptr, L, i_h, scale_log2, list_ptr, tok, 0,
            BS, D, False, CAST,
        )
    else:
        b_m, b_l, b_acc = _attend(
            b_q, pos, b_m, b_l, b_acc, p_list, lo, hi, k_ptr, v_ptr, L, i_h,
            s_kl, s_kh, s_vl, s_vh, scale_log2, list_ptr, tok, 0, BS, NBI, D, BD, CAST, PREC, False,
        )
    o_d = tl.arange(0, BD)
    m_rd = m_r[:, None] & (o_d < D)[None, :]
    tok64 = tok.to(tl.int64)
    if PARTIAL:  # flash-decoding split: normalised partial output + its lse, combined on the host
        has = b_l > 0
        b_o = b_acc / tl.where(has, b_l, 1.0)[:, None]
        p_o = pa_ptr + i_s * s_ps + tok64[:, None] * s_pt + head[:, None] * s_ph + o_d[None, :]
        tl.store(p_o, b_o, mask=m_rd)
        tl.store(pl_ptr + i_s * s_es + tok64 * s_et + head, tl.where(has, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("-inf")), mask=m_r)
    else:
        if HAS_PRIOR:  # merge with the tile kernel's state: o_A = acc_A / l_A, lse_A = m_A + log2(l_A)
            lse_a = tl.load(pl_ptr + tok64 * s_et + head, mask=m_r, other=float("-inf"))
            b_oa = tl.load(pa_ptr + tok64[:, None] * s_pt + head[:, None] * s_ph + o_d[None, :], mask=m_rd, other=0.0)
            mm = tl.maximum(lse_a, b_m)
            mm = tl.where(mm == float("-inf"), 0.0, mm)
            w_a = tl.exp2(lse_a - mm)
            w_b = tl.exp2(b_m - mm)
            b_acc = b_oa.to(tl.float32) * w_a[:, None] + b_acc * w_b[:, None]
            b_l = w_a + b_l * w_b
        b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # a query that sees nothing gets 0
        if RNE:
            b_o = rne_bf16(b_o)
        tl.store(o_ptr + tok64[:, None] * s_ot + head[:, None] * s_oh + o_d[None, :], b_o.to(o_ptr.dtype.element_ty), mask=m_rd)


# GPU launch configuration (tuned on H200 with triton 3.6 at T=32K; 3 stages lose, 128-key tiles with 4 warps
# and 3 stages exceed shared memory). rows: tile-kernel rows (tokens x heads); *_keys: keys per inner step;
# share: split lists into tile-shared + private blocks (else every block goes through the token kernel).
# rows / tile_* / share_min apply to the pointer-load path; the tma_* keys replace them on the TMA path.
# tma_*: the prefill kernels when they load K/V blocks by TMA (Hopper+, 16-bit K/V; ``_tma_descriptors``), tuned
# on an H200 at 128K (results/sparse_tma_*): 64-row tiles (4 tokens) with 4 warps and 3 stages, a block to
# the tile from 2 of its 4 tokens (attend 68.9 -> 64.0 ms random, 51.9 -> 50.8 clustered
# against 128 rows / 8 warps / share_min 4; 2 blocks per step, 32- or 256-row tiles and share_min 1 or 3 lose).
# The interpreter takes _INTERP_CONFIG unless sala.ops.common.launch.gpu_launch_configs() asks for these.
GPU_CONFIG = dict(rows=128, tile_keys=128, tile_warps=8, tile_stages=2, tok_keys=128, tok_warps=4, tok_stages=2,
                  share=True, share_min=4, tma=True, tma_rows=64, tma_tile_warps=4, tma_tile_stages=3,
                  tma_tok_stages=2, tma_share_min=2)
_INTERP_CONFIG = dict(rows=16, tile_keys=16, tile_warps=4, tile_stages=1, tok_keys=16, tok_warps=4, tok_stages=1,
                      share=True, share_min=2, tma=True, tma_rows=32, tma_tile_warps=4,
                      tma_tile_stages=1, tma_tok_stages=1, tma_share_min=2)
_TMA_MAX_BOX = 64 * 128  # keys x head dim of one K/V box the TMA tile/token configs were sized for
_MAX_TILE_TOKENS = 16  # the split kernel keeps a tile's token bit mask in the low 16 bits of its tallies


# Cards with 99 KB of shared memory per block (RTX 4090 sm_89, RTX 5090 sm_120): the tile kernel's 128-key
# steps need 129 KB at D=128 (ptxas, triton 3.6), so it steps one 64-key block at a time (80 KB, no spills);
# three TMA stages would not fit either.
SMALL_SMEM_CONFIG = {**GPU_CONFIG, "tile_keys": 64, "tma": False}
_TILE_SMEM_BYTES = 165 * 1024  # what GPU_CONFIG's tile kernel needs on sm_90, with a little margin


def _cfg(device: torch.device | None = None) -> dict:
    if interpreter_configs():
        return _INTERP_CONFIG
    smem = smem_per_block(device)  # CUDA's, or the emulated GPU's in the interpreter
    if smem is not None and smem < _TILE_SMEM_BYTES:
        return SMALL_SMEM_CONFIG
    return GPU_CONFIG


def _tma_descriptors(k: torch.Tensor, v: torch.Tensor, a: dict):
    """(K, V) block descriptors for the prefill kernels, or None where they load through pointers: config off;
    blocks under 16 keys (one P.V dot per block needs K >= 16 on tensor cores); blocks larger than the tuned
    64 x 128 (three stages of K and V boxes would outgrow shared memory); or ``head_block_descriptor`` does not
    apply to K or V."""
    BS, D = a["BS"], k.shape[2]
    if not a["cfg"]["tma"] or BS < 16 or BS * D > _TMA_MAX_BOX:
        return None
    descs = [head_block_descriptor(x, BS) for x in (k, v)]
    return None if None in descs else descs


def _launch(q: torch.Tensor, k: torch.Tensor, topk_idx: torch.Tensor, block_size: int, scale: float) -> dict:
    """Tile sizes and shared kernel arguments; k: [L, Hkv, D]."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    cfg = _cfg(q.device)
    wide = 2 if q.dtype == torch.float32 else 1  # fp32 tiles take twice the shared memory per key
    return dict(
        T=T, L=k.shape[0], BS=block_size, Hkv=Hkv, G=G, K=topk_idx.shape[-1], GP=triton.next_power_of_2(G),
        MB=max(16, triton.next_power_of_2(G)), nbi_tile=max(1, cfg["tile_keys"] // wide // block_size),
        nbi_tok=max(1, cfg["tok_keys"] // wide // block_size), scale_log2=scale * _LOG2E, cfg=cfg,
        tok_launch=dict(num_warps=cfg["tok_warps"], num_stages=cfg["tok_stages"]),
        common=dict(D=D, BD=triton.next_power_of_2(D), BS=block_size, CAST=triton_interpret(),
                    PREC=dot_precision(q.dtype), RNE=interp_rne(q.dtype)),
    )


def _sparse_forward(q, k, v, topk_idx, q_pos, block_size: int, scale: float) -> torch.Tensor:
    T, Hkv = q.shape[0], k.shape[1]
    a = _launch(q, k, topk_idx, block_size, scale)
    cfg = a["cfg"]
    o = torch.empty_like(q)
    if T == 0:
        return o
    n_sm = num_sms(q.device)
    if T <= 16 or T * Hkv < n_sm:
        logger.debug("block-sparse attention: flash-decoding split (T=%d, too few queries to fill %d SMs)", T, n_sm)
        return _decode_forward(q, k, v, topk_idx, q_pos, o, n_sm, a)
    if not cfg["share"]:
        return _token_forward(q, k, v, topk_idx, q_pos, o, a)
    return _shared_forward(q, k, v, topk_idx, q_pos, o, a)


def _decode_forward(q, k, v, topk_idx, q_pos, o, n_sm: int, a: dict, slot=None, counts=None) -> torch.Tensor:
    """Each list split over S programs writing (o, lse) partials, combined here (flash-decoding).
    With ``slot`` [T]: k, v are [S, L, Hkv, D] slot caches and row t reads k[slot[t]]; ``counts`` [Hkv, T]:
    valid list entries per row (the rest are not read)."""
    T, H, D, K, nbi = a["T"], q.shape[1], q.shape[2], a["K"], a["nbi_tok"]
    S = max(1, min(triton.cdiv(2 * n_sm, T * a["Hkv"]), triton.cdiv(K, 2 * nbi)))
    per = triton.cdiv(triton.cdiv(max(K, 1), S), nbi) * nbi
    S = triton.cdiv(max(K, 1), per)
    po = torch.empty(S, T, H, D, dtype=torch.float32, device=q.device)
    pl = torch.empty(S, T, H, dtype=torch.float32, device=q.device)
    s_ks, s_vs = (0, 0) if slot is None else (k.stride(0), v.stride(0))
    if slot is not None:
        k, v = k[0], v[0]
    _sparse_token_kernel[(T, a["Hkv"], S)](
        q, k, v, q_pos, q_pos if slot is None else slot, topk_idx, topk_idx if counts is None else counts,
        po, pl, o, pl, T, a["L"], K, per,
        q.stride(0), q.stride(1), s_ks, k.stride(0), k.stride(1), s_vs, v.stride(0), v.stride(1),
        topk_idx.stride(0), topk_idx.stride(1), *((0, 0) if counts is None else counts.stride()),
        po.stride(1), po.stride(2), po.stride(0), o.stride(0), o.stride(1), pl.stride(0), pl.stride(1), a["scale_log2"],
        G=a["G"], MB=a["MB"], NBI=nbi, HAS_CNT=counts is not None, HAS_PRIOR=False, PARTIAL=True,
        BATCHED=slot is not None, TMA=False, **a["tok_launch"], **a["common"],
    )
    # one program per (query, head) row, all of its splits in one [BS, D] load (a chunk at a time past BS): the
    # row-serial loop over S splits (S ~ 50 at 256K, 2 programs of 16 rows at one decode token) took 16 us per layer
    BS = min(64, triton.next_power_of_2(S))
    _merge_partials_kernel[(T * H,)](
        po, pl, o, S, T * H, H, o.stride(0), o.stride(1),
        D=D, BD=triton.next_power_of_2(D), BS=BS, RNE=a["common"]["RNE"], num_warps=4,
    )
    return o


@triton.jit(do_not_specialize=["S", "R"])
def _merge_partials_kernel(po_ptr, pl_ptr, o_ptr, S, R, H, s_ot, s_oh,
                           D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, RNE: tl.constexpr):
    """Flash-decoding merge of row r = t * H + h (this program): the S normalised partials po [S, R, D] with their
    log2-sum-exp pl [S, R] (both contiguous) -> o[t, h] (0 where every split was empty), BS splits per step."""
    r = tl.program_id(0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_s = tl.arange(0, BS)
    b_m = tl.full([1], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([1], dtype=tl.float32)
    b_acc = tl.zeros([1, BD], dtype=tl.float32)
    for s0 in range(0, S, BS):
        s = s0 + o_s
        m_s = s < S
        x = tl.load(pl_ptr + s * R + r, mask=m_s, other=float("-inf"))[:, None]  # [BS, 1]
        b_o = tl.load(po_ptr + (s.to(tl.int64) * R + r)[:, None] * D + o_d[None, :],
                      mask=m_s[:, None] & m_d[None, :], other=0.0)  # [BS, BD]
        m_new = tl.maximum(b_m, tl.max(x, axis=0))  # [1]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(b_m - m_safe)
        w = tl.exp2(x - m_safe[None, :])  # [BS, 1]; empty splits (-inf) weigh 0
        b_l = b_l * alpha + tl.sum(w, axis=0)
        b_acc = b_acc * alpha[:, None] + tl.sum(w * b_o, axis=0)[None, :]
        b_m = m_new
    out = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]
    if RNE:
        out = rne_bf16(out)
    t = (r // H).to(tl.int64)
    h = r % H
    tl.store(o_ptr + t * s_ot + h * s_oh + o_d[None, :], out.to(o_ptr.dtype.element_ty), mask=m_d[None, :])


def _token_forward(q, k, v, topk_idx, q_pos, o, a: dict) -> torch.Tensor:
    """Every block through the token kernel (the official kernel's scheme; ``share=False``)."""
    K = a["K"]
    _sparse_token_kernel[(a["T"], a["Hkv"], 1)](
        q, k, v, q_pos, q_pos, topk_idx, topk_idx, o, o, o, o, a["T"], a["L"], K, K,
        q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1),
        topk_idx.stride(0), topk_idx.stride(1), 0, 0, 0, 0, 0, o.stride(0), o.stride(1), 0, 0, a["scale_log2"],
        G=a["G"], MB=a["MB"], NBI=a["nbi_tok"], HAS_CNT=False, HAS_PRIOR=False, PARTIAL=False, BATCHED=False, TMA=False,
        **a["tok_launch"], **a["common"],
    )
    return o


def split_lists(topk_idx: torch.Tensor, num_keys: int, block_size: int, tile_tokens: int, share_min: int):
    """Split each tile of ``tile_tokens`` consecutive tokens' block lists (per KV group) into one tile list of
    the blocks chosen by >= ``share_min`` of its tokens, each with the bit mask of the tokens that chose it,
    and per-token private lists of the remaining blocks. Entries outside [0, ceil(num_keys / block_size)) are
    dropped (they hold no keys).

    topk_idx: [Hkv, T, K] int32 (unique per row, -1 unused) -> (tile [Hkv, n_tiles, cap], tile_bits (same),
    tile_n [Hkv, n_tiles], private [Hkv, T, KP], private_n [Hkv, T]); only the first ``*_n`` entries are set.
    """
    Hkv, T, K = topk_idx.shape
    BT, dev = tile_tokens, topk_idx.device
    if not 1 <= BT <= _MAX_TILE_TOKENS:
        raise ValueError(f"tile_tokens must be in [1, {_MAX_TILE_TOKENS}] (16-bit token masks), got {BT}")
    c_min = max(1, min(BT, share_min))
    n_tiles = triton.cdiv(T, BT)
    KP = triton.next_power_of_2(max(K, 1))
    cap = triton.cdiv(BT * K, c_min)  # each tile entry stands for >= c_min of the tile's choices
    tile = torch.empty(Hkv, n_tiles, cap, dtype=torch.int32, device=dev)
    tile_bits = torch.empty_like(tile)
    tile_n = torch.empty(Hkv, n_tiles, dtype=torch.int32, device=dev)
    private = torch.empty(Hkv, T, KP, dtype=torch.int32, device=dev)
    private_n = torch.empty(Hkv, T, dtype=torch.int32, device=dev)
    n_blk = max(1, triton.cdiv(num_keys, block_size))
    n_prog = max(1, min(n_tiles * Hkv, 8 * num_sms(dev)))
    scratch = torch.zeros(n_prog, n_blk, dtype=torch.int32, device=dev)
    _split_lists_kernel[(n_prog,)](
        topk_idx, scratch, tile, tile_bits, tile_n, private, private_n, T, K, n_blk, n_tiles * Hkv,
        topk_idx.stride(0), topk_idx.stride(1), tile.stride(0), tile.stride(1), tile_n.stride(0),
        private.stride(0), private.stride(1), private_n.stride(0), BT=BT, KP=KP, CMIN=c_min, num_warps=4,
    )
    return tile, tile_bits, tile_n, private, private_n


def _shared_forward(q, k, v, topk_idx, q_pos, o, a: dict) -> torch.Tensor:
    """Split lists per tile, attend the blocks most tokens of a tile chose with BT x G rows (masking the rows of
    tokens that did not choose them), then each token's remaining blocks with G rows, and merge."""
    T, Hkv, cfg, dev = a["T"], a["Hkv"], a["cfg"], q.device
    descs = _tma_descriptors(k, v, a)
    tma = descs is not None
    if tma:
        rows, share_min, tile_warps, tile_stages = cfg["tma_rows"], cfg["tma_share_min"], cfg["tma_tile_warps"], cfg["tma_tile_stages"]
        nbi_tile = nbi_tok = 1  # one block per TMA step (the kernels ignore NBI then)
        tok_launch = dict(num_warps=cfg["tok_warps"], num_stages=cfg["tma_tok_stages"])
    else:
        rows, share_min, tile_warps, tile_stages = cfg["rows"], cfg["share_min"], cfg["tile_warps"], cfg["tile_stages"]
        nbi_tile, nbi_tok, tok_launch = a["nbi_tile"], a["nbi_tok"], a["tok_launch"]
    BT = min(_MAX_TILE_TOKENS, max(1, rows // a["GP"]))
    n_tiles = triton.cdiv(T, BT)
    shared, shared_bits, shared_n, private, private_n = split_lists(topk_idx, a["L"], a["BS"], BT, share_min)
    KP = private.shape[-1]
    o_a = torch.empty_like(q)  # tile-kernel partial in q's dtype (fp32 for fp32 inputs)
    lse_a = torch.empty(T, q.shape[1], dtype=torch.float32, device=dev)
    kv = descs if tma else (k, v)
    _sparse_tile_kernel[(n_tiles, Hkv)](
        q, *kv, q_pos, shared, shared_bits, shared_n, o_a, lse_a, T, a["L"],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        shared.stride(0), shared.stride(1), shared_n.stride(0), o_a.stride(0), o_a.stride(1), lse_a.stride(0),
        a["scale_log2"], G=a["G"], GP=a["GP"], BT=BT, NBI=nbi_tile, TMA=tma,
        num_warps=tile_warps, num_stages=tile_stages, **a["common"],
    )
    _sparse_token_kernel[(T, Hkv, 1)](
        q, *kv, q_pos, q_pos, private, private_n, o_a, lse_a, o, lse_a, T, a["L"], KP, KP,
        q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1),
        private.stride(0), private.stride(1), private_n.stride(0), private_n.stride(1), o_a.stride(0), o_a.stride(1), 0,
        o.stride(0), o.stride(1), 0, lse_a.stride(0), a["scale_log2"],
        G=a["G"], MB=a["MB"], NBI=nbi_tok, HAS_CNT=True, HAS_PRIOR=True, PARTIAL=False, BATCHED=False,
        TMA=tma, **tok_launch, **a["common"],
    )
    return o


def _sparse_backward_torch(q, k, v, topk_idx, q_pos, block_size: int, scale: float, do: torch.Tensor):
    """Recompute-based gradients over the selected blocks, in fp32, query chunk by query chunk."""
    dt = torch.float32
    T, H, D = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    G = H // Hkv
    K = topk_idx.shape[-1]
    N = K * block_size
    kk = k.to(dt).transpose(0, 1)  # [Hkv, L, D]
    vv = v.to(dt).transpose(0, 1)
    dq = torch.zeros(T, H, D, dtype=dt, device=q.device)
    dk = torch.zeros(Hkv * L, D, dtype=dt, device=q.device)
    dv = torch.zeros(Hkv * L, D, dtype=dt, device=q.device)
    step = max(1, _BWD_CHUNK_BYTES // max(1, 4 * Hkv * N * (4 * D + 3 * G)))
    o_bs = torch.arange(block_size, device=q.device)
    for a in range(0, T, step):
        idx = topk_idx[:, a : a + step].long()  # [Hkv, Tc, K]
        Tc = idx.shape[1]
        kpos = (idx[..., None] * block_size + o_bs).reshape(Hkv, Tc, N)
        valid = (idx[..., None] >= 0).expand(-1, -1, -1, block_size).reshape(Hkv, Tc, N)
        valid = valid & (kpos < L) & (kpos <= q_pos[a : a + step].view(1, Tc, 1))
        kp = kpos.clamp(0, L - 1)
        gidx = kp.reshape(Hkv, Tc * N, 1).expand(-1, -1, D)
        kg = torch.gather(kk, 1, gidx).view(Hkv, Tc, N, D)
        vg = torch.gather(vv, 1, gidx).view(Hkv, Tc, N, D)
        qc = q[a : a + step].to(dt).view(Tc, Hkv, G, D).transpose(0, 1)  # [Hkv, Tc, G, D]
        doc = do[a : a + step].to(dt).view(Tc, Hkv, G, D).transpose(0, 1)
        s = scale * torch.einsum("htgd,htnd->htgn", qc, kg)
        s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        oc = torch.einsum("htgn,htnd->htgd", p, vg)
        dp = torch.einsum("htgd,htnd->htgn", doc, vg)
        ds = p * (dp - (doc * oc).sum(-1, keepdim=True))
        dq[a : a + step] = (scale * torch.einsum("htgn,htnd->htgd", ds, kg)).transpose(0, 1).reshape(Tc, H, D)
        flat = (kp + torch.arange(Hkv, device=q.device).view(Hkv, 1, 1) * L).reshape(-1)
        dk.index_add_(0, flat, (scale * torch.einsum("htgn,htgd->htnd", ds, qc)).reshape(-1, D))
        dv.index_add_(0, flat, torch.einsum("htgn,htgd->htnd", p, doc).reshape(-1, D))
    dk = dk.view(Hkv, L, D).transpose(0, 1)
    dv = dv.view(Hkv, L, D).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, topk_idx, q_pos, block_size, scale):
        o = _sparse_forward(q, k, v, topk_idx, q_pos, block_size, scale)
        ctx.save_for_backward(q, k, v, topk_idx, q_pos, o)
        ctx.block_size, ctx.scale = block_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, topk_idx, q_pos, o = ctx.saved_tensors
        mode = sparse_backward()
        if (mode == "triton" or (mode == "auto" and q.is_cuda)) and ctx.block_size >= 16:  # tl.dot: 16-wide tiles
            from sala.ops.infllm_v2.sparse_attn_bwd import triton_sparse_attention_backward

            dq, dk, dv = triton_sparse_attention_backward(q, k, v, o, do, topk_idx, q_pos, ctx.block_size, ctx.scale)
        else:
            dq, dk, dv = _sparse_backward_torch(q, k, v, topk_idx, q_pos, ctx.block_size, ctx.scale, do)
        return dq, dk, dv, None, None, None, None


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_idx: torch.Tensor,
    q_pos: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Softmax attention over the tokens of each query's selected blocks, keys at positions <= p (spec §5.6).

    q: [T, H, D]; k, v: [L, Hkv, D]; topk_idx: [Hkv, T, K] int32 (unique per row, -1 unused); q_pos: [T]
    -> o: [T, H, D] in q's dtype. Forward in Triton; differentiable in q, k, v: Triton backward kernels on
    CUDA, a recompute-based PyTorch backward elsewhere (``SALA_SPARSE_BACKWARD``, module docstring).
    block_size: a power of two >= 8; head dim >= 16.
    """
    check_dtype(q, k, v)
    if block_size & (block_size - 1) or block_size < 8:
        raise ValueError(f"Triton block-sparse attention needs a power-of-two block_size >= 8, got {block_size}")
    if topk_idx.dim() != 3 or topk_idx.shape[:2] != (k.shape[1], q.shape[0]):
        raise ValueError(f"topk_idx must be [Hkv={k.shape[1]}, T={q.shape[0]}, K], got {tuple(topk_idx.shape)}")
    if q.shape[2] < 16:
        raise ValueError(f"Triton block-sparse attention needs head dim >= 16, got {q.shape[2]}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    topk_idx = topk_idx.to(torch.int32).contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _BlockSparseAttention.apply(q, k, v, topk_idx, q_pos, block_size, scale)
    return _sparse_forward(q, k, v, topk_idx, q_pos, block_size, scale)


def triton_sparse_decode_batch(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    topk_idx: torch.Tensor,
    counts: torch.Tensor,
    slot: torch.Tensor,
    q_pos: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Block-sparse attention of one decode token per row, each row in its own cache slot; graph-safe.

    q: [N, H, D]; keys, values: [S, C, Hkv, D] slot caches (row t reads slot[t], keys at positions <= q_pos[t]);
    topk_idx: [Hkv, N, K] int32 ascending; counts: [Hkv, N] valid entries per row -> o: [N, H, D] (q dtype).
    Shapes depend only on N and the cache shapes, and nothing syncs with the host.
    """
    check_dtype(q, keys, values)
    if keys.dim() != 4 or keys.shape != values.shape or topk_idx.shape[:2] != (keys.shape[2], q.shape[0]):
        raise ValueError(f"decode batch wants keys/values [S, C, Hkv, D] and topk_idx [Hkv, N, K]; got "
                         f"{tuple(keys.shape)}, {tuple(values.shape)}, {tuple(topk_idx.shape)}")
    a = _launch(q, keys[0], topk_idx, block_size, scale)
    o = torch.empty_like(q)
    if q.shape[0] == 0:
        return o
    return _decode_forward(q, keys, values, topk_idx, q_pos, o, num_sms(q.device), a, slot=slot, counts=counts)
