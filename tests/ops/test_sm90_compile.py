"""GPU-only compile errors caught without a GPU: Triton compiles these kernels for an H100/H200 (sm_90) down to a
cubin with the ptxas it ships (the interpreter tests check their numbers, not that they compile). Also checks
that the fp8 codes divide with IEEE rounding (a ``div.rn`` reciprocal per row, corrected by FMAs), not Triton's
default approximate division.

The compilation runs in a child process: the test session sets ``TRITON_INTERPRET=1``, under which ``@triton.jit``
makes interpreter functions that cannot be compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton.backends.nvidia")

_SCRIPT = textwrap.dedent('''
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sala.ops.fp8.triton_gemm import (FP8_MAX, QUANT_TILE, _fp8_group_gemm_kernel, _quantize_groups_kernel,
                                          launch_plan)
    from sala.ops.kl.triton_kl import _kl_rows_kernel

    def build(fn, sig, consts, warps=4, stages=3):
        # as a launch on real shapes specialises: pointers and the int arguments that are multiples of 16 (K, N,
        # row strides) marked divisible by 16, so loads vectorise and layouts are the GPU's
        div16 = [n for n in sig if sig[n].startswith("*") or n in ("N", "K", "V") or n.startswith("s_")]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        ptx = k.asm["ptx"]
        return {"cubin": "cubin" in k.asm, "div_rn": "div.rn.f32" in ptx, "div_rn_count": ptx.count("div.rn.f32"),
                "wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx,
                "div_approx": "div.full.f32" in ptx or "div.approx.f32" in ptx,
                "acq_rel": "atom.global.gpu.acq_rel" in ptx or "atom.acq_rel.gpu" in ptx,
                "cg_loads": "ld.global.cg" in ptx}

    out = {}
    kl = {"s_ptr": "*fp32", "t_ptr": "*fp32", "loss_ptr": "*fp32", "V": "i32", "s_stride": "i32",
          "t_stride": "i32", "inv_t": "fp32", "t_sq": "fp32", "temp": "fp32", "NEED_GRAD": "constexpr",
          "BV": "constexpr"}
    for ng in (True, False):
        out[f"kl_rows grad={ng}"] = build(_kl_rows_kernel, kl, {"NEED_GRAD": ng, "BV": 4096})
    q = {"x_ptr": "*bf16", "y_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "K": "i32",
         "group": "i32", "s_xm": "i32", "s_ym": "i32", "s_qm": "i32", "s_sm": "i32", "s_sg": "i32", "BR": "constexpr",
         "BC": "constexpr", "FP8_MAX_": "constexpr", "RNE": "constexpr", "GLUE": "constexpr", "RNE_X": "constexpr",
         "ACCURATE": "constexpr"}
    for glue in (-1, 0, 1):  # the default tile, groups of 128
        out[f"fp8 quantiser glue={glue}"] = build(_quantize_groups_kernel, q, {
            "BR": QUANT_TILE[0] // 128, "BC": 128, "FP8_MAX_": FP8_MAX, "RNE": False, "GLUE": glue, "RNE_X": False,
            "ACCURATE": True}, warps=QUANT_TILE[1])
    # the default launch plans: decode quantising in the kernel with split-K, decode pre-quantised, prefill
    for name, quant_a, m, split in (("decode quant", True, 1, True), ("decode", False, 1, False),
                                    ("prefill", False, 8192, False)):
        bm, bn, warps, stages, swap = launch_plan(m, quant_a)
        g = {"a_ptr": "*bf16" if quant_a else "*fp8e4nv", "as_ptr": "*fp32", "b_ptr": "*fp8e4nv",
             "bs_ptr": "*fp32", "bias_ptr": "*fp32", "c_ptr": "*bf16", "ws_ptr": "*fp32", "arrivals_ptr": "*i32",
             "M": "i32", "N": "i32", "K": "i32", "NK": "i32", "STEPS": "i32", "s_am": "i32", "s_asm": "i32",
             "s_bn": "i32", "s_bsn": "i32", "s_cm": "i32", "s_ws": "i32", "GROUP": "constexpr", "BK": "constexpr",
             "BM": "constexpr", "BN": "constexpr", "QUANT_A": "constexpr", "HAS_BIAS": "constexpr",
             "RNE_O": "constexpr", "FP8_MAX_": "constexpr", "RNE_A": "constexpr", "SPLIT": "constexpr",
             "SWAP": "constexpr", "SCALED": "constexpr"}
        out[f"fp8 gemm {name}"] = build(_fp8_group_gemm_kernel, g, {
            "GROUP": 128, "BK": 128, "BM": bm, "BN": bn, "QUANT_A": quant_a, "HAS_BIAS": True, "RNE_O": False,
            "FP8_MAX_": FP8_MAX, "RNE_A": False, "SPLIT": split, "SWAP": bool(swap), "SCALED": True},
            warps=warps, stages=stages)
    # the 16-bit decode GEMM (triton_decode_gemm's default decode plan: no swap, no scales), split-K
    g16 = dict(g, a_ptr="*bf16", b_ptr="*bf16")
    out["bf16 decode gemm"] = build(_fp8_group_gemm_kernel, g16, {
        "GROUP": 128, "BK": 128, "BM": 16, "BN": 64, "QUANT_A": False, "HAS_BIAS": False, "RNE_O": False,
        "FP8_MAX_": FP8_MAX, "RNE_A": False, "SPLIT": True, "SWAP": False, "SCALED": False}, warps=4, stages=3)
    print(json.dumps(out))
''')


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SALA_FP8_DECODE_PLAN")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "ptxas" in r.stderr and "No such file" in r.stderr:
        pytest.skip("this triton build has no ptxas to compile for sm_90")
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_kernels_compile_to_sm90_cubins(compiled):
    assert set(compiled) == {"kl_rows grad=True", "kl_rows grad=False", "fp8 quantiser glue=-1",
                             "fp8 quantiser glue=0", "fp8 quantiser glue=1", "fp8 gemm decode quant",
                             "fp8 gemm decode", "fp8 gemm prefill", "bf16 decode gemm"}
    assert all(k["cubin"] for k in compiled.values()), compiled


def test_split_k_handshake_is_ordered(compiled):
    """The arrival count releases the partial sums and acquires the others' at GPU scope, and the last split reads
    them past L1 (which is not coherent across SMs)."""
    assert compiled["fp8 gemm decode quant"]["acq_rel"] and compiled["fp8 gemm decode quant"]["cg_loads"], compiled


def test_decode_plans_run_the_weight_tile_through_wgmma(compiled):
    """Decode plans compute C^T = W @ x^T so that the weight tile is the M operand of Hopper's wgmma (16-row tiles
    of x as the M operand go through ldmatrix and mma.sync: 5% slower over the 9B projections on an H100)."""
    for name in ("fp8 gemm decode quant", "fp8 gemm decode"):
        assert compiled[name]["wgmma"] and not compiled[name]["mma_sync"], (name, compiled[name])


def test_fp8_codes_divide_with_ieee_rounding(compiled):
    for name in ("fp8 quantiser glue=-1", "fp8 quantiser glue=0", "fp8 gemm decode quant"):
        assert compiled[name]["div_rn"] and not compiled[name]["div_approx"], (name, compiled[name])
    # one correctly rounded reciprocal per row a thread holds, not a division per element: 16 x 128 codes per K step
    # over 128 threads were 8-16 div.rn (each with a slow-path call) in the decode GEMM's loop
    assert compiled["fp8 gemm decode quant"]["div_rn_count"] <= 4, compiled
