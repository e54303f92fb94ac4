"""Triton FP8 kernels: group-scale GEMM ``out = sum_g (Aq_g @ Bq_g^T) * a_scale[:, g] * b_scale[:, g]`` and the
one-pass activation quantiser.

A [M, K] float8_e4m3fn (activations, one scale per token and group of ``GROUP`` columns), B [N, K] float8_e4m3fn
(weight, one scale per output channel and group). Each K step (a group, or 128 columns of a larger one): the fp8
``tl.dot`` accumulates its products in fp32, its group's two scales multiply that partial sum, and the running sum
stays fp32. This is DeepSeek-V3's fine-grained FP8 (promote out of the tensor cores, whose fp8 accumulation keeps
fewer bits, every <= 128 columns) with 1 x GROUP weight groups instead of 128 x 128 blocks. A ragged last group is
masked. No autotuning: the launch plan depends on M, N and K only, so the first call compiles one kernel and times
nothing (a server's first request pays no tuning).

Decode-sized M (<= 16 rows) reads the weight once and little else, so two things matter there:
* the activations are quantised inside the GEMM (``QUANT_A``, groups of <= 128: one group per K step) instead of
  by a separate pass; every CTA re-quantises the same few rows, which costs little next to its weight tile as long
  as the codes take no per-element ``div_rn`` (its slow-path call in the K loop made these GEMMs 1.4-2.8x slower on
  an H100: :func:`_quotient` divides exactly with one reciprocal per row);
* K is split over CTAs when N alone gives too few tiles to keep every SM streaming weights (split-K); the fp32
  partial sums are added by one reduction.
Larger M quantises its activations with :func:`triton_quantize_groups`: one read of x, one write of the codes and
scales (the PyTorch reference makes about eight passes over an fp32 copy).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sala.ops.common.triton_utils import interp_rne, rne_bf16
from sala.ops.elementwise import GLUE_OPS, fused
from sala.ops.elementwise.fused import glue_value
from sala.ops.fp8.naive import FP8_MAX
from sala.utils import env
from sala.utils.env import triton_interpret


@triton.jit
def _to_e4m3(x, RNE: tl.constexpr):
    """fp32 (within +-448) -> float8 e4m3, rounded to nearest even. ``RNE``: round in fp32 first, for the CPU
    interpreter, whose fp8 casts truncate: 3 mantissa bits for normals (|x| >= 2^-6), steps of 2^-9 below."""
    if RNE:
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        ax = tl.abs(x)
        sub = ((ax * 512.0 + 12582912.0) - 12582912.0) / 512.0  # 1.5 * 2^23: fp32 addition rounds to an integer
        x = tl.where(ax >= 0.015625, normal, tl.where(bits < 0, -sub, sub))  # the sign bit: -0 stays -0
    return x.to(tl.float8e4nv)


@triton.jit
def _scale_of(amax, FP8_MAX_: tl.constexpr):
    """A group's scale from its absmax, as ``quantize_groups``: absmax * fp32(1 / 448), 1 where that is 0 (an all-zero
    group, or an absmax below 224 * 2^-149 whose product underflows)."""
    scale = amax * (1.0 / FP8_MAX_)
    return tl.where(scale > 0, scale, 1.0)


@triton.jit
def _quotient(x, scale):
    """x [R, C] / scale [R] (scale > 0) rounded as IEEE division, from one ``div_rn`` per row: Triton's ``/`` is
    approximate on NVIDIA GPUs (up to 2 ulp off, which moves codes on an e4m3 rounding midpoint), and ``div_rn`` per
    element calls a slow-path subroutine inside the decode GEMM's K loop. With y = RN(1/s) and q0 = RN(x * y), the
    remainder r = x - q0 * s is exact in an FMA, and RN(q0 + r * y) is RN(x / s) unless something underflows (the
    final error is (x/s - q0)(s*y - 1): q0 may be more than 1 ulp off only far from a rounding midpoint). Rows with
    a scale below 2^-32 are first multiplied by 2^100 on both sides (exact; nothing overflows: s * 2^100 < 2^68), so
    an underflow can only touch quotients below 2^-70, whose e4m3 code is a signed zero either way; that zero takes
    q0's sign (x's), as the division would. Checked against numpy's division with an exact FMA on every bf16
    (absmax, x) pair and billions of targeted fp32 cases (all-ones significands, midpoints, subnormal scales)."""
    up = tl.where(scale < 2.3283064365386963e-10, 1.2676506002282294e30, 1.0)  # 2^-32 -> 2^100
    s = scale * up
    y = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    xs = x * up[:, None]
    q0 = xs * y[:, None]
    q = tl.math.fma(tl.math.fma(-q0, s[:, None], xs), y[:, None], q0)
    return tl.where(q0 == 0.0, q0, q)


@triton.jit
def _codes(x, scale, FP8_MAX_: tl.constexpr, RNE: tl.constexpr):
    """x [R, C] fp32, scale [R] -> e4m3 codes of clamp(x / scale, +-448), x / scale rounded as IEEE division."""
    return _to_e4m3(tl.minimum(tl.maximum(_quotient(x, scale), -FP8_MAX_), FP8_MAX_), RNE)


@triton.jit
def _quantize_tile(x, FP8_MAX_: tl.constexpr, RNE: tl.constexpr):
    """x [R, C] fp32, one group per row -> (codes [R, C] fp8 e4m3, scale [R] fp32), as ``quantize_groups``."""
    scale = _scale_of(tl.max(tl.abs(x), axis=1), FP8_MAX_)
    return _codes(x, scale, FP8_MAX_, RNE), scale


@triton.jit
def _load_activation(x_ptr, y_ptr, rows, k, ok, s_xm, s_ym, GLUE: tl.constexpr, RNE_X: tl.constexpr,
                     ACCURATE: tl.constexpr):
    """The activation tile [rows, k] in fp32: x itself (``GLUE`` < 0), or the elementwise glue of x and y whose
    result the linear reads (SILU_MUL: silu(x) * y, SIGMOID_GATE: x * sigmoid(y)), rounded to x's dtype as the glue
    kernel stores it (``RNE_X``: by hand, for bf16 in the interpreter)."""
    x = tl.load(x_ptr + rows[:, None] * s_xm + k[None, :], mask=ok, other=0.0).to(tl.float32)
    if GLUE >= 0:
        y = tl.load(y_ptr + rows[:, None] * s_ym + k[None, :], mask=ok, other=0.0).to(tl.float32)
        x = glue_value(x, y, 1.0, GLUE, x_ptr.dtype.element_ty, RNE_X, ACCURATE)
    return x


@triton.jit(do_not_specialize=["M", "K", "group"])
def _quantize_groups_kernel(x_ptr, y_ptr, q_ptr, s_ptr, M, K, group, s_xm, s_ym, s_qm, s_sm, s_sg,
                            BR: tl.constexpr, BC: tl.constexpr, FP8_MAX_: tl.constexpr,
                            RNE: tl.constexpr, GLUE: tl.constexpr, RNE_X: tl.constexpr, ACCURATE: tl.constexpr):
    """One program per BR rows x one group of ``group`` columns (row-wise scales: group = K): a pass for the absmax
    (when the group is wider than BC), a pass for the codes. The activation is x, or glue(x, y) (see
    :func:`_load_activation`): the glue's output is then never written."""
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = (pid_r * BR + tl.arange(0, BR)).to(tl.int64)
    r_ok = rows < M
    k0 = g.to(tl.int64) * group
    cols = tl.arange(0, BC)
    if BC >= group:  # the whole group in one tile: one read
        k = k0 + cols
        ok = r_ok[:, None] & ((cols < group) & (k < K))[None, :]
        x = _load_activation(x_ptr, y_ptr, rows, k, ok, s_xm, s_ym, GLUE, RNE_X, ACCURATE)
        q, scale = _quantize_tile(x, FP8_MAX_, RNE)
        tl.store(q_ptr + rows[:, None] * s_qm + k[None, :], q, mask=ok)
    else:
        amax = tl.zeros((BR,), dtype=tl.float32)
        for c in range(0, group, BC):
            k = k0 + c + cols
            ok = r_ok[:, None] & (((c + cols) < group) & (k < K))[None, :]
            x = _load_activation(x_ptr, y_ptr, rows, k, ok, s_xm, s_ym, GLUE, RNE_X, ACCURATE)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        scale = _scale_of(amax, FP8_MAX_)
        for c in range(0, group, BC):
            k = k0 + c + cols
            ok = r_ok[:, None] & (((c + cols) < group) & (k < K))[None, :]
            x = _load_activation(x_ptr, y_ptr, rows, k, ok, s_xm, s_ym, GLUE, RNE_X, ACCURATE)
            tl.store(q_ptr + rows[:, None] * s_qm + k[None, :], _codes(x, scale, FP8_MAX_, RNE), mask=ok)
    tl.store(s_ptr + rows * s_sm + g * s_sg, scale, mask=r_ok)


QUANT_TILE = (512, 1)
"""The quantiser's (elements per program, warps) on a GPU: 4 rows of a group of 128 per one-warp program ran at
1.63-1.85 TB/s at M = 8,192 on the 9B projections, against 1.30-1.40 for (1024, 2), the earlier default, and at most
1.65 for programs holding 4-8 whole groups (a variant tried and dropped; H100, ``benchmarks/kernels.py --only fp8``).
It took the fp8 TTFT at 256K from 8.74 to 8.18 s on that card. An H200 sweep with the earlier per-element division
had ranked (1024, 2) first."""

GLUES = {op: getattr(fused, op.upper()) for op in GLUE_OPS}
"""Elementwise glue the quantiser can apply first: ``sala.ops.elementwise`` entries -> the glue kernel's op codes
(``SILU_MUL``, ``SIGMOID_GATE``)."""


def triton_quantize_groups(x: torch.Tensor, group_size: int | None, scales_column_major: bool = False,
                           tile: tuple[int, int] | None = None,
                           glue: tuple[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (q [M, K] float8_e4m3fn, scale [M, G] float32) in one pass; the same numbers as
    ``sala.ops.fp8.naive.quantize_groups`` (G = 1 for row-wise scales, ``group_size=None``).
    ``scales_column_major``: scale strides (1, M), the layout cuBLAS block scaling reads. ``tile``: (elements per
    program, warps), for benchmarks comparing launch shapes (default :data:`QUANT_TILE` on a GPU); the numbers do not
    depend on it. ``glue=(name, y)``: quantise ``name(x, y)`` (a :data:`GLUES` entry, y like x) as the Triton glue
    kernel computes it, without writing it out: the codes of ``quantize_groups(silu_mul(x, y))``."""
    if x.dim() != 2:
        raise ValueError(f"triton_quantize_groups wants x [M, K]; got {tuple(x.shape)}")
    M, K = x.shape
    group = K if group_size is None else group_size
    groups = triton.cdiv(K, group)
    x = x if x.stride(-1) == 1 else x.contiguous()
    op, y = -1, x
    if glue is not None:
        name, y = glue
        if name not in GLUES or y.shape != x.shape or y.dtype != x.dtype:
            raise ValueError(f"triton_quantize_groups glue wants one of {sorted(GLUES)} and y of x's shape and dtype "
                             f"{tuple(x.shape)} {x.dtype}; got {name!r}, {tuple(y.shape)} {y.dtype}")
        op, y = GLUES[name], y if y.stride(-1) == 1 else y.contiguous()
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = (torch.empty(groups, M, dtype=torch.float32, device=x.device).t() if scales_column_major else
             torch.empty(M, groups, dtype=torch.float32, device=x.device))
    if M == 0 or K == 0:
        return q, scale.fill_(1.0)
    interpret = triton_interpret()  # small tiles: the interpreter's cost grows with tile size
    elements, warps = tile or ((256, 1) if interpret else QUANT_TILE)
    bc = min(64 if interpret else 512, triton.next_power_of_2(group))
    br = max(1, elements // bc)
    # no FP fusion with a glue: its rounding points are the glue kernel's (see glue_value)
    _quantize_groups_kernel[(triton.cdiv(M, br), groups)](
        x, y, q, scale, M, K, group, x.stride(0), y.stride(0), q.stride(0), scale.stride(0), scale.stride(1), BR=br,
        BC=bc, FP8_MAX_=FP8_MAX, RNE=interpret, GLUE=op, RNE_X=interp_rne(x.dtype), ACCURATE=not interpret,
        num_warps=warps, enable_fp_fusion=op < 0)
    return q, scale


@triton.jit(do_not_specialize=["M", "NK", "STEPS"])
def _fp8_group_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, ws_ptr, arrivals_ptr, M, N, K, NK, STEPS,
                           s_am, s_asm, s_bn, s_bsn, s_cm, s_ws,
                           GROUP: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           QUANT_A: tl.constexpr, HAS_BIAS: tl.constexpr, RNE_O: tl.constexpr,
                           FP8_MAX_: tl.constexpr, RNE_A: tl.constexpr, SPLIT: tl.constexpr, SWAP: tl.constexpr,
                           SCALED: tl.constexpr):
    """Program (m tile, n tile, K split): K steps [split * STEPS, min(NK, (split + 1) * STEPS)).

    With several splits (``SPLIT``) each program stores its fp32 partial sum in the workspace ws [splits, M, N]
    (split stride s_ws) and counts itself in its tile's arrival counter; the last to arrive adds the partials in
    split order, adds the bias, writes c and resets the counter to 0 for the next launch. One launch instead of a
    GEMM, a sum and a copy: at decode, inside a CUDA graph, each of those is a node of a few microseconds."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    # SWAP (decode-sized M): the product is computed transposed, C^T = B @ A^T, so that the weight tile is the MMA's
    # M operand (64+ rows: Hopper's wgmma reads it from shared memory) and the few tokens are its N operand
    acc = tl.zeros((BN, BM) if SWAP else (BM, BN), dtype=tl.float32)
    kk0 = split * STEPS
    kk1 = tl.minimum(kk0 + STEPS, NK)
    # One loop over K steps of BK = min(GROUP, 128); each step's fp32 partial product takes its group's two scales
    # (a group past 128 spans several steps; scaling distributes over their sum). A static inner loop over a large
    # group's steps made the pipeliner keep every step's tiles live: 384 KB of shared memory for GROUP=512.
    for kk in range(kk0, kk1):
        k = kk * BK + rk
        k_ok = k < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        if SWAP:  # [BN, BK]
            b = tl.load(b_ptr + rn[:, None] * s_bn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        else:  # [BK, BN]
            b = tl.load(b_ptr + rn[None, :] * s_bn + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        a = tl.load(a_ptr + rm[:, None] * s_am + k[None, :], mask=a_mask, other=0.0)
        if SCALED:
            g = (kk * BK) // GROUP
            if QUANT_A:  # a is the float activation; BK == GROUP, so this step is one whole group of each row
                a, sa = _quantize_tile(a.to(tl.float32), FP8_MAX_, RNE_A)
            else:
                sa = tl.load(as_ptr + rm * s_asm + g, mask=m_ok, other=0.0)
            sb = tl.load(bs_ptr + rn * s_bsn + g, mask=n_ok, other=0.0)
            if SWAP:
                acc += tl.dot(b, tl.trans(a), out_dtype=tl.float32) * sb[:, None] * sa[None, :]
            else:
                acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
        else:  # a plain 16-bit GEMM (a and b of one float dtype): the decode GEMV of unquantised weights
            if RNE_A:  # the interpreter: its dots take no bf16; fp32 products of bf16 values are exact
                a, b = a.to(tl.float32), b.to(tl.float32)
            if SWAP:
                acc = tl.dot(b, tl.trans(a), acc, out_dtype=tl.float32)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.float32)
    if SWAP:
        acc = tl.trans(acc)
    c_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tile_ws = ws_ptr + rm[:, None] * N + rn[None, :]
        tl.store(tile_ws + split.to(tl.int64) * s_ws, acc, mask=c_mask)
        tl.debug_barrier()  # every thread's partial is stored before the arrival is counted (release below)
        counter = arrivals_ptr + pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == tl.num_programs(2) - 1:  # the last split of this tile: the others' partials are visible
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            partial = tile_ws
            for _ in range(0, tl.num_programs(2)):  # a pointer step per split: no 32-bit split * s_ws product
                acc += tl.load(partial, mask=c_mask, other=0.0, cache_modifier=".cg")  # .cg: past L1
                partial += s_ws
            _finish_tile(acc, bias_ptr, c_ptr, rm, rn, n_ok, c_mask, s_cm, HAS_BIAS, RNE_O)
            tl.atomic_xchg(counter, 0)
    else:
        _finish_tile(acc, bias_ptr, c_ptr, rm, rn, n_ok, c_mask, s_cm, HAS_BIAS, RNE_O)


@triton.jit
def _finish_tile(acc, bias_ptr, c_ptr, rm, rn, n_ok, c_mask, s_cm, HAS_BIAS: tl.constexpr, RNE_O: tl.constexpr):
    """The bias, the rounding and the store of one output tile."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RNE_O:
        acc = rne_bf16(acc)
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_plan(m: int, quantise: bool = True, scaled: bool = True) -> tuple[int, ...]:
    """(BM, BN, num_warps, num_stages, swap) for M rows: decode-sized M reads each weight tile once per 16 rows and
    computes the product transposed (``swap``: C^T = W @ x^T, so the [BN, 128] weight tile is the M operand of
    Hopper's wgmma, read from shared memory, instead of going through ldmatrix into mma.sync with 16-row tiles).
    That took the four 9B projections at M = 1 from 116 to 110 us on an H100 (weights rotated past the L2, CUDA
    graphs; ``benchmarks/decode_gemv.py``): 16 x 128 tiles, 8 warps, 3 stages when the kernel quantises its rows
    itself, 16 x 64 with 8 warps for rows quantised beforehand. Prefill takes 128 x 128 tiles. The interpreter
    takes small tiles (it runs every program in Python). ``SALA_FP8_DECODE_PLAN`` replaces the decode plan on a GPU.
    ``scaled=False``: the 16-bit decode GEMM (:func:`triton_decode_gemm`), whose fastest decode plan on an H100 was
    16 x 64 tiles, 4 warps, 3 stages, not transposed."""
    if triton_interpret():
        return 16, 32, 1, 1, 0
    if m <= 16 and not scaled:
        return 16, 64, 4, 3, 0
    if m <= 16:
        return env.fp8_decode_plan() or ((16, 128, 8, 3, 1) if quantise else (16, 64, 8, 3, 1))
    if m <= 64:
        return 64, 128, 4, 3, 0
    return 128, 128, 8, 3, 0


def split_k_plan(tiles: int, k_steps: int, sms: int) -> int:
    """K splits for a grid of ``tiles`` output tiles: enough CTAs for two per SM, each keeping >= 4 K steps (a
    pipeline's worth of loads in flight); 1 when the tiles already fill the machine."""
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), k_steps // 4))


def triton_fp8_group_gemm(xq: torch.Tensor, x_scale: torch.Tensor | None, q_weight: torch.Tensor,
                          w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype, group_size: int,
                          split_k: int | None = None, plan: tuple[int, ...] | None = None) -> torch.Tensor:
    """xq [M, K] fp8 with x_scale [M, G] fp32, or xq [M, K] float (fp32/bf16/fp16) with ``x_scale=None`` to
    quantise inside the kernel (group_size <= 128 only: one group per K step); q_weight [N, K] fp8, w_scale [N, G]
    fp32, bias [N] | None -> [M, N] in ``out_dtype``; G = ceil(K / group_size), group_size a power of two >= 16.
    ``split_k``: K splits (default: :func:`split_k_plan` on CUDA, 1 in the interpreter). ``plan``: (BM, BN, warps,
    stages[, swap]) instead of :func:`launch_plan`'s, for benchmarks comparing launch shapes (BM,
    BN >= 16, powers of two); the numbers depend on it only through fp32 summation and scaling order (K splits,
    swap, the MMA instruction), within a few fp32 ulp of the sum."""
    M, K = xq.shape
    quant_a = x_scale is None
    if quant_a:
        if group_size > 128:
            raise ValueError(f"in-kernel activation quantisation takes groups of <= 128 (one per K step); got "
                             f"{group_size}; quantise first (triton_quantize_groups)")
        if xq.dtype == torch.float8_e4m3fn:
            raise ValueError("x_scale=None asks the kernel to quantise x: pass the float activation, not fp8 codes")
    elif x_scale.shape[1] != triton.cdiv(K, group_size):
        raise ValueError(f"x_scale has {x_scale.shape[1]} groups per row; K={K} in groups of {group_size} needs "
                         f"{triton.cdiv(K, group_size)}")
    w_scale = w_scale.contiguous()
    x_scale = w_scale if quant_a else x_scale.contiguous()  # a placeholder pointer when quantising in the kernel
    return _launch_gemm(xq, x_scale, q_weight, w_scale, bias, out_dtype, group_size, quant_a, split_k,
                        plan or launch_plan(M, quant_a))


def triton_decode_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       split_k: int | None = None, plan: tuple[int, ...] | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for decode-sized M with 16-bit weights: x [M, K], weight [N, K] of x's dtype
    (bf16 / fp16), bias [N] | None -> [M, N] in x's dtype, fp32 accumulation; the fp8 kernel's K loop and split-K
    without scales. ``split_k`` / ``plan`` as :func:`triton_fp8_group_gemm`. It checks the cuBLAS baseline of bf16
    decode: on an H100 its best plan (16 x 64, 4 warps, 3 stages) was 3% faster than cuBLAS over the four 9B
    projections (176.7 against 181.7 us at M = 1, ``benchmarks/decode_gemv.py``; per shape from 1.05x slower on
    qkv to 6% faster on gate_up). The bf16 model does not route its linears through it (about 0.15 ms of a 7.9 ms
    decode step on that card, not measured end to end)."""
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"triton_decode_gemm wants x and weight of one 16-bit float dtype; got {x.dtype}, "
                         f"{weight.dtype}")
    return _launch_gemm(x, weight, weight, weight, bias, x.dtype, 128, False, split_k,
                        plan or launch_plan(x.shape[0], False, scaled=False), scaled=False)


def _launch_gemm(xq, x_scale, q_weight, w_scale, bias, out_dtype, group_size, quant_a, split_k, plan,
                 scaled: bool = True) -> torch.Tensor:
    """The group GEMM's launch for checked arguments (``scaled=False``: no scales; the scale pointers are
    placeholders): the empty cases, K splits, the workspace and arrival counters of a split launch."""
    M, K = xq.shape
    N = q_weight.shape[0]
    bk = min(group_size, 128)
    xq, q_weight = xq.contiguous(), q_weight.contiguous()
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0:
        return out
    if K == 0:  # an empty sum
        return out.fill_(0) if bias is None else out.copy_(bias.float().expand(M, N))
    bm, bn, warps, stages, *rest = plan
    swap = bool(rest[0]) if rest else False
    nk = triton.cdiv(K, bk)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if split_k is None:
        split_k = 1 if xq.device.type != "cuda" else split_k_plan(tiles, nk, _sm_count(xq.device.index or 0))
    split_k = max(1, min(int(split_k), nk))
    steps = triton.cdiv(nk, split_k)
    split_k = triton.cdiv(nk, steps)  # no empty split
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split_k)
    if split_k > 1:
        workspace = torch.empty(split_k, M, N, dtype=torch.float32, device=xq.device)
        arrivals = _arrival_counters(xq.device, grid[0] * grid[1])
    else:
        workspace = arrivals = out  # placeholders: never touched without splits
    _fp8_group_gemm_kernel[grid](
        xq, x_scale, q_weight, w_scale, bias if bias is not None else w_scale, out, workspace, arrivals, M, N, K, nk,
        steps, xq.stride(0), x_scale.stride(0), q_weight.stride(0), w_scale.stride(0), out.stride(0),
        workspace.stride(0) if split_k > 1 else 0,
        GROUP=group_size, BK=bk, BM=bm, BN=bn, QUANT_A=quant_a, HAS_BIAS=bias is not None,
        RNE_O=interp_rne(out_dtype), FP8_MAX_=FP8_MAX, RNE_A=triton_interpret(), SPLIT=split_k > 1, SWAP=swap,
        SCALED=scaled, num_warps=warps, num_stages=stages)
    return out


_ARRIVALS: dict[torch.device, list[torch.Tensor]] = {}
ARRIVAL_COUNTERS = 65536
"""Split-K arrival counters allocated per device at first use (256 KB): the default launch plans split K only when
there are fewer output tiles than SMs, so one allocation serves every later call, graph captures included."""


def _arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 arrival counters (one per output tile) for split-K launches on ``device``. Every launch leaves
    them at zero again (the last split of each tile resets its counter), so they are allocated once and CUDA graphs
    replay with them. One set per device: split-K GEMMs on one device must not run at the same time on two streams
    (sala runs a model on one stream). A larger set, if one is ever needed, is added and the earlier ones stay
    alive for the graphs that captured them (a set first allocated inside a capture is zeroed by that graph's
    replays too, which is harmless)."""
    sets = _ARRIVALS.setdefault(device, [])
    if not sets or sets[-1].numel() < tiles:
        sets.append(torch.zeros(max(tiles, ARRIVAL_COUNTERS), dtype=torch.int32, device=device))
    return sets[-1]
