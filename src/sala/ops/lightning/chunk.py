"""Triton chunked Lightning attention (prefill forward and backward), spec §4.3.

Per head, with gamma = exp(-slope) and the fp32 state S [K, V]::

    S_t = gamma * S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

Design (no per-chunk states in HBM, unlike fla's ``chunk_fwd_h`` which writes [B, NT, H, K, V]):

* Every sequence is cut into segments of ``seg_chunks`` chunks of BT = 64 tokens, so that
  (segments x heads x V tiles) programs fill the GPU even at batch 1.
* ``_segment_state_kernel`` computes, for every segment but the last of each sequence, the state
  that segment alone contributes (dS, from zero). Only these few [K, V] tiles reach HBM.
* ``_chunk_out_kernel``: one program per (segment, head, V tile) folds the initial state and the
  dS of the earlier segments into its starting state, then walks its chunks in order, keeping S in
  registers: intra-chunk attention with ``tl.dot`` on the decay-masked q k^T, inter-chunk with q S.
  The last segment of each sequence stores the final state.

The same two kernels run in reverse time (``REVERSE``), which gives the backward without any saved
activations (derivation: G_t = dL/dS_t = scale * sum_{i>=t} gamma^(i-t) q_i^T do_i + gamma^(T-1-t) dS_T)::

    dq = forward (a=do, b=v, c=k, initial state S0^T)
    dk = reverse (a=v, b=do, c=q, initial state (dS_T / (scale*gamma))^T)
    dv = reverse (a=k, b=q, c=do, initial state  dS_T / (scale*gamma));  dS0 = scale*gamma*final

where "forward (a, b, c, S0)" is out_t = scale * (sum_{j<=t} gamma^(t-j) (a_t . b_j) c_j + gamma^(t+1) a_t S0).

Precision: 16-bit inputs feed ``tl.dot`` in their own dtype (the fp32 state and decay-masked scores
are rounded to it for the dot) with fp32 accumulation, like fla. fp32 inputs use 3xTF32 dots (about
fp32 accuracy on tensor cores, but register-heavy and several times slower than bf16): pass bf16 q/k/v
when they are bf16 values anyway (spec §4.1). fp64 inputs fall back to the PyTorch reference. Under
the CPU interpreter (``TRITON_INTERPRET=1``) all dots run in fp32, with a fixed small launch plan (64-wide V
tiles, 2-chunk segments) unless ``sala.ops.common.launch.gpu_launch_configs()`` asks for the GPU's (the tuner's
candidates, segments sized for the emulated SM count).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
import triton.testing
from triton.runtime.errors import OutOfResources

from sala.ops.common.fallback import log_fp64_fallback, map_sequences
from sala.ops.common.launch import gpu_plan, num_sms
from sala.ops.common.tuning import TuningCache, device_signature
from sala.utils.env import triton_interpret

logger = logging.getLogger(__name__)

BT = 64  # chunk size (tokens)


@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    """acc + a @ b with fp32 accumulation; fp32 operands use 3xTF32 (about fp32 accuracy on tensor cores)."""
    if F32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _segment_state_kernel(
    b_ptr,  # [total, H, DK]
    c_ptr,  # [total, H, DV]
    slopes,  # [H]
    dstate,  # [S, H, DK, DV] fp32, S = number of non-last segments
    work,  # [S, 4] int32: (sequence, first token, tokens, slot)
    cu,  # [N+1]
    H,
    SEG_TOK,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DT: tl.constexpr,
    F32: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """dS = sum_j gamma^(L-1-j) b_j^T c_j over one full, non-last segment of L = SEG_TOK tokens."""
    i_kv, i_h, i_w = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = triton.cdiv(DV, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_n = tl.load(work + i_w * 4)
    tok0 = tl.load(work + i_w * 4 + 1)
    slot = tl.load(work + i_w * 4 + 3)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    g = -tl.load(slopes + i_h).to(tl.float32)  # natural-log decay, spec §4.2

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV
    d_k = tl.exp(g * (BT - 1 - o_t).to(tl.float32))  # [BT] decay of token j to the chunk end
    d_chunk = tl.exp(g * BT)

    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    for i_c in range(0, SEG_TOK // BT):
        t = tok0 + i_c * BT + o_t  # [BT] time within the sequence (reversed time if REVERSE)
        if REVERSE:
            rows = eos - 1 - t
        else:
            rows = bos + t
        rows = rows * H + i_h
        b_b = tl.load(b_ptr + rows[:, None] * DK + o_k[None, :], mask=m_k[None, :], other=0.0).to(tl.float32)
        b_c = tl.load(c_ptr + rows[:, None] * DV + o_v[None, :], mask=m_v[None, :], other=0.0).to(DT)
        b_bd = (b_b * d_k[:, None]).to(DT)
        b_s = _dot(tl.trans(b_bd), b_c, b_s * d_chunk, F32)  # [BK, BT] @ [BT, BV]
    p_s = dstate + ((slot * H + i_h).to(tl.int64) * DK + o_k[:, None]) * DV + o_v[None, :]
    tl.store(p_s, b_s, mask=m_k[:, None] & m_v[None, :])


@triton.jit
def _chunk_out_kernel(
    a_ptr,  # [total, H, DK]  (q in the forward)
    b_ptr,  # [total, H, DK]  (k)
    c_ptr,  # [total, H, DV]  (v)
    o_ptr,  # [total, H, DV]
    slopes,  # [H]
    s0,  # [N, H, DK, DV] or None
    dstate,  # [S, H, DK, DV] fp32 or None
    sfinal,  # [N, H, DK, DV] fp32 or None
    work,  # [W, 4] int32: (sequence, first token, tokens, first dS slot of the sequence)
    cu,  # [N+1]
    scale,
    H,
    SEG_TOK,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DT: tl.constexpr,
    F32: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_FOLD: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    """o_t = scale * (sum_{j<=t} gamma^(t-j) (a_t . b_j) c_j + gamma^(t+1) a_t S0) over one segment."""
    i_v, i_h, i_w = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(work + i_w * 4)
    tok0 = tl.load(work + i_w * 4 + 1)
    ntok = tl.load(work + i_w * 4 + 2)
    slot0 = tl.load(work + i_w * 4 + 3)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    g = -tl.load(slopes + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < DK
    m_v = o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * DV + o_v[None, :]  # offsets inside one [DK, DV] state

    # starting state: S0 decayed over tok0 tokens plus the earlier segments' dS (spec §4.3 chunked form)
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_INIT:
        b_s = tl.load(s0 + (i_n * H + i_h).to(tl.int64) * DK * DV + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    if HAS_FOLD:
        d_seg = tl.exp(g * SEG_TOK)
        for i_f in range(0, tok0 // SEG_TOK):
            p_d = dstate + ((slot0 + i_f) * H + i_h).to(tl.int64) * DK * DV + o_kv
            b_s = b_s * d_seg + tl.load(p_d, mask=m_kv, other=0.0)

    dist = (o_t[:, None] - o_t[None, :]).to(tl.float32)
    d_intra = tl.where(o_t[:, None] >= o_t[None, :], tl.exp(g * dist), 0.0)  # [BT, BT] gamma^(i-j), causal
    d_q = tl.exp(g * (o_t + 1).to(tl.float32))  # [BT] gamma^(i+1)
    seg_end = tok0 + ntok
    for i_c in range(0, tl.cdiv(ntok, BT)):
        t0 = tok0 + i_c * BT
        t = t0 + o_t
        m_t = t < seg_end
        if REVERSE:
            rows = eos - 1 - t
        else:
            rows = bos + t
        rows = rows * H + i_h
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_a = tl.load(a_ptr + rows[:, None] * DK + o_k[None, :], mask=m_tk, other=0.0).to(DT)
        b_b = tl.load(b_ptr + rows[:, None] * DK + o_k[None, :], mask=m_tk, other=0.0).to(DT)
        b_c = tl.load(c_ptr + rows[:, None] * DV + o_v[None, :], mask=m_tv, other=0.0).to(DT)

        b_s16 = b_s.to(DT)  # state before this chunk, as a dot operand
        # state update first, accumulating in place so no second [BK, BV] tile is live
        n_in = tl.minimum(seg_end - t0, BT)  # tokens in this chunk (the last one may be partial)
        d_k = tl.where(m_t, tl.exp(g * (n_in - 1 - o_t).to(tl.float32)), 0.0)  # gamma^(n-1-j)
        b_bd = (b_b.to(tl.float32) * d_k[:, None]).to(DT)
        b_s = _dot(tl.trans(b_bd), b_c, b_s * tl.exp(g * n_in.to(tl.float32)), F32)  # [DK, BT] @ [BT, BV]

        b_o = _dot(b_a, b_s16, tl.zeros([BT, BV], dtype=tl.float32), F32) * d_q[:, None]  # [BT, DK] @ [DK, BV]
        b_A = _dot(b_a, tl.trans(b_b), tl.zeros([BT, BT], dtype=tl.float32), F32) * d_intra  # [BT, DK] @ [DK, BT]
        b_o = _dot(b_A.to(DT), b_c, b_o, F32)  # [BT, BT] @ [BT, BV]
        tl.store(o_ptr + rows[:, None] * DV + o_v[None, :], (b_o * scale).to(o_ptr.dtype.element_ty), mask=m_tv)

    if STORE_FINAL:
        k_lim = tl.where(seg_end == eos - bos, DK, 0)  # only the sequence's last segment stores
        p_f = sfinal + (i_n * H + i_h).to(tl.int64) * DK * DV + o_kv
        tl.store(p_f, b_s, mask=(o_k[:, None] < k_lim) & m_v[None, :])


# ----------------------------------------------------------------------------------------------
# launch plan: segments, configs, a small cached tuner
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    """Launch parameters of ``_chunk_out_kernel``; ``waves`` x SMs programs is the segment target."""

    bv: int
    num_warps: int
    num_stages: int
    waves: int = 2


@dataclass(frozen=True)
class _SegConfig:
    """Launch parameters of ``_segment_state_kernel`` (a [bk, bv] tile of dS per program)."""

    bk: int
    bv: int
    num_warps: int
    num_stages: int


_GPU_CONFIGS = {  # candidates by dot dtype class; the first is the default for small problems
    "16bit": (
        _Config(64, 4, 2),
        _Config(64, 4, 3),
        _Config(64, 4, 1),
        _Config(64, 8, 2),
        _Config(128, 8, 2),
        _Config(32, 4, 2),
        _Config(64, 4, 2, waves=4),
    ),
    "fp32": (_Config(32, 4, 2), _Config(16, 4, 2), _Config(32, 8, 2)),
}
_SEG_CONFIGS = {  # memory-bound: vary the bytes in flight
    "16bit": (
        _SegConfig(64, 64, 4, 2),
        _SegConfig(64, 64, 4, 3),
        _SegConfig(64, 64, 4, 4),
        _SegConfig(128, 64, 4, 3),
        _SegConfig(64, 128, 4, 3),
        _SegConfig(128, 128, 8, 2),
    ),
    "fp32": (_SegConfig(64, 64, 4, 2), _SegConfig(64, 64, 4, 3)),
}
_TUNE_MIN_TOKENS = 1 << 17  # below total tokens x heads, take the default config: tuning would cost more
_MAX_SEGMENTS = 64  # per sequence: bounds the quadratic cost of folding dS
_BEST = TuningCache("lightning_chunk", lambda: device_signature(torch.device("cuda")))
_BEST_SEG = TuningCache("lightning_segment", lambda: device_signature(torch.device("cuda")))
_INTERP_CONFIG = _Config(64, 4, 1)  # the interpreter's fixed plan (with 2-chunk segments) outside gpu_launch_configs()
_INTERP_SEG_CHUNKS = 2


def _choose_seg_chunks(lens: tuple[int, ...], programs_per_segment: int, target_programs: int) -> int:
    """Segment length (chunks) so that about ``target_programs`` programs run, split evenly.

    Only the last segment of a sequence skips ``_segment_state_kernel``, so fewer, equal segments
    move fewer bytes; ``target_programs`` (a multiple of the SM count) sets how many are needed.
    """
    chunks = [triton.cdiv(n, BT) for n in lens]
    longest = max(chunks + [1])
    n_target = max(1, target_programs // programs_per_segment)
    seg = triton.cdiv(max(sum(chunks), 1), n_target)
    seg = max(seg, triton.cdiv(longest, _MAX_SEGMENTS), 4)
    return triton.cdiv(longest, triton.cdiv(longest, seg))  # even split of the longest sequence


@functools.lru_cache(maxsize=64)
def _work_tables(lens: tuple[int, ...], seg_tok: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-segment rows (sequence, first token, tokens, dS slot) for both kernels, on ``device``.

    ``work_out`` has every segment (an empty sequence still gets one, to write its final state);
    ``work_seg`` only the non-last ones, whose dS slots are numbered contiguously per sequence.
    """
    work_out, work_seg = [], []
    for n, length in enumerate(lens):
        first_slot = len(work_seg)
        for tok0 in range(0, max(length, 1), seg_tok):
            ntok = min(seg_tok, length - tok0)
            work_out.append((n, tok0, max(ntok, 0), first_slot))
            if tok0 + ntok < length:
                work_seg.append((n, tok0, ntok, len(work_seg)))
    out = torch.tensor(work_out, dtype=torch.int32).to(device)
    seg = torch.tensor(work_seg or [(0, 0, 0, 0)], dtype=torch.int32).to(device)
    return out, seg, len(work_seg)


@functools.lru_cache(maxsize=64)
def _uniform_cu(batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32).to(device)


def _gpu_dot_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Dot operand dtype on a GPU: 16-bit when all inputs share one 16-bit dtype, else fp32 (it also picks the
    launch config class, in the interpreter too)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and dtypes <= {torch.float16, torch.bfloat16}:
        return dtypes.pop()
    return torch.float32


def _dot_dtype(*tensors: torch.Tensor) -> tuple[torch.dtype, bool]:
    """Dot operand dtype and whether it is fp32: ``_gpu_dot_dtype``, but fp32 in the interpreter (its bf16 dots
    are wrong)."""
    if triton_interpret():
        return torch.float32, True
    dt = _gpu_dot_dtype(*tensors)
    return dt, dt == torch.float32


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _pick(cache: TuningCache, key: tuple | None, candidates: tuple, run) -> object:
    """Fastest candidate for ``key``, timed once with CUDA events and remembered (also across processes, see
    :mod:`sala.ops.common.tuning`); the first when ``key`` is None."""
    if key is None:
        return candidates[0]
    return cache.pick(key, candidates, lambda cand: triton.testing.do_bench(lambda: run(cand), warmup=5, rep=20),
                      skip=(OutOfResources,))


def _lightning_pass(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    s0: torch.Tensor | None,
    out_dtype: torch.dtype,
    lens: tuple[int, ...],
    cu: torch.Tensor,
    store_final: bool,
    reverse: bool,
    seg_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One generic pass: a, b [1 or B, T, H, DK], c [.., DV] -> out [.., DV], final [N, H, DK, DV] fp32."""
    H, DK, DV = a.shape[2], a.shape[3], c.shape[3]
    out = torch.empty(*c.shape, dtype=out_dtype, device=c.device)
    final = torch.empty(len(lens), H, DK, DV, dtype=torch.float32, device=c.device) if store_final else None
    dt, f32 = _dot_dtype(a, b, c)
    cls = "fp32" if _gpu_dot_dtype(a, b, c) == torch.float32 else "16bit"
    on_gpu = gpu_plan(c.device)  # the GPU's plan: compiled, or emulated by the interpreter
    # tune per shape class on the GPU, for problems big enough to be worth it (never in the interpreter)
    key = None
    if on_gpu and not triton_interpret() and sum(lens) * H >= _TUNE_MIN_TOKENS:
        key = (c.device.index, H, DK, DV, dt, reverse, s0 is not None, len(lens) > 1,
               triton.next_power_of_2(sum(lens)))  # fmt: skip

    def plan(cfg: _Config) -> tuple[int, int, int, torch.Tensor, torch.Tensor, int]:
        bv = max(16, min(cfg.bv, triton.next_power_of_2(DV)))
        nv = triton.cdiv(DV, bv)
        if seg_chunks is not None:
            seg = seg_chunks
        elif not on_gpu:
            seg = _INTERP_SEG_CHUNKS
        else:
            seg = _choose_seg_chunks(lens, H * nv, cfg.waves * num_sms(c.device))
        return (bv, nv, seg * BT, *_work_tables(lens, seg * BT, c.device))

    def run_seg(p, scfg: _SegConfig, dstate: torch.Tensor) -> None:
        _, _, seg_tok, _, work_seg, n_seg = p
        sbk = max(16, min(scfg.bk, triton.next_power_of_2(DK)))
        sbv = max(16, min(scfg.bv, triton.next_power_of_2(DV)))
        _segment_state_kernel[(triton.cdiv(DK, sbk) * triton.cdiv(DV, sbv), H, n_seg)](
            b, c, slopes, dstate, work_seg, cu, H, seg_tok,
            DK=DK, DV=DV, BT=BT, BK=sbk, BV=sbv, DT=_TL_DTYPE[dt], F32=f32, REVERSE=reverse,
            num_warps=scfg.num_warps, num_stages=scfg.num_stages,
        )  # fmt: skip

    def launch(cfg: _Config, scfg: _SegConfig | None = None) -> None:
        p = plan(cfg)
        bv, nv, seg_tok, work_out, _, n_seg = p
        dstate = None
        if n_seg > 0:
            dstate = torch.empty(n_seg, H, DK, DV, dtype=torch.float32, device=c.device)
            run_seg(p, scfg or _SEG_CONFIGS[cls][0], dstate)
        _chunk_out_kernel[(nv, H, work_out.shape[0])](
            a, b, c, out, slopes, s0, dstate, final, work_out, cu, scale, H, seg_tok,
            DK=DK, DV=DV, BT=BT, BK=max(16, triton.next_power_of_2(DK)), BV=bv, DT=_TL_DTYPE[dt], F32=f32,
            REVERSE=reverse, HAS_INIT=s0 is not None, HAS_FOLD=n_seg > 0, STORE_FINAL=store_final,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    if not on_gpu:
        launch(_INTERP_CONFIG)
        return out, final
    cfg = _pick(_BEST, key, _GPU_CONFIGS[cls], launch)
    p = plan(cfg)
    scfg = None
    if key is not None and p[-1] > 0:  # then tune the segment kernel alone for the chosen plan
        scratch = torch.empty(p[-1], H, DK, DV, dtype=torch.float32, device=c.device)
        scfg = _pick(_BEST_SEG, key, _SEG_CONFIGS[cls], lambda sc: run_seg(p, sc, scratch))
    launch(cfg, scfg)
    return out, final


# ----------------------------------------------------------------------------------------------
# autograd and entry
# ----------------------------------------------------------------------------------------------


class _ChunkLightningFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, initial_state, lens, cu, out_dtype, seg_chunks):
        o, final = _lightning_pass(q, k, v, slopes, scale, initial_state, out_dtype, lens, cu, True, False, seg_chunks)
        ctx.set_materialize_grads(False)  # an unused final state gives dfinal=None: reverse passes start at zero
        ctx.save_for_backward(q, k, v, slopes, initial_state)
        ctx.scale, ctx.lens, ctx.cu, ctx.seg_chunks, ctx.out_dtype = scale, lens, cu, seg_chunks, out_dtype
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, slopes, h0 = ctx.saved_tensors
        scale, lens, cu, seg = ctx.scale, ctx.lens, ctx.cu, ctx.seg_chunks
        dq = None
        if do is None:  # only the final state was used: q has no gradient
            do = torch.zeros(*v.shape, dtype=ctx.out_dtype, device=v.device)
        else:
            do = do.contiguous()
            s0_t = None if h0 is None else h0.transpose(-1, -2).contiguous()
            dq, _ = _lightning_pass(do, v, k, slopes, scale, s0_t, q.dtype, lens, cu, False, False, seg)
        m = None
        if dfinal is not None:
            # reverse-time pass starts from dS_T / (scale * gamma) (module docstring)
            coef = scale * torch.exp(-slopes.to(torch.float32))  # [H]
            m = dfinal.to(torch.float32) / coef[None, :, None, None]
        m_t = None if m is None else m.transpose(-1, -2).contiguous()
        dk, _ = _lightning_pass(v, do, q, slopes, scale, m_t, k.dtype, lens, cu, False, True, seg)
        need_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dv, fin = _lightning_pass(k, q, do, slopes, scale, m, v.dtype, lens, cu, need_dh0, True, seg)
        dh0 = None
        if need_dh0:
            coef = scale * torch.exp(-slopes.to(torch.float32))
            dh0 = (fin * coef[None, :, None, None]).to(h0.dtype)
        return dq, dk, dv, None, None, dh0, None, None, None, None


def triton_chunk_lightning(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    output_dtype: torch.dtype,
    *,
    seg_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning prefill with Triton; same contract as ``sala.ops.lightning.chunk_lightning``.

    q, k: [B, T, H, K]; v: [B, T, H, V]; slopes: [H]; initial_state: [N, H, K, V] or None;
    cu_seqlens: [N+1] (B = 1) or None -> o: [B, T, H, V] in ``output_dtype``, final_state: [N, H, K, V] fp32 or None.
    Differentiable in q, k, v and initial_state. ``seg_chunks`` forces the segment length in chunks of 64
    (tests); by default it is chosen to fill the GPU.
    """
    if q.dtype == torch.float64 or k.dtype == torch.float64 or v.dtype == torch.float64:
        log_fp64_fallback("lightning chunk", "Triton kernels compute in fp32")
        from sala.ops.lightning.naive import naive_chunk_lightning

        return _naive_varlen(naive_chunk_lightning, q, k, v, slopes, scale, initial_state, output_final_state,
                             cu_seqlens, output_dtype)  # fmt: skip
    B, T = q.shape[:2]
    if cu_seqlens is None:
        lens = (T,) * B
        cu = _uniform_cu(B, T, q.device)
    else:
        bounds = cu_seqlens.tolist()
        lens = tuple(e - s for s, e in zip(bounds, bounds[1:]))
        cu = cu_seqlens.to(q.device)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    slopes = slopes.to(q.device)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, initial_state)
    )
    if grads:
        o, final = _ChunkLightningFn.apply(q, k, v, slopes, scale, initial_state, lens, cu, output_dtype, seg_chunks)
    else:
        o, final = _lightning_pass(q, k, v, slopes, scale, initial_state, output_dtype, lens, cu,
                                   output_final_state, False, seg_chunks)  # fmt: skip
    return o, (final if output_final_state else None)


def _naive_varlen(fn, q, k, v, slopes, scale, h0, output_final_state, cu_seqlens, out_dtype):
    if cu_seqlens is None:
        o, final = fn(q, k, v, slopes, scale, h0)
    else:
        o, final = map_sequences(lambda q_, k_, v_, h0_: fn(q_, k_, v_, slopes, scale, h0_),
                                 cu_seqlens, (q, k, v), (h0,))  # fmt: skip
    return o.to(out_dtype), (final if output_final_state else None)
