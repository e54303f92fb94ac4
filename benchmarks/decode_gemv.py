"""Decode GEMMs (M = 1 and 8) on the 9B projection shapes: how close each gets to the card's weight-read bandwidth.

Times cuBLAS bf16 (``F.linear``), sala's Triton 16-bit decode GEMM (``triton_decode_gemm``) and the fp8 group GEMM
(``triton_fp8_group_gemm``, activations quantised in the kernel or beforehand, groups of 128) over a sweep of launch
plans (BN, warps, stages, swap: the product computed as C^T = W @ x^T) and K-split targets (CTAs per SM). Each
timed call reads a different copy of the weight (the copies together are over 3x the L2), 32 calls per CUDA graph,
as a decode step's layers do: a repeated weight would be served from L2. Every variant is checked against ``F.linear`` / the fp8 reference
first. Prints TB/s of weight bytes and writes ``$OUT/decode_gemv.json``.

    PYTHONPATH=src:benchmarks OUT=out python benchmarks/decode_gemv.py        # one GPU, a few minutes
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

from kernels import FP8_SHAPES, _graph_ms  # benchmarks/ is on PYTHONPATH (see the usage line)
from sala.ops.fp8 import naive_fp8_linear, quantize_fp8_weight
from sala.ops.fp8.naive import quantize_groups
from sala.ops.fp8.triton_gemm import _sm_count, launch_plan, triton_decode_gemm, triton_fp8_group_gemm
from sala.utils.testing import rel_l2

L2_BYTES = 60 * 2**20
CALLS = 32


def graph_us(fn_of_copy, copies: int) -> float:
    """Microseconds per call: CALLS calls captured in one CUDA graph (kernels.py's graph timer), call i on weight
    copy i % copies (the copy is picked while capturing)."""
    copy = itertools.cycle(range(copies))
    return 1e3 * _graph_ms(lambda: fn_of_copy(next(copy)), calls=CALLS)


def splits_for(tiles: int, k_steps: int, sms: int, per_sm: int) -> int:
    """K splits for ``per_sm`` CTAs per SM. Unlike the library's ``split_k_plan`` (>= 4 K steps per split, no split
    once tiles >= SMs) this allows 2 K steps per split, so a plan picked here may run end to end with fewer splits
    (o_proj: 9 here, 8 there)."""
    if tiles >= per_sm * sms // 2:
        return 1
    return max(1, min(triton.cdiv(per_sm * sms, tiles), k_steps // 2))


def _sweep(row: dict, copies: int, n: int, k: int, sms: int, per_sm_choices, where: str, kind: str, plans,
           ref: torch.Tensor, call) -> tuple:
    """Time ``call(copy, split, plan)`` for every plan and split target into ``row`` (keys ``"{kind} {plan}/{per
    SM}"``), after checking it against ``ref``; plans out of shared memory or off the reference are skipped. Sets
    ``row[kind + "_best"]`` and ``row[kind + "_best_us"]``; returns ((plan, per SM, splits), us) of the fastest."""
    best = (None, 1e9)
    for plan in plans:
        for per_sm in per_sm_choices:
            split = splits_for(triton.cdiv(n, plan[1]), k // 128, sms, per_sm)
            fn = functools.partial(call, split=split, plan=plan)
            try:
                err = rel_l2(fn(0).float(), ref)
            except triton.runtime.errors.OutOfResources:
                continue
            if not err < 1e-2:
                print(f"  {kind} {where} plan {plan} split {split}: rel err {err:.2e}, skipped")
                continue
            us = graph_us(fn, copies)
            row[f"{kind} {plan[1]}n{plan[2]}w{plan[3]}s{'x' if plan[4] else ''}/{per_sm}"] = us
            if us < best[1]:
                best = ((plan, per_sm, split), us)
    row[kind + "_best"], row[kind + "_best_us"] = best
    return best


def main() -> None:
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    dev = torch.device("cuda")
    sms = _sm_count(0)
    print(torch.cuda.get_device_name(0), f"{sms} SMs", torch.__version__, triton.__version__, flush=True)
    quick = "--quick" in sys.argv
    # (BM, BN, warps, stages, swap): swap computes C^T = W @ x^T, the weight tile as the wgmma's M operand
    fp8_plans = [(16, bn, w, s, sw) for sw, bn, w, s in itertools.product((0, 1), (64, 128, 256), (4, 8), (3, 4, 6))]
    pre_plans = [(16, bn, w, s, 1) for bn, w, s in itertools.product((64, 128, 256), (4, 8), (3, 4, 6))]
    bf16_plans = [(16, bn, w, s, sw) for sw, bn, w, s in itertools.product((0, 1), (64, 128), (4, 8), (3, 4))]
    per_sm_choices = (2, 4)
    if quick:
        fp8_plans, pre_plans, bf16_plans, per_sm_choices = fp8_plans[:3], pre_plans[:2], bf16_plans[:2], (2,)
    rows = []
    for name, k, n in FP8_SHAPES:
        g = torch.Generator(device=dev).manual_seed(k + n)
        copies = max(2, triton.cdiv(3 * L2_BYTES, k * n))
        w16 = [(0.02 * torch.randn(n, k, device=dev, generator=g)).bfloat16() for _ in range(copies)]
        q8 = [quantize_fp8_weight(w.float(), 128) for w in w16]
        for m in (1, 8):
            x = torch.randn(m, k, device=dev, generator=g).bfloat16()
            ref16 = F.linear(x, w16[0]).float()
            ref8 = naive_fp8_linear(x, *q8[0], None, torch.bfloat16, 128).float()
            row = {"shape": name, "K": k, "N": n, "M": m, "copies": copies}
            row["cublas_bf16_us"] = graph_us(lambda i: F.linear(x, w16[i]), copies)
            row["fp8_default_us"] = graph_us(lambda i: triton_fp8_group_gemm(x, None, *q8[i], None, torch.bfloat16,
                                                                              128), copies)
            row["fp8_default_plan"] = launch_plan(m, True)
            xq, xs = quantize_groups(x, 128)
            sweep = functools.partial(_sweep, row, copies, n, k, sms, per_sm_choices, f"{name} M={m}")
            best8 = sweep("fp8", fp8_plans, ref8, lambda i, split, plan: triton_fp8_group_gemm(
                x, None, *q8[i], None, torch.bfloat16, 128, split_k=split, plan=plan))
            best_pre = sweep("pre", pre_plans, ref8, lambda i, split, plan: triton_fp8_group_gemm(
                xq, xs, *q8[i], None, torch.bfloat16, 128, split_k=split, plan=plan))
            best16 = sweep("bf16", bf16_plans, ref16, lambda i, split, plan: triton_decode_gemm(
                x, w16[i], split_k=split, plan=plan))
            gb16, gb8 = 2 * k * n / 1e9, k * n * (1 + 4 / 128) / 1e9
            print(f"{name:8s} M={m}: cuBLAS bf16 {row['cublas_bf16_us']:7.1f} us ({gb16 / row['cublas_bf16_us'] * 1e3:.2f} TB/s)"
                  f" | triton bf16 best {best16[1]:7.1f} us ({gb16 / best16[1] * 1e3:.2f} TB/s) {best16[0]}"
                  f" | fp8 default {row['fp8_default_us']:6.1f} us ({gb8 / row['fp8_default_us'] * 1e3:.2f} TB/s)"
                  f" | fp8 best {best8[1]:6.1f} us ({gb8 / best8[1] * 1e3:.2f} TB/s) {best8[0]}"
                  f" | pre-quantised best {best_pre[1]:6.1f} us {best_pre[0]}", flush=True)
            rows.append(row)
        del w16, q8
    # per plan over all shapes at M = 1 and 8: which single plan (and split target) is best on the sum
    for kind in ("fp8", "pre", "bf16"):
        for m in (1, 8):
            rows_m = [r for r in rows if r["M"] == m]  # plans that ran on every shape (none out of resources)
            keys = [key for key in rows_m[0] if key.startswith(kind + " ") and all(key in r for r in rows_m)]
            totals = sorted((sum(r[key] for r in rows_m), key) for key in keys)
            print(f"{kind} M={m}: best plans over the four shapes (sum of us):",
                  ", ".join(f"{key} {t:.1f}" for t, key in totals[:5]))
        for m in (1, 8):
            print(f"  {kind} M={m} reference sums: cuBLAS bf16 {sum(r['cublas_bf16_us'] for r in rows if r['M'] == m):.1f}"
                  f", fp8 default {sum(r['fp8_default_us'] for r in rows if r['M'] == m):.1f}, per-shape best "
                  f"{sum(r[kind + '_best_us'] for r in rows if r['M'] == m):.1f}")
    # the in-kernel-quantising plan with the smallest M = 1 sum, for an end-to-end run (SALA_FP8_DECODE_PLAN)
    rows_1 = [r for r in rows if r["M"] == 1]
    best = min((sum(r[key] for r in rows_1), key) for key in rows_1[0]
               if key.startswith("fp8 ") and key.endswith("/2") and all(key in r for r in rows_1))[1]
    bn, rest = best.split()[1].split("n", 1)
    warps, rest = rest.split("w", 1)
    stages, swap = rest.split("s", 1)
    plan = f"16,{bn},{warps},{stages},{1 if swap.startswith('x') else 0}"
    print("best in-kernel fp8 plan at M = 1:", best, "->", plan)
    with open(os.path.join(out_dir, "best_fp8_plan.txt"), "w") as f:
        f.write(plan + "\n")
    with open(os.path.join(out_dir, "decode_gemv.json"), "w") as f:
        json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
