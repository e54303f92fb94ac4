"""Triton stage 1 and block selection for InfLLM-v2 (spec §5.4-5.5).

Three kernels:

* ``_stage1_lse_kernel``: per query tile and KV group, the coarse normaliser LSE_th over the visible ck2
  windows (online max/sum, log2 domain). The G query heads of a group are folded into the rows of one tile
  (row = token * GP + head), so they share every ck load. Split over ck2 for short T (decode).
* ``_stage1_score_kernel``: group-summed ``exp(s q.ck1 - LSE)`` over the visible ck1 windows. It writes either
  the raw scores [Hkv, T, n1] (the ``stage1_block_scores`` contract) or, fused, only per-block maxima:
  ``own[b]`` = max over the windows starting inside block b and ``tail[b]`` = max over the last LEFT of them,
  so that the pooled score is ``max(own[b], tail[b-1])`` (spec §5.5: windows [r b - 1, r b + r - 1]).
  The fused form writes [Hkv, T, n_blocks] twice instead of [Hkv, T, n1] (r = 4 times fewer columns), and
  skips the column chunks past a tile's last visible window altogether (the selection never reads them).
* ``_select_kernel``: pooling (from raw scores or own/tail), forced blocks (+inf), then top-K_sel per row: a
  bitwise binary search over the score's bit pattern (15 steps for bf16) finds the K_sel-th largest value;
  every block above it is kept and, of the blocks tied at it, the lowest ones (a prefix count), like the
  reference's stable sort. The kept blocks are written in ascending order via a prefix sum, blocks after the
  query's own block become -1.

Scores are rounded to q's dtype (bf16/fp16) before pooling exactly like the reference; fp32 inputs run the
dots in IEEE fp32 so selections match the reference bit for bit up to summation order.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from sala.ops.common.launch import interpreter_configs, num_sms
from sala.ops.common.triton_utils import interp_rne, rne_bf16  # noqa: F401 (re-exported to the other kernels)
from sala.ops.infllm_v2.naive import InfLLMv2Params
from sala.ops.infllm_v2.tma import head_block_descriptor
from sala.utils.env import triton_interpret

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots for fp32 inputs (parity with the reference); half inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_dtype(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"Triton InfLLM-v2 kernels take fp16/bf16/fp32 tensors, got {t.dtype}; use backend='naive' for fp64")


def _geometry(params: InfLLMv2Params) -> tuple[int, int]:
    """(r, left): windows per block and windows starting before a block that still overlap it."""
    ks, st, bs = params.kernel_size, params.kernel_stride, params.block_size
    if bs % st or ks < st:
        raise ValueError(f"Triton selection needs block_size % kernel_stride == 0 and kernel_size >= kernel_stride; got {params}")
    r, left = bs // st, (ks - 1) // st
    if r & (r - 1) or left > r:
        raise ValueError(f"Triton selection needs block_size/kernel_stride a power of two >= (kernel_size-1)//kernel_stride; got r={r}, left={left}")
    return r, left


@triton.jit
def load_group_rows(q_ptr, pos_ptr, i_t, i_h, T, s_qt, s_qh, G: tl.constexpr, GP: tl.constexpr,
                     BT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, CAST: tl.constexpr):
    """Rows = BT tokens x GP heads of KV group i_h; returns (q [BT*GP, BD], pos [BT*GP] int32, valid, head)."""
    o_r = tl.arange(0, BT * GP)
    tok = i_t * BT + o_r // GP
    g = o_r % GP
    m_r = (tok < T) & (g < G)
    head = i_h * G + g
    pos = tl.load(pos_ptr + tok, mask=tok < T, other=-1).to(tl.int32)
    o_d = tl.arange(0, BD)
    p_q = q_ptr + tok.to(tl.int64)[:, None] * s_qt + head[:, None] * s_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)
    if CAST:
        b_q = b_q.to(tl.float32)
    return b_q, pos, m_r, head, tok


@triton.jit
def _load_keys_t(c_ptr, j0, j_end, i_h, s_ch, s_cn, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                 CAST: tl.constexpr, TMA: tl.constexpr):
    """Compressed keys j0 + [0, BN) of KV head i_h, transposed -> [BD, BN]; keys at or past j_end read 0 with
    pointer loads. TMA: ``c_ptr`` is a [BN, D] box descriptor (BD == D) and those keys arrive unmasked (rows
    past the tensor read 0), so callers must mask their scores."""
    if TMA:
        b_ct = tl.trans(c_ptr.load([j0, i_h * D]))
    else:
        o_j = j0 + tl.arange(0, BN)
        o_d = tl.arange(0, BD)
        p_c = c_ptr + i_h * s_ch + o_j.to(tl.int64)[None, :] * s_cn + o_d[:, None]
        b_ct = tl.load(p_c, mask=(o_j < j_end)[None, :] & (o_d < D)[:, None], other=0.0)
    if CAST:
        b_ct = b_ct.to(tl.float32)
    return b_ct


# lengths change every decode step: no per-value specialisation, so no recompiles mid-decode
@triton.jit(do_not_specialize=["T", "n2", "per_split"])
def _stage1_lse_kernel(
    q_ptr, c_ptr, pos_ptr, slot_ptr, lse_ptr, T, n2, per_split,
    s_qt, s_qh, s_cs, s_cn, s_ch, s_ls, s_lt, scale_log2,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    KS: tl.constexpr, ST: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr, BATCHED: tl.constexpr,
    TMA: tl.constexpr,
):
    """TMA: c_ptr is a [BN, D] block descriptor over ck2 (rows past n2 read 0; rows past j_hi are masked)."""
    i_t, i_h, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if BATCHED:  # decode batch: one token per tile (BT = 1), each row reads its own cache slot
        c_ptr += tl.load(slot_ptr + i_t).to(tl.int64) * s_cs
    b_q, pos, m_r, head, tok = load_group_rows(q_ptr, pos_ptr, i_t, i_h, T, s_qt, s_qh, G, GP, BT, D, BD, CAST)
    max_pos = tl.max(pos, axis=0)
    n_vis = tl.where(max_pos >= KS - 1, (max_pos - KS + 1) // ST + 1, 0)  # windows complete by the last row
    if BATCHED:  # the host sized the split for the capacity: split this row's own visible windows evenly
        per_split = tl.cdiv(tl.cdiv(n_vis, tl.num_programs(2)), BN) * BN
    j_lo = i_s * per_split
    j_hi = tl.minimum(tl.minimum(j_lo + per_split, n2), n_vis)
    b_m = tl.full([BT * GP], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BT * GP], dtype=tl.float32)
    for j0 in range(j_lo, j_hi, BN):
        o_j = j0 + tl.arange(0, BN)
        b_ct = _load_keys_t(c_ptr, j0, j_hi, i_h, s_ch, s_cn, D, BD, BN, CAST, TMA)
        b_s = tl.dot(b_q, b_ct, input_precision=PREC) * scale_log2  # [BT*GP, BN]
        vis = ((o_j * ST + KS - 1)[None, :] <= pos[:, None]) & (o_j < j_hi)[None, :]
        b_s = tl.where(vis, b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_l = b_l * tl.exp2(b_m - m_safe) + tl.sum(tl.exp2(b_s - m_safe[:, None]), axis=1)
        b_m = m_new
    lse = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("-inf"))
    tl.store(lse_ptr + i_s * s_ls + tok.to(tl.int64) * s_lt + head, lse, mask=m_r)


# lengths change every decode step: no per-value specialisation, so no recompiles mid-decode
@triton.jit(do_not_specialize=["T", "n1", "n_cols", "n_blk"])
def _stage1_score_kernel(
    q_ptr, c_ptr, pos_ptr, slot_ptr, lse_ptr, o_ptr, t_ptr, T, n1, n_cols, n_blk,
    s_qt, s_qh, s_cs, s_cn, s_ch, s_lt, s_oh, s_ot, scale_log2,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    CW: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, R: tl.constexpr, LEFT: tl.constexpr,
    POOL: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr, RNE: tl.constexpr, BATCHED: tl.constexpr,
    TMA: tl.constexpr,
):
    """TMA: c_ptr is a [BN, D] block descriptor over ck1 (see ``_stage1_score_tile``)."""
    i_t, i_h, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if BATCHED:  # decode batch: one token per tile (BT = 1), each row reads its own cache slot
        c_ptr += tl.load(slot_ptr + i_t).to(tl.int64) * s_cs
    tok_t = i_t * BT + tl.arange(0, BT)
    m_t = tok_t < T
    pos_t = tl.load(pos_ptr + tok_t, mask=m_t, other=-1).to(tl.int32)
    max_pos = tl.max(pos_t, axis=0)
    min_pos = tl.min(tl.where(m_t, pos_t, 2147483647), axis=0)
    n_seen = tl.where(max_pos >= KS - 1, (max_pos - KS + 1) // ST + 1, 0)  # windows complete by the last row
    n_vis = tl.minimum(n_seen, n1)  # ... of which ck1 holds these (the rest score 0)
    n_full = tl.minimum(tl.where(min_pos >= KS - 1, (min_pos - KS + 1) // ST + 1, 0), n1)  # every row sees them
    c_lo = i_c * CW
    c_hi = tl.minimum(c_lo + CW, n_cols)
    if POOL:  # blocks past the windows any row can see are never read (the selection masks them): skip them;
        c_hi = tl.minimum(c_hi, n_seen)  # windows a row sees but a short ck1 lacks still get their zeros
    if c_lo < c_hi:
        _stage1_score_tile(
            q_ptr, c_ptr, pos_ptr, lse_ptr, o_ptr, t_ptr, T, n1, n_blk, i_t, i_h, tok_t, m_t, c_lo, c_hi, n_vis,
            n_full, s_qt, s_qh, s_cn, s_ch, s_lt, s_oh, s_ot, scale_log2,
            G, GP, BT, D, BD, BN, KS, ST, R, LEFT, POOL, CAST, PREC, RNE, TMA,
        )


@triton.jit
def _stage1_score_tile(
    q_ptr, c_ptr, pos_ptr, lse_ptr, o_ptr, t_ptr, T, n1, n_blk, i_t, i_h, tok_t, m_t, c_lo, c_hi, n_vis,
    n_full, s_qt, s_qh, s_cn, s_ch, s_lt, s_oh, s_ot, scale_log2,
    G: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    KS: tl.constexpr, ST: tl.constexpr, R: tl.constexpr, LEFT: tl.constexpr,
    POOL: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr, RNE: tl.constexpr, TMA: tl.constexpr,
):
    """Score windows [c_lo, c_hi) for one query tile of tokens ``tok_t`` (valid: ``m_t``); see the kernel.
    TMA loads whole [BN, D] boxes: windows in [n_vis, n1) arrive unmasked, which is harmless because every step
    that reaches past n_full (>= n_vis is past it) masks by visibility."""
    b_q, pos, m_r, head, tok = load_group_rows(q_ptr, pos_ptr, i_t, i_h, T, s_qt, s_qh, G, GP, BT, D, BD, CAST)
    lse = tl.load(lse_ptr + tok.to(tl.int64) * s_lt + head, mask=m_r, other=float("-inf"))
    # no visible coarse window (spec §5.4 edge case) or a padding row: lse = +inf makes every score exp2(-inf) = 0
    lse = tl.where(lse > float("-inf"), lse, float("inf"))
    p_o = o_ptr + i_h * s_oh + tok_t.to(tl.int64)[:, None] * s_ot
    p_tail = t_ptr + i_h * s_oh + tok_t.to(tl.int64)[:, None] * s_ot
    for w0 in range(c_lo, c_hi, BN):
        o_w = w0 + tl.arange(0, BN)
        if w0 < n_vis:
            b_ct = _load_keys_t(c_ptr, w0, n_vis, i_h, s_ch, s_cn, D, BD, BN, CAST, TMA)
            b_s = tl.dot(b_q, b_ct, input_precision=PREC) * scale_log2  # [BT*GP, BN]
            b_p = tl.exp2(b_s - lse[:, None])
            if w0 + BN > n_full:  # causal edge: mask per row (most tiles skip this)
                vis = ((o_w * ST + KS - 1)[None, :] <= pos[:, None]) & (o_w < n_vis)[None, :]
                b_p = tl.where(vis, b_p, 0.0)
        else:
            b_p = tl.zeros([BT * GP, BN], dtype=tl.float32)
        b_ps = tl.sum(tl.reshape(b_p, [BT, GP, BN]), axis=1)  # [BT, BN] summed over the group's heads
        if RNE:  # interpreter: round like the GPU does at the store (max commutes with rounding)
            b_ps = rne_bf16(b_ps)
        if POOL:
            b_p3 = tl.reshape(b_ps, [BT, BN // R, R])
            b_own = tl.max(b_p3, axis=2)  # [BT, BN // R]
            o_in = tl.arange(0, R)
            b_tail = tl.max(tl.where((o_in >= R - LEFT)[None, None, :], b_p3, 0.0), axis=2)
            o_b = w0 // R + tl.arange(0, BN // R)
            m_o = m_t[:, None] & (o_b < n_blk)[None, :]
            tl.store(p_o + o_b[None, :], b_own.to(o_ptr.dtype.element_ty), mask=m_o)
            tl.store(p_tail + o_b[None, :], b_tail.to(t_ptr.dtype.element_ty), mask=m_o)
        else:
            tl.store(p_o + o_w[None, :], b_ps.to(o_ptr.dtype.element_ty), mask=m_t[:, None] & (o_w < n1)[None, :])


# lengths change every decode step: no per-value specialisation, so no recompiles mid-decode
@triton.jit(do_not_specialize=["T", "n_src", "n_blk", "k_sel", "k_width", "dense_len", "k_dense"])
def _select_kernel(
    s_ptr, t_ptr, pos_ptr, o_ptr, cnt_ptr, T, n_src, n_blk, k_sel, k_width, dense_len, k_dense,
    s_sh, s_st, s_oh, s_ot, s_ch,
    BR: tl.constexpr, NBP: tl.constexpr, KP: tl.constexpr, R: tl.constexpr, LEFT: tl.constexpr,
    BS: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
    POOLED: tl.constexpr, LOWZERO: tl.constexpr, PER_ROW: tl.constexpr,
):
    i_r, i_h = tl.program_id(0), tl.program_id(1)
    o_r = i_r * BR + tl.arange(0, BR)
    m_r = o_r < T
    pos = tl.load(pos_ptr + o_r, mask=m_r, other=0).to(tl.int32)
    qb = pos // BS  # query's own block
    o_b = tl.arange(0, NBP)
    m_b = o_b < n_blk
    row_off = i_h * s_sh + o_r.to(tl.int64)[:, None] * s_st
    if POOLED:  # load only blocks with a window the row sees (the score kernel skips the others)
        m_rb = m_r[:, None] & m_b[None, :]
        see_own = (o_b * R * ST + KS - 1)[None, :] <= pos[:, None]
        see_tail = ((o_b * R - LEFT) * ST + KS - 1)[None, :] <= pos[:, None]
        b_own = tl.load(s_ptr + row_off + o_b[None, :], mask=m_rb & see_own, other=0.0).to(tl.float32)
        b_prev = tl.load(t_ptr + row_off + (o_b - 1)[None, :], mask=m_rb & see_tail & (o_b >= 1)[None, :], other=0.0)
        b_sc = tl.maximum(b_own, b_prev.to(tl.float32))
    else:
        b_sc = tl.zeros([BR, NBP], dtype=tl.float32)
        for w in tl.static_range(R + LEFT):  # windows [r b - left, r b + r - 1]; scores are >= 0
            i = o_b * R - LEFT + w
            ok = (i >= 0) & (i < n_src) & (i < n_blk * R) & m_b
            b_w = tl.load(s_ptr + row_off + i[None, :], mask=m_r[:, None] & ok[None, :], other=0.0)
            b_sc = tl.maximum(b_sc, b_w.to(tl.float32))
    forced = (o_b[None, :] < INIT) | ((o_b[None, :] >= qb[:, None] - LOCAL) & (o_b[None, :] <= qb[:, None]))
    if PER_ROW:  # decode batch: a row below dense_len attends to all its blocks (k_dense of them at most)
        dense = pos + 1 < dense_len
        forced = forced | dense[:, None]
        k_row = tl.where(dense, k_dense, k_sel)
    else:
        k_row = qb * 0 + k_sel
    b_sc = tl.where(forced, float("inf"), b_sc)
    # monotone in the value for non-negative floats; the low LOWZERO bits are zero for half-precision scores
    val = tl.where(m_b[None, :], b_sc.to(tl.int32, bitcast=True) >> LOWZERO, -1)
    ans = tl.zeros([BR], dtype=tl.int32)
    for it in range(31 - LOWZERO):  # largest threshold with >= k_row values at or above it = the k_row-th value
        cand = ans | (1 << (30 - LOWZERO - it))
        cnt = tl.sum((val >= cand[:, None]).to(tl.int32), axis=1)
        ans = tl.where(cnt >= k_row, cand, ans)
    above = val > ans[:, None]
    tie = val == ans[:, None]
    need = k_row - tl.sum(above.to(tl.int32), axis=1)  # ties at the k-th value: the lowest blocks win (stable sort)
    sel = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= need[:, None]))
    sel = sel & (o_b[None, :] <= qb[:, None])  # future blocks become -1
    rank = tl.cumsum(sel.to(tl.int32), axis=1) - 1  # ascending block order
    out_off = i_h * s_oh + o_r.to(tl.int64)[:, None] * s_ot
    tl.store(o_ptr + out_off + rank, (o_b[None, :] + rank * 0).to(tl.int32), mask=sel & m_r[:, None])
    n_sel = tl.sum(sel.to(tl.int32), axis=1)
    o_k = tl.arange(0, KP)
    m_fill = (o_k[None, :] >= n_sel[:, None]) & (o_k < k_width)[None, :] & m_r[:, None]
    tl.store(o_ptr + out_off + o_k[None, :], tl.full([BR, KP], -1, dtype=tl.int32), mask=m_fill)
    if PER_ROW:
        tl.store(cnt_ptr + i_h * s_ch + o_r, n_sel, mask=m_r)


# GPU launch configuration (tuned on H200 with triton 3.6 at T=32K and 128K; the interpreter uses small tiles
# unless sala.ops.common.launch.gpu_launch_configs() asks for these). Keys:
# rows = tokens x heads per tile, bn = windows per step, warps/stages per kernel, select_elems = max row elements
# per select program, score_steps = most bn-steps per score program (fewer when T is too short to fill the GPU).
GPU_CONFIG = dict(rows=128, bn=64, lse_warps=8, lse_stages=2, score_warps=4, score_stages=2, select_elems=4096,
                  score_steps=32, tma=True)
_INTERP_CONFIG = dict(rows=16, bn=16, lse_warps=4, lse_stages=1, score_warps=4, score_stages=1, select_elems=4096,
                      score_steps=8, tma=True)


def _cfg() -> dict:
    return _INTERP_CONFIG if interpreter_configs() else GPU_CONFIG


def _stage1_tiles(G: int, batched: bool = False) -> tuple[int, int, int]:
    """(GP, BT, BN): rows = BT tokens x GP heads (one token when each row has its own cache slot)."""
    GP = triton.next_power_of_2(G)
    cfg = _cfg()
    return GP, 1 if batched else max(1, cfg["rows"] // GP), cfg["bn"]


_TMA_MIN_QUERIES = 16  # shorter calls (decode) keep pointer loads: building descriptors costs more host time
# than they save (one token at 512K on an H200: 0.414 ms with them, 0.392 without)


def _ck_descriptor(ck: torch.Tensor, rows: int, slot: torch.Tensor | None, n_queries: int):
    """TMA descriptor over compressed keys [n, Hkv, D] (box [rows, D]) where the config and the tensor allow it;
    not for slot caches (each row would need its own) nor for decode-sized calls."""
    if slot is not None or n_queries < _TMA_MIN_QUERIES or not _cfg()["tma"]:
        return None
    return head_block_descriptor(ck, rows)


def _slot_args(ck: torch.Tensor, slot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(per-slot view [n, Hkv, D], slot tensor, slot stride): ``ck`` is [n, Hkv, D] or, with ``slot``, [S, n, Hkv, D]."""
    if slot is None:
        return ck, ck, 0
    return ck[0], slot, ck.stride(0)


def _stage1_lse(q: torch.Tensor, ck2: torch.Tensor, q_pos: torch.Tensor, params: InfLLMv2Params, scale: float,
                slot: torch.Tensor | None = None) -> torch.Tensor:
    """Coarse LSE in log2 units, [T, H] fp32 (-inf where no ck2 window is visible).
    With ``slot`` [T]: ck2 is [S, n2, Hkv, D] and row t reads ck2[slot[t]]."""
    T, H, D = q.shape
    ck2, slot_t, s_cs = _slot_args(ck2, slot)
    n2, Hkv = ck2.shape[0], ck2.shape[1]
    G = H // Hkv
    interp = triton_interpret()
    GP, BT, BN = _stage1_tiles(G, slot is not None)
    n_qt = triton.cdiv(T, BT)
    target = 4 * num_sms(q.device)
    S = max(1, min(target // max(1, n_qt * Hkv), triton.cdiv(n2, 4 * BN)))  # split ck2 only when T is short
    per = triton.cdiv(triton.cdiv(max(n2, 1), S), BN) * BN
    S = triton.cdiv(max(n2, 1), per)
    if S > 1:
        logger.debug("stage-1 LSE split over %d programs per query tile (T=%d too short to fill the GPU)", S, T)
    lse = torch.empty(S, T, H, dtype=torch.float32, device=q.device)
    desc = _ck_descriptor(ck2, BN, slot, T)
    _stage1_lse_kernel[(n_qt, Hkv, S)](
        q, ck2 if desc is None else desc, q_pos, slot_t, lse, T, n2, per,
        q.stride(0), q.stride(1), s_cs, ck2.stride(0), ck2.stride(1), lse.stride(0), lse.stride(1), scale * _LOG2E,
        G=G, GP=GP, BT=BT, D=D, BD=triton.next_power_of_2(D), BN=BN,
        KS=params.coarse_kernel_size, ST=params.coarse_kernel_stride, CAST=interp, PREC=dot_precision(q.dtype),
        BATCHED=slot is not None, TMA=desc is not None, num_warps=_cfg()["lse_warps"], num_stages=_cfg()["lse_stages"],
    )
    if S == 1:
        return lse[0]
    out = torch.empty(T, H, dtype=torch.float32, device=q.device)
    BR = 128
    _merge_lse_kernel[(triton.cdiv(T * H, BR),)](lse, out, S, T * H, BR=BR, num_warps=4)
    return out


@triton.jit(do_not_specialize=["S", "R"])
def _merge_lse_kernel(lse_ptr, out_ptr, S, R, BR: tl.constexpr):
    """log2-sum-exp2 over the S split partials of [S, R] (contiguous) -> [R]; -inf where every part is -inf."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    m_r = o_r < R
    b_m = tl.full([BR], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BR], dtype=tl.float32)
    for s in range(S):
        x = tl.load(lse_ptr + s * R + o_r, mask=m_r, other=float("-inf"))
        m_new = tl.maximum(b_m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        b_l = b_l * tl.exp2(b_m - m_safe) + tl.exp2(x - m_safe)
        b_m = m_new
    out = tl.where(b_l > 0, b_m + tl.log2(tl.where(b_l > 0, b_l, 1.0)), float("-inf"))
    tl.store(out_ptr + o_r, out, mask=m_r)


def _run_scores(q, ck1, q_pos, lse, params, scale, out, tail, n_cols, n_blk, pool: bool, slot=None) -> None:
    T, H, D = q.shape
    ck1, slot_t, s_cs = _slot_args(ck1, slot)
    n1, Hkv = ck1.shape[0], ck1.shape[1]
    G = H // Hkv
    interp = triton_interpret()
    GP, BT, BN = _stage1_tiles(G, slot is not None)
    r, left = _geometry(params) if pool else (1, 0)
    BN = max(BN, r)  # a tile holds whole blocks when pooling
    n_qt = triton.cdiv(T, BT)
    tiles = triton.cdiv(n_cols, BN)
    per = max(1, min(_cfg()["score_steps"], (n_qt * Hkv * tiles) // (4 * num_sms(q.device))))  # split columns for short T
    CW = per * BN
    grid = (n_qt, Hkv, triton.cdiv(n_cols, CW))
    desc = _ck_descriptor(ck1, BN, slot, T)
    _stage1_score_kernel[grid](
        q, ck1 if desc is None else desc, q_pos, slot_t, lse, out, tail, T, n1, n_cols, n_blk,
        q.stride(0), q.stride(1), s_cs, ck1.stride(0), ck1.stride(1), lse.stride(0), out.stride(0), out.stride(1),
        scale * _LOG2E,
        G=G, GP=GP, BT=BT, D=D, BD=triton.next_power_of_2(D), BN=BN, CW=CW,
        KS=params.kernel_size, ST=params.kernel_stride, R=max(r, 1), LEFT=left,
        POOL=pool, CAST=interp, PREC=dot_precision(q.dtype), RNE=interp_rne(out.dtype), BATCHED=slot is not None,
        TMA=desc is not None, num_warps=_cfg()["score_warps"], num_stages=_cfg()["score_stages"],
    )


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _check_stage1(q, ck1, ck2) -> None:
    check_dtype(q, ck1, ck2)
    if q.dim() != 3 or ck1.dim() != 3 or ck2.dim() != 3 or ck1.shape[1:] != ck2.shape[1:] or ck1.shape[2] != q.shape[2]:
        raise ValueError(f"stage 1 wants q [T, H, D], ck1/ck2 [n, Hkv, D]; got {tuple(q.shape)}, {tuple(ck1.shape)}, {tuple(ck2.shape)}")
    if q.shape[1] % ck1.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({ck1.shape[1]})")


def _contig(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def triton_stage1_block_scores(
    q: torch.Tensor, ck1: torch.Tensor, ck2: torch.Tensor, q_pos: torch.Tensor, params: InfLLMv2Params, scale: float
) -> torch.Tensor:
    """Group-summed fine-window scores normalised by the coarse LSE (spec §5.4), as the reference.

    q: [T, H, D]; ck1: [n1, Hkv, D]; ck2: [n2, Hkv, D]; q_pos: [T] -> [Hkv, T, n1]
    (q's dtype for bf16/fp16, else fp32). Invisible windows and queries without a visible ck2 window score 0.
    """
    _check_stage1(q, ck1, ck2)
    T, H, _ = q.shape
    n1, Hkv = ck1.shape[0], ck1.shape[1]
    out = torch.empty(Hkv, T, n1, dtype=_score_dtype(q.dtype), device=q.device)
    if T == 0 or n1 == 0:
        return out.zero_()
    q, ck1, ck2 = _contig(q, ck1, ck2)
    lse = _stage1_lse(q, ck2, q_pos, params, scale)
    _run_scores(q, ck1, q_pos, lse, params, scale, out, out, n1, n1, pool=False)
    return out


_LOW_ZERO_BITS = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}  # of a score's fp32 bit pattern


def _run_select(src, tail, q_pos, num_keys, params, pooled: bool, dense_len: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (topk_idx [Hkv, T, K], counts [Hkv, T] or None). ``dense_len`` (decode batches): rows whose length
    pos + 1 is below it select every block up to their own (K widens to hold them) and counts are written."""
    Hkv, T, n_src = src.shape
    bs = params.block_size
    n_blk = math.ceil(num_keys / bs)
    k_sel = params.num_selected(num_keys)
    k_dense = min(n_blk, math.ceil((dense_len - 1) / bs)) if dense_len else 0
    k_width = max(k_sel, k_dense)
    out = torch.empty(Hkv, T, k_width, dtype=torch.int32, device=src.device)
    counts = torch.zeros(Hkv, T, dtype=torch.int32, device=src.device) if dense_len is not None else None
    if T == 0 or k_width == 0:
        return out, counts
    if n_blk > 65536:  # one program holds a row's block scores in registers
        raise ValueError(f"Triton selection supports up to 65536 blocks ({65536 * bs} keys), got {n_blk}")
    r, left = _geometry(params)
    NBP = triton.next_power_of_2(n_blk)
    BR = max(1, min(16, _cfg()["select_elems"] // NBP))
    warps = 4 if NBP <= 2048 else min(16, NBP // 512)
    _select_kernel[(triton.cdiv(T, BR), Hkv)](
        src, tail, q_pos, out, out if counts is None else counts, T, n_src, n_blk, k_sel, k_width,
        dense_len or 0, k_dense,
        src.stride(0), src.stride(1), out.stride(0), out.stride(1), 0 if counts is None else counts.stride(0),
        BR=BR, NBP=NBP, KP=triton.next_power_of_2(k_width), R=r, LEFT=left, BS=bs,
        KS=params.kernel_size, ST=params.kernel_stride, INIT=params.init_blocks, LOCAL=params.local_blocks, POOLED=pooled,
        LOWZERO=_LOW_ZERO_BITS[src.dtype], PER_ROW=counts is not None, num_warps=warps,
    )
    return out, counts


def triton_precompile_selection(max_keys: int, params: InfLLMv2Params, kv_heads: int, dtype: torch.dtype,
                                device: torch.device, rows: int = 16) -> list[int]:
    """Compile the prefill selection kernel for every block-count class up to ``max_keys`` keys; -> the classes.

    ``NBP`` (the row's block scores held in registers, padded to a power of two) is a compile-time constant, so a
    prefill compiles a new variant each time its key count passes a power of two of blocks: without this, a first
    long request compiled them inside its time to first token (the 128K bench row, issue 15). Triton also
    specialises the kernel's strides on divisibility by 16; they follow the row count T and the block count (the
    lengths themselves are exempt). Each class is launched on dummy rows with T in (rows, rows + 1) and the block
    count at the class's top and one below it, which covers every pattern of full prefill chunks (a multiple of
    16 rows); a prompt's ragged last chunk can still meet one uncompiled pattern. Each variant is compiled once
    per process, or read from Triton's disk cache.
    """
    bs = params.block_size
    n_max = max(1, math.ceil(max_keys / bs))
    score_dtype = _score_dtype(dtype)
    classes: list[int] = []
    nbp = 1
    while True:
        top = min(nbp, n_max)
        for n_blk in sorted({top, max(1, top - 1)}):
            for t in (rows, rows + 1):
                scores = torch.zeros(kv_heads, t, n_blk, dtype=score_dtype, device=device)
                q_pos = torch.full((t,), n_blk * bs - 1, dtype=torch.long, device=device)
                _run_select(scores, scores, q_pos, n_blk * bs, params, pooled=True)
        classes.append(triton.next_power_of_2(top))
        if nbp >= n_max:
            return classes
        nbp *= 2


def triton_select_blocks(scores: torch.Tensor, q_pos: torch.Tensor, num_keys: int, params: InfLLMv2Params) -> torch.Tensor:
    """Max-pool window scores to blocks, force sink + local blocks, take top K_sel (spec §5.5), as the reference.

    scores: [Hkv, T, n1] (fp16/bf16/fp32, >= 0); q_pos: [T]; num_keys: L -> topk_idx [Hkv, T, K_sel] int32,
    ascending, -1 for unused / future slots. Ties break towards the lower block index.
    """
    check_dtype(scores)
    if scores.dim() != 3:
        raise ValueError(f"scores must be [Hkv, T, n1], got {tuple(scores.shape)}")
    (scores,) = _contig(scores)
    return _run_select(scores, scores, q_pos, num_keys, params, pooled=False)[0]


def triton_select_from_queries(
    q: torch.Tensor,
    ck1: torch.Tensor,
    ck2: torch.Tensor,
    q_pos: torch.Tensor,
    num_keys: int,
    params: InfLLMv2Params,
    scale: float,
) -> torch.Tensor:
    """Stage 1 + selection fused: equals ``select_blocks(stage1_block_scores(...))`` without the [Hkv, T, n1] scores.

    The score kernel pools inside the tile and writes per-block maxima ([Hkv, T, n_blocks], twice) in the score
    dtype, so the rounding before top-k is the reference's. q: [T, H, D]; ck1: [n1, Hkv, D]; ck2: [n2, Hkv, D];
    q_pos: [T]; num_keys: L -> topk_idx [Hkv, T, K_sel] int32.
    """
    _check_stage1(q, ck1, ck2)
    own, tail = _pooled_scores(q, ck1, ck2, q_pos, num_keys, params, scale)
    return _run_select(own, tail, q_pos, num_keys, params, pooled=True)[0]


def _pooled_scores(q, ck1, ck2, q_pos, num_keys: int, params: InfLLMv2Params, scale: float, slot=None):
    """Stage 1 pooled inside the score kernel -> (own, tail) [Hkv, T, n_blocks] (see ``_stage1_score_kernel``).
    With ``slot``: ck1/ck2 are [S, n, Hkv, D] slot caches and row t reads slot[t]."""
    T = q.shape[0]
    Hkv = ck1.shape[-2]
    r, _ = _geometry(params)
    n_blk = math.ceil(num_keys / params.block_size)
    own = torch.empty(Hkv, T, n_blk, dtype=_score_dtype(q.dtype), device=q.device)
    tail = torch.empty_like(own)
    if T and n_blk:
        if ck1.shape[-3] == 0:
            own.zero_()
            tail.zero_()
        else:
            q, ck1, ck2 = _contig(q, ck1, ck2)
            lse = _stage1_lse(q, ck2, q_pos, params, scale, slot)
            _run_scores(q, ck1, q_pos, lse, params, scale, own, tail, n_blk * r, n_blk, pool=True, slot=slot)
    return own, tail


def triton_select_decode_batch(
    q: torch.Tensor,
    ck1: torch.Tensor,
    ck2: torch.Tensor,
    slot: torch.Tensor,
    q_pos: torch.Tensor,
    num_keys: int,
    params: InfLLMv2Params,
    scale: float,
    dense_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 + selection for one decode token per row, each row in its own cache slot; graph-safe.

    q: [N, H, D]; ck1/ck2: [S, n1|n2, Hkv, D] (slot caches; windows complete by q_pos[t] must be present);
    slot, q_pos: [N]; num_keys: the slot capacity (positions beyond q_pos are never selected). Rows with
    q_pos + 1 < dense_len select all their blocks. -> (topk_idx [Hkv, N, K] int32 ascending, counts [Hkv, N]).
    Shapes depend only on N and the cache shapes, and nothing syncs with the host.
    """
    if ck1.dim() != 4 or ck2.dim() != 4 or slot.shape != (q.shape[0],):
        raise ValueError(f"decode batch wants ck1/ck2 [S, n, Hkv, D] and slot [N]; got {tuple(ck1.shape)}, "
                         f"{tuple(ck2.shape)}, {tuple(slot.shape)}")
    _check_stage1(q, ck1[0], ck2[0])
    own, tail = _pooled_scores(q, ck1, ck2, q_pos, num_keys, params, scale, slot)
    return _run_select(own, tail, q_pos, num_keys, params, pooled=True, dense_len=dense_len)
