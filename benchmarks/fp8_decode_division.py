"""Why fp8 decode GEMMs that quantise their activations in the kernel were slow, and what the exact division costs.

A copy of the decode GEMM (``sala.ops.fp8.triton_gemm._fp8_group_gemm_kernel``, split-K epilogue included) whose
activation codes divide by the group scale in one of three ways (``DIV``): 0 ``div_rn`` per element (sala up to
3eea111), 1 Triton's approximate ``/``, 2 a ``div_rn`` reciprocal per row with Markstein's FMA correction (what
``_quotient`` does now, there with a rescale for scales below 2^-62). It times each against the production path
(``triton_fp8_group_gemm``), the pre-quantised kernel and cuBLAS bf16 on the 9B projection shapes at M = 1 and 8,
32 calls per CUDA graph (the engine decodes in graphs), and checks on 4 x 64M values how often each division's
quotient and e4m3 code differ from ``div_rn``'s.

    PYTHONPATH=src:benchmarks OUT=out python benchmarks/fp8_decode_division.py   # one GPU, about 30 s
"""
import json
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import _graph_ms  # benchmarks/ is on PYTHONPATH (see the usage line)
from sala.ops.fp8 import quantize_fp8_weight
from sala.ops.fp8.triton_gemm import (_arrival_counters, _finish_tile, _scale_of, _sm_count, split_k_plan,
                                      triton_fp8_group_gemm, triton_quantize_groups)


@triton.jit
def _q(x, scale, DIV: tl.constexpr):
    if DIV == 0:
        q = tl.math.div_rn(x, scale[:, None])
    elif DIV == 1:
        q = x / scale[:, None]
    else:
        y = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        q0 = x * y[:, None]
        r = tl.math.fma(-q0, scale[:, None], x)
        q = tl.math.fma(r, y[:, None], q0)
    return q


@triton.jit
def _quot_kernel(x_ptr, s_ptr, o_ptr, n, DIV: tl.constexpr, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    ok = i < n
    x = tl.load(x_ptr + i, mask=ok, other=1.0)
    s = tl.load(s_ptr + i, mask=ok, other=1.0)
    q = _q(x[:, None], s, DIV)
    tl.store(o_ptr + i, tl.reshape(q, (B,)), mask=ok)


@triton.jit(do_not_specialize=["M", "NK", "STEPS"])
def _gemm(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, ws_ptr, arrivals_ptr, M, N, K, NK, STEPS, s_am, s_asm, s_bn, s_bsn,
          s_cm, s_ws, GROUP: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
          QUANT_A: tl.constexpr, SPLIT: tl.constexpr, DIV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    kk0 = split * STEPS
    kk1 = tl.minimum(kk0 + STEPS, NK)
    for kk in range(kk0, kk1):
        k = kk * BK + rk
        k_ok = k < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        b = tl.load(b_ptr + rn[None, :] * s_bn + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        g = (kk * BK) // GROUP
        if QUANT_A:
            x = tl.load(a_ptr + rm[:, None] * s_am + k[None, :], mask=a_mask, other=0.0).to(tl.float32)
            sa = _scale_of(tl.max(tl.abs(x), axis=1), 448.0)
            a = tl.minimum(tl.maximum(_q(x, sa, DIV), -448.0), 448.0).to(tl.float8e4nv)
        else:
            a = tl.load(a_ptr + rm[:, None] * s_am + k[None, :], mask=a_mask, other=0.0)
            sa = tl.load(as_ptr + rm * s_asm + g, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptr + rn * s_bsn + g, mask=n_ok, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tile_ws = ws_ptr + rm[:, None] * N + rn[None, :]
        tl.store(tile_ws + split.to(tl.int64) * s_ws, acc, mask=c_mask)
        tl.debug_barrier()
        counter = arrivals_ptr + pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == tl.num_programs(2) - 1:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            partial = tile_ws
            for _ in range(0, tl.num_programs(2)):
                acc += tl.load(partial, mask=c_mask, other=0.0, cache_modifier=".cg")
                partial += s_ws
            _finish_tile(acc, c_ptr, c_ptr, rm, rn, n_ok, c_mask, s_cm, False, False)
            tl.atomic_xchg(counter, 0)
    else:
        _finish_tile(acc, c_ptr, c_ptr, rm, rn, n_ok, c_mask, s_cm, False, False)


def gemm(x, xs, qw, ws, group, plan, split_k, div):
    M, K = x.shape
    N = qw.shape[0]
    bm, bn, warps, stages = plan
    bk = 128
    nk = triton.cdiv(K, bk)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if split_k is None:
        split_k = split_k_plan(tiles, nk, _sm_count(x.device.index or 0))
    steps = triton.cdiv(nk, split_k)
    split_k = triton.cdiv(nk, steps)
    out = torch.empty(M, N, dtype=torch.bfloat16, device=x.device)
    ws_ = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device) if split_k > 1 else out
    arr = _arrival_counters(x.device, tiles) if split_k > 1 else out
    quant = xs is None
    _gemm[(triton.cdiv(M, bm), triton.cdiv(N, bn), split_k)](
        x, ws if quant else xs, qw, ws, out, ws_, arr, M, N, K, nk, steps, x.stride(0), 0 if quant else xs.stride(0),
        qw.stride(0), ws.stride(0), out.stride(0), ws_.stride(0) if split_k > 1 else 0, GROUP=group, BK=bk, BM=bm,
        BN=bn, QUANT_A=quant, SPLIT=split_k > 1, DIV=div, num_warps=warps, num_stages=stages)
    return out


def graph_us(fn) -> float:
    """Microseconds per call, 32 calls per CUDA graph (kernels.py's timer; the recorded Dec 5 numbers came from this
    script's earlier copy of it, which took the best of 3 means instead of the median)."""
    return 1e3 * _graph_ms(fn, calls=32)


def exactness(n=1 << 26):
    g = torch.Generator(device="cuda").manual_seed(0)
    res = {}
    for trial in range(4):
        powers = torch.randint(-20, 20, (n,), device="cuda", generator=g).float()
        x = torch.randn(n, device="cuda", generator=g) * torch.exp2(powers)
        amax = x.abs() * (1 + 10 * torch.rand(n, device="cuda", generator=g))
        if trial == 1:  # quotients on e4m3 midpoints and near them
            x = torch.randn(n, device="cuda", generator=g).bfloat16().float()
            amax = x.abs().clamp_min(1e-30) * torch.randint(1, 300, (n,), device="cuda", generator=g).float() / 7
        if trial == 2:  # scales from absmax of bf16 rows
            x = torch.randn(n, device="cuda", generator=g).bfloat16().float()
            amax = torch.randn(n, device="cuda", generator=g).bfloat16().float().abs() * 4 + x.abs()
        if trial == 3:  # tiny and huge magnitudes
            x = torch.randn(n, device="cuda", generator=g) * 1e-30
            amax = x.abs() * (1 + torch.rand(n, device="cuda", generator=g)) + 1e-38
        s = amax * torch.tensor(1.0 / 448, dtype=torch.float32, device="cuda")
        s = torch.where(s > 0, s, torch.ones_like(s))
        outs = {}
        for div in (0, 1, 2):
            o = torch.empty_like(x)
            _quot_kernel[(triton.cdiv(n, 1024),)](x, s, o, n, DIV=div, B=1024)
            outs[div] = o
        ref = (x.double() / s.double()).float()  # exact: an fp64 quotient of fp32 numbers rounds to the fp32 one
        for div in (0, 1, 2):
            bits = (outs[div].view(torch.int32) != outs[0].view(torch.int32))
            codes = (outs[div].clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
                     != outs[0].clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
            res[f"trial{trial} div{div}"] = {"quotient bits differ from div_rn": int(bits.sum()),
                                             "codes differ": int(codes.sum()),
                                             "div_rn vs fp64 ref": int((outs[0] != ref).sum()) if div == 0 else None}
    return res


def main():
    out = os.environ.get("OUT", "out")
    print(torch.cuda.get_device_name())
    ex = exactness()
    for k, v in ex.items():
        print(k, v)
    shapes = [("qkv", 4096, 6144), ("o_proj", 4096, 4096), ("gate_up", 4096, 32768), ("down", 16384, 4096)]
    rows = []
    for name, k, n in shapes:
        w = 0.02 * torch.randn(n, k, device="cuda")
        w16 = w.bfloat16()
        qw, ws = quantize_fp8_weight(w, 128)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda").bfloat16()
            xq, xs = triton_quantize_groups(x, 128)
            ref = triton_fp8_group_gemm(x, None, qw, ws, None, torch.bfloat16, 128)
            r = {"shape": name, "M": m}
            r["bf16"] = graph_us(lambda: F.linear(x, w16))
            r["prod in-kernel"] = graph_us(lambda: triton_fp8_group_gemm(x, None, qw, ws, None, torch.bfloat16, 128))
            r["prod quantiser+kernel"] = graph_us(lambda: triton_fp8_group_gemm(
                *triton_quantize_groups(x, 128), qw, ws, None, torch.bfloat16, 128))
            r["prod quantiser"] = graph_us(lambda: triton_quantize_groups(x, 128))
            for plan in ((16, 64, 4, 4), (16, 128, 8, 3)):
                for split in (None,):
                    tag = f"{plan[1]}n{plan[2]}w{plan[3]}s/{'auto' if split is None else 1}"
                    r[f"pre {tag}"] = graph_us(lambda: gemm(xq, xs, qw, ws, 128, plan, split, 0))
                    for div in (0, 1, 2):
                        o = gemm(x, None, qw, ws, 128, plan, split, div)
                        err = (o.float() - ref.float()).abs().max().item()
                        r[f"d{div} {tag}"] = graph_us(lambda: gemm(x, None, qw, ws, 128, plan, split, div))
                        r[f"err d{div} {tag}"] = err
            rows.append(r)
            print(json.dumps({kk: (round(v, 2) if isinstance(v, float) and not kk.startswith("err") else v)
                              for kk, v in r.items()}), flush=True)
    os.makedirs(out, exist_ok=True)
    json.dump({"exactness": ex, "rows": rows}, open(f"{out}/exp_fp8_decode.json", "w"), indent=1)


if __name__ == "__main__":
    main()
