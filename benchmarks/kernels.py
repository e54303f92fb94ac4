"""Kernel benchmarks against baselines measured in the same run; never collected by pytest.

    python benchmarks/kernels.py --only lightning --out out/bench

Each section verifies its kernels against the naive reference first, then times them with CUDA
events (``triton.testing.do_bench``: warm-up, L2 flush, median), prints a table with the ratio to the
baseline (lower is better for time) and writes JSON to ``--out``. Baselines that are not installed
are reported as such and skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
from pathlib import Path

import torch

SCALE = 128**-0.5  # spec §4.3: s = 1/sqrt(128)


def env_info() -> dict:
    """Card and software versions, printed and stored with every result."""
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(card=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    try:
        import fla

        info["fla"] = fla.__version__
    except ImportError:
        info["fla"] = None
    return info


def _time_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    print(f"\n## {title}")
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c)
            cells.append(f"{x:>12.4g}" if isinstance(x, float) else f"{str(x):>12}")
        print(" | ".join(cells))


def _fla_simple_gla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    except ImportError as err:
        print(f"fla not installed ({err}): baselines skipped")
        return None, None
    return chunk_simple_gla, fused_recurrent_simple_gla


# ----------------------------------------------------------------------------------------------
# Lightning
# ----------------------------------------------------------------------------------------------


def _lightning_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    h0 = torch.randn(B, H, D, D, device="cuda", dtype=torch.float32, generator=g)
    return q, k, v, h0


def verify_lightning(T: int = 8192, H: int = 32, D: int = 128) -> dict:
    """Triton prefill (bf16 in, fp32 out) and decode step vs the naive chunked reference in fp32 on the GPU."""
    from sala.ops.lightning import chunk_lightning, lightning_decay_slopes, lightning_step, naive_chunk_lightning
    from sala.utils.testing import rel_l2

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be IEEE fp32
    slopes = lightning_decay_slopes(H).to("cuda")
    q, k, v, h0 = _lightning_inputs(1, T, H, D, torch.bfloat16, seed=1)
    o, final = chunk_lightning(q, k, v, slopes, SCALE, h0, True, output_dtype=torch.float32, backend="triton")
    ro, rf = naive_chunk_lightning(q.float(), k.float(), v.float(), slopes, SCALE, h0)
    state = final.clone()
    o1 = lightning_step(q[:, -1], k[:, -1], v[:, -1], slopes, SCALE, state, torch.float32, backend="triton")
    rs = rf.clone()
    ro1 = (SCALE * torch.einsum("nhk,nhkv->nhv", q[:, -1].float(), rs.mul_(torch.exp(-slopes.float())[None, :, None, None])
                                .add_(k[:, -1].float()[..., None] * v[:, -1].float()[..., None, :])))  # fmt: skip
    errs = {"T": T, "o": rel_l2(o, ro), "final": rel_l2(final, rf), "step_o": rel_l2(o1, ro1), "step_state": rel_l2(state, rs)}
    print(f"verify lightning bf16 T={T} H={H} D={D} (rel L2 vs naive fp32): " + ", ".join(
        f"{n}={e:.2e}" for n, e in errs.items() if n != "T"))  # fmt: skip
    if not all(e < 1e-2 for n, e in errs.items() if n != "T"):
        raise AssertionError(f"Lightning Triton kernels disagree with the reference: {errs}")
    return errs


def bench_lightning_prefill(Ts=(8192, 32768, 131072, 262144), H: int = 32, D: int = 128) -> list[dict]:
    """B=1 prefill, bf16, with initial and final state: ours vs fla ``chunk_simple_gla``."""
    from sala.ops.lightning import lightning_decay_slopes
    from sala.ops.lightning.chunk import triton_chunk_lightning

    chunk_simple_gla, _ = _fla_simple_gla()
    slopes = lightning_decay_slopes(H).to("cuda", torch.float32)
    rows = []
    for T in Ts:
        q, k, v, h0 = _lightning_inputs(1, T, H, D, torch.bfloat16)
        ours = lambda: triton_chunk_lightning(q, k, v, slopes, SCALE, h0, True, None, torch.bfloat16)  # noqa: E731
        ours()  # compile and tune outside the timing
        row = {"T": T, "ours_ms": _time_ms(ours)}
        if chunk_simple_gla is not None:
            fla_fn = lambda: chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=SCALE, initial_state=h0,  # noqa: E731
                                              output_final_state=True)  # fmt: skip
            o_f, s_f = fla_fn()
            o_o, s_o = ours()
            row["vs_fla_o"] = float((o_o.float() - o_f.float()).norm() / o_f.float().norm())
            row["fla_ms"] = _time_ms(fla_fn)
            row["ratio"] = row["ours_ms"] / row["fla_ms"]
            del o_f, s_f, o_o, s_o
        # bytes that must move at least: q, k, v read and o written once (bf16), states negligible
        row["ours_TBps"] = 4 * T * H * D * 2 / row["ours_ms"] / 1e9
        rows.append(row)
        del q, k, v, h0
        torch.cuda.empty_cache()
    _print_table(f"Lightning prefill, B=1 H={H} D={D} bf16 (ms; ratio = ours/fla)", rows,
                 ["T", "ours_ms", "fla_ms", "ratio", "ours_TBps", "vs_fla_o"])  # fmt: skip
    return rows


def bench_lightning_train(Ts=(8192, 32768), H: int = 32, D: int = 128) -> list[dict]:
    """B=1 forward+backward, bf16: ours vs fla ``chunk_simple_gla``."""
    from sala.ops.lightning import lightning_decay_slopes
    from sala.ops.lightning.chunk import triton_chunk_lightning

    chunk_simple_gla, _ = _fla_simple_gla()
    slopes = lightning_decay_slopes(H).to("cuda", torch.float32)
    rows = []
    for T in Ts:
        q, k, v, h0 = (t.requires_grad_() for t in _lightning_inputs(1, T, H, D, torch.bfloat16))
        do = torch.randn_like(q)

        def ours():
            o, _ = triton_chunk_lightning(q, k, v, slopes, SCALE, h0, True, None, torch.bfloat16)
            torch.autograd.grad(o, (q, k, v, h0), do)

        ours()
        row = {"T": T, "ours_ms": _time_ms(ours)}
        if chunk_simple_gla is not None:

            def fla_fn():
                o, _ = chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=SCALE, initial_state=h0, output_final_state=True)
                torch.autograd.grad(o, (q, k, v, h0), do)

            fla_fn()
            row["fla_ms"] = _time_ms(fla_fn)
            row["ratio"] = row["ours_ms"] / row["fla_ms"]
        rows.append(row)
    _print_table(f"Lightning forward+backward, B=1 H={H} D={D} bf16 (ms)", rows, ["T", "ours_ms", "fla_ms", "ratio"])
    return rows


def _graph_ms(fn, calls: int = 1) -> float:
    """Median time of one call of ``fn``, ``calls`` of them captured back to back in a CUDA graph and replayed (a
    graph of one short kernel also times the graph launch, a few microseconds that a decode step's graph of
    hundreds of kernels pays once)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _time_ms(graph.replay) / calls


def bench_lightning_decode(batches=(1, 16, 64), H: int = 32, D: int = 128) -> list[dict]:
    """One decode step, bf16 q/k/v, fp32 state in place, in a CUDA graph: ours vs fla ``fused_recurrent_simple_gla``."""
    from sala.ops.lightning import lightning_decay_slopes
    from sala.ops.lightning.recurrent import triton_lightning_step

    _, fused_recurrent_simple_gla = _fla_simple_gla()
    slopes = lightning_decay_slopes(H).to("cuda", torch.float32)
    rows = []
    for N in batches:
        g = torch.Generator(device="cuda").manual_seed(N)
        q, k, v = (torch.randn(N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        state = torch.randn(N, H, D, D, device="cuda", generator=g)
        ours = lambda: triton_lightning_step(q, k, v, slopes, SCALE, state, torch.bfloat16)  # noqa: E731
        row = {"batch": N, "ours_us": 1e3 * _graph_ms(ours)}
        state_bytes = 2 * N * H * D * D * 4  # state read + write
        row["ours_TBps"] = state_bytes / row["ours_us"] / 1e6
        if fused_recurrent_simple_gla is not None:
            fla_state = state.clone()
            fla_fn = lambda: fused_recurrent_simple_gla(q[:, None], k[:, None], v[:, None], g_gamma=-slopes,  # noqa: E731
                                                        scale=SCALE, initial_state=fla_state, output_final_state=True)  # fmt: skip
            try:
                row["fla_us"] = 1e3 * _graph_ms(fla_fn)
                row["fla_mode"] = "graph"
            except RuntimeError as err:  # capture not supported by this fla version: time it eagerly
                print(f"fla decode not capturable ({err.__class__.__name__}); timing eagerly")
                row["fla_us"] = 1e3 * _time_ms(fla_fn)
                row["fla_mode"] = "eager"
            row["ratio"] = row["ours_us"] / row["fla_us"]
        rows.append(row)
    _print_table(f"Lightning decode step, H={H} D={D} bf16, fp32 state (us; TB/s = state read+write)", rows,
                 ["batch", "ours_us", "fla_us", "ratio", "ours_TBps", "fla_mode"])  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------
# InfLLM-v2 (sparse)
# ----------------------------------------------------------------------------------------------


def _sparse_inputs(T: int, H: int, Hkv: int, D: int, clustered: bool = False, seed: int = 0):
    """Random bf16 q/k/v for one sequence. ``clustered``: the queries of each 64-token block share a common
    component (correlation ~0.9), as neighbouring tokens do in real attention, so their selections overlap."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, H, D, device="cuda", generator=g)
    if clustered:
        base = torch.randn((T + 63) // 64, H, D, device="cuda", generator=g).repeat_interleave(64, 0)[:T]
        q = base + 0.5 * q
    k, v = (torch.randn(T, Hkv, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    return q.bfloat16(), k, v, torch.arange(T, device="cuda")


def _sparse_layer(q, k, v, q_pos, params, scale: float):
    """The sparse layer's attention work for one prefill: compress both tiers, score + select (fused), attend."""
    from sala.ops.infllm_v2.compress import triton_compress_keys
    from sala.ops.infllm_v2.sparse_attn import triton_block_sparse_attention
    from sala.ops.infllm_v2.topk import triton_select_from_queries

    ck1 = triton_compress_keys(k, params.kernel_size, params.kernel_stride)
    ck2 = triton_compress_keys(k, params.coarse_kernel_size, params.coarse_kernel_stride)
    idx = triton_select_from_queries(q, ck1, ck2, q_pos, k.shape[0], params, scale)
    return triton_block_sparse_attention(q, k, v, idx, q_pos, params.block_size, scale)


def _selected_flops(idx: torch.Tensor, q_pos: torch.Tensor, block_size: int, G: int, D: int) -> float:
    """4 * D FLOPs per (query head, visible key) over the selected blocks (QK^T and PV)."""
    b = idx.long()
    keys = (q_pos.view(1, -1, 1) - b * block_size + 1).clamp(0, block_size)
    return 4.0 * D * G * float(torch.where(b >= 0, keys, torch.zeros_like(keys)).sum())


def _pooled_reference(scores: torch.Tensor, n_blk: int, r: int) -> torch.Tensor:
    """Block scores as the reference pools them (windows [r b - 1, r b + r - 1]), without forcing."""
    Hkv, T, n1 = scores.shape
    pad = torch.zeros(Hkv, T, n_blk * r + r + 2, device=scores.device)
    use = min(n1, n_blk * r)
    pad[..., 1 : 1 + use] = scores[..., :use].float()
    return pad.unfold(-1, r + 1, r)[..., :n_blk, :].amax(-1)


def verify_sparse(T: int = 8192, H: int = 32, Hkv: int = 2, D: int = 128, n_rows: int = 256) -> dict:
    """Triton vs naive on the GPU at a real shape: kernels run on all T queries, the reference on a sample of
    rows (its cost is T x L). Raises if any error is above the bf16 tolerance."""
    import math

    from sala.ops.infllm_v2.compress import triton_compress_keys
    from sala.ops.infllm_v2.naive import (
        InfLLMv2Params,
        naive_block_sparse_attention,
        naive_compress_keys,
        naive_select_blocks,
        naive_stage1_block_scores,
    )
    from sala.ops.infllm_v2.sparse_attn import triton_block_sparse_attention
    from sala.ops.infllm_v2.topk import triton_select_blocks, triton_select_from_queries, triton_stage1_block_scores
    from sala.utils.testing import rel_l2

    p, scale = InfLLMv2Params(), D**-0.5
    q, k, v, q_pos = _sparse_inputs(T, H, Hkv, D, seed=1)
    ck1 = triton_compress_keys(k, p.kernel_size, p.kernel_stride)
    ck2 = triton_compress_keys(k, p.coarse_kernel_size, p.coarse_kernel_stride)
    res = {
        "ck1": rel_l2(ck1, naive_compress_keys(k, p.kernel_size, p.kernel_stride)),
        "ck2": rel_l2(ck2, naive_compress_keys(k, p.coarse_kernel_size, p.coarse_kernel_stride)),
    }
    idx = triton_select_from_queries(q, ck1, ck2, q_pos, T, p, scale)
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randperm(T - 64, generator=g)[: n_rows - 64], torch.arange(T - 64, T)]).sort().values.cuda()
    ref_scores = naive_stage1_block_scores(q[rows], ck1, ck2, q_pos[rows], p, scale)
    res["stage1"] = rel_l2(triton_stage1_block_scores(q[rows], ck1, ck2, q_pos[rows], p, scale), ref_scores)
    ref_idx = naive_select_blocks(ref_scores, q_pos[rows], T, p)
    res["select_equal"] = bool(torch.equal(triton_select_blocks(ref_scores, q_pos[rows], T, p), ref_idx))
    res["fused_select_match"] = float((idx[:, rows] == ref_idx).float().mean())
    pooled = _pooled_reference(ref_scores, math.ceil(T / p.block_size), p.block_size // p.kernel_stride)

    def mass(ix):
        val = torch.gather(pooled, -1, ix.long().clamp(min=0))
        return float(torch.where(ix >= 0, val, torch.zeros_like(val)).sum())

    res["fused_select_mass_ratio"] = mass(idx[:, rows]) / mass(ref_idx)  # 1.0 = same score mass chosen
    o = triton_block_sparse_attention(q, k, v, idx, q_pos, p.block_size, scale)
    ref_o = naive_block_sparse_attention(q[rows], k, v, idx[:, rows], q_pos[rows], p.block_size, scale)
    res["attention"] = rel_l2(o[rows], ref_o)
    idx1 = triton_select_from_queries(q[-1:], ck1, ck2, q_pos[-1:], T, p, scale)
    res["decode_select_equal"] = bool(torch.equal(idx1, idx[:, -1:]))
    res["decode_attention"] = rel_l2(triton_block_sparse_attention(q[-1:], k, v, idx1, q_pos[-1:], p.block_size, scale), ref_o[-1:])
    print(f"\n## InfLLM-v2 verify (T={T}, {n_rows} sampled rows vs naive): " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    bad = [k for k in ("ck1", "ck2", "stage1", "attention", "decode_attention") if not res[k] <= 1e-2]
    if bad or res["fused_select_mass_ratio"] < 0.999:
        raise SystemExit(f"InfLLM-v2 verify failed: {res}")
    return res


def _dense_causal_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[float, str]:
    """Dense causal SDPA over [1, H, T, D] (KV heads expanded): cuDNN, else FlashAttention."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)
    kh, vh = (x.transpose(0, 1).repeat_interleave(G, 0).unsqueeze(0) for x in (k, v))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel(backend):
                return _time_ms(lambda: F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)), backend.name
        except RuntimeError as err:
            print(f"dense SDPA {backend.name} unavailable: {str(err)[:120]}")
    return float("nan"), "none"


def bench_sparse(Ts=(8192, 32768, 131072, 262144, 524288), H: int = 32, Hkv: int = 2, D: int = 128) -> dict:
    """Sparse layer end to end (compress + score/select + attend; 32 q / 2 kv heads, D 128, bf16, released
    params) vs dense causal cuDNN SDPA, on random inputs and on block-clustered queries."""
    from sala.ops.infllm_v2.compress import triton_compress_keys
    from sala.ops.infllm_v2.naive import InfLLMv2Params
    from sala.ops.infllm_v2.sparse_attn import triton_block_sparse_attention
    from sala.ops.infllm_v2.topk import triton_select_from_queries

    p, scale = InfLLMv2Params(), D**-0.5
    out: dict = {"verify": verify_sparse(min(Ts), H, Hkv, D)}
    rows, dense = [], {}
    for clustered in (False, True):
        for T in Ts:
            q, k, v, q_pos = _sparse_inputs(T, H, Hkv, D, clustered)
            ck1 = triton_compress_keys(k, p.kernel_size, p.kernel_stride)
            ck2 = triton_compress_keys(k, p.coarse_kernel_size, p.coarse_kernel_stride)
            idx = triton_select_from_queries(q, ck1, ck2, q_pos, T, p, scale)
            t_comp = _time_ms(lambda: (triton_compress_keys(k, p.kernel_size, p.kernel_stride),
                                       triton_compress_keys(k, p.coarse_kernel_size, p.coarse_kernel_stride)))
            t_sel = _time_ms(lambda: triton_select_from_queries(q, ck1, ck2, q_pos, T, p, scale))
            t_att = _time_ms(lambda: triton_block_sparse_attention(q, k, v, idx, q_pos, p.block_size, scale))
            t_all = _time_ms(lambda: _sparse_layer(q, k, v, q_pos, p, scale))
            if T not in dense:  # the dense time does not depend on the data
                dense[T] = _dense_causal_ms(q, k, v, scale)
            t_dense, backend = dense[T]
            flops = _selected_flops(idx, q_pos, p.block_size, H // Hkv, D)
            rows.append(dict(
                inputs="clustered" if clustered else "random", T=T, compress_ms=t_comp, select_ms=t_sel, attend_ms=t_att,
                sparse_ms=t_all, dense_ms=t_dense, dense_backend=backend, speedup=t_dense / t_all,
                attend_tflops=flops / t_att / 1e9, dense_tflops=2.0 * T * T * H * D / t_dense / 1e9,
                keys_per_query=flops / (4.0 * D * H * T),
            ))
            del q, k, v, ck1, ck2, idx
            torch.cuda.empty_cache()
    _print_table("InfLLM-v2 sparse layer vs dense causal SDPA (ms; TFLOP/s on the selected blocks)", rows,
                 ["inputs", "T", "compress_ms", "select_ms", "attend_ms", "sparse_ms", "dense_ms", "speedup",
                  "attend_tflops", "dense_tflops", "keys_per_query"])
    print(f"dense backend: {rows[0]['dense_backend']}")
    out["prefill"] = rows
    # decode: one new token over L keys (selection + attention) vs dense SDPA of one query
    import torch.nn.functional as F

    L = max(Ts)
    q, k, v, q_pos = _sparse_inputs(L, H, Hkv, D)
    ck1 = triton_compress_keys(k, p.kernel_size, p.kernel_stride)
    ck2 = triton_compress_keys(k, p.coarse_kernel_size, p.coarse_kernel_stride)
    q1, p1 = q[-1:], q_pos[-1:]
    t_dec = _time_ms(lambda: triton_block_sparse_attention(
        q1, k, v, triton_select_from_queries(q1, ck1, ck2, p1, L, p, scale), p1, p.block_size, scale))
    kh, vh = (x.transpose(0, 1).repeat_interleave(H // Hkv, 0).unsqueeze(0) for x in (k, v))
    t_dd = _time_ms(lambda: F.scaled_dot_product_attention(q1.transpose(0, 1).unsqueeze(0), kh, vh, scale=scale))
    dec = [dict(L=L, sparse_select_attend_ms=t_dec, dense_sdpa_ms=t_dd, speedup=t_dd / t_dec)]
    _print_table("InfLLM-v2 decode, one token (ms)", dec, ["L", "sparse_select_attend_ms", "dense_sdpa_ms", "speedup"])
    out["decode"] = dec
    return out


def bench_sparse_backward(Ts=(8192, 16384), H: int = 32, Hkv: int = 2, D: int = 128) -> list[dict]:
    """Block-sparse attention backward at the released geometry: Triton kernels vs the PyTorch recompute, after
    checking that their gradients agree (bf16 inputs, selections from the real stage 1)."""
    from sala.ops.infllm_v2 import InfLLMv2Params
    from sala.ops.infllm_v2.compress import triton_compress_keys
    from sala.ops.infllm_v2.sparse_attn import _sparse_backward_torch, _sparse_forward
    from sala.ops.infllm_v2.sparse_attn_bwd import triton_sparse_attention_backward
    from sala.ops.infllm_v2.topk import triton_select_from_queries
    from sala.utils.testing import rel_l2

    params = InfLLMv2Params()
    rows = []
    for T in Ts:
        q, k, v, q_pos = _sparse_inputs(T, H, Hkv, D, clustered=True)
        ck1 = triton_compress_keys(k, params.kernel_size, params.kernel_stride)
        ck2 = triton_compress_keys(k, params.coarse_kernel_size, params.coarse_kernel_stride)
        idx = triton_select_from_queries(q, ck1, ck2, q_pos, T, params, SCALE)
        o = _sparse_forward(q, k, v, idx, q_pos, params.block_size, SCALE)
        do = torch.randn_like(q)
        ours = lambda: triton_sparse_attention_backward(q, k, v, o, do, idx, q_pos, params.block_size, SCALE)  # noqa: E731
        torch_bwd = lambda: _sparse_backward_torch(q, k, v, idx, q_pos, params.block_size, SCALE, do)  # noqa: E731
        errs = [rel_l2(a.float(), b.float()) for a, b in zip(ours(), torch_bwd())]
        if not max(errs) < 2e-2:
            raise AssertionError(f"sparse backward: Triton vs PyTorch rel_l2 {errs} at T={T}")
        row = {"T": T, "triton_ms": _time_ms(ours), "torch_ms": _time_ms(torch_bwd), "max_rel_l2": max(errs)}
        row["speedup"] = row["torch_ms"] / row["triton_ms"]
        row["fwd_ms"] = _time_ms(lambda: _sparse_forward(q, k, v, idx, q_pos, params.block_size, SCALE))
        rows.append(row)
    _print_table(f"InfLLM-v2 block-sparse attention backward, H={H} Hkv={Hkv} D={D} bf16 (ms)", rows,
                 ["T", "fwd_ms", "triton_ms", "torch_ms", "speedup", "max_rel_l2"])
    return rows


def bench_sparse_decode(Ls=(32768, 131072, 262144, 1048576), batches=(1, 8), H: int = 32, Hkv: int = 2,
                        D: int = 128) -> list[dict]:
    """One sparse layer's decode attention (compressed-key append + stage 1 + select + attend) for a batch of
    sequences of length L: the fused batched path in a CUDA graph vs the per-sequence path (eager, as the
    eager-mode runner calls it). Checks the fused output against the per-sequence one first."""
    from sala.ops import append_compressed_keys, decode_attention_batch, infllm_v2_attention
    from sala.ops.infllm_v2 import InfLLMv2Params, num_windows
    from sala.ops.infllm_v2.compress import triton_compress_keys
    from sala.utils.testing import rel_l2

    params = InfLLMv2Params()
    rows = []
    for L in Ls:
        for N in batches:
            if N * L * Hkv * D * 2 * 2 > 24 * 2**30:
                continue
            g = torch.Generator(device="cuda").manual_seed(L + N)
            keys = torch.randn(N, L + 1, Hkv, D, device="cuda", generator=g).bfloat16()
            values = torch.randn(N, L + 1, Hkv, D, device="cuda", generator=g).bfloat16()
            n1, n2 = num_windows(L + 1, 32, 16), num_windows(L + 1, 128, 64)
            ck1 = torch.empty(N, n1, Hkv, D, device="cuda", dtype=torch.bfloat16)
            ck2 = torch.empty(N, n2, Hkv, D, device="cuda", dtype=torch.bfloat16)
            for s in range(N):
                c1, c2 = triton_compress_keys(keys[s, :L], 32, 16), triton_compress_keys(keys[s, :L], 128, 64)
                ck1[s, : c1.shape[0]], ck2[s, : c2.shape[0]] = c1, c2
            q = torch.randn(N, H, D, device="cuda", generator=g).bfloat16()
            slot = torch.arange(N, device="cuda")
            pos = torch.full((N,), L - 1, device="cuda")

            def fused():
                append_compressed_keys(keys, ck1, ck2, slot, pos, 32, 16)
                return decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, params, SCALE, 8192)

            def per_sequence():
                outs = []
                for s in range(N):
                    c1 = ck1[s, : num_windows(L, 32, 16)]
                    c2 = ck2[s, : num_windows(L, 128, 64)]
                    outs.append(infllm_v2_attention(q[s : s + 1], keys[s, :L], values[s, :L], c1, c2, pos[s : s + 1],
                                                    params, SCALE, first_pos=L - 1))
                return torch.cat(outs)

            err = rel_l2(fused().float(), per_sequence().float())
            if not err < 1e-2:
                raise AssertionError(f"fused decode differs from the per-sequence path at L={L} N={N}: rel_l2 {err:.2e}")
            row = {"L": L, "batch": N, "rel_l2": err, "fused_graph_us": 1e3 * _graph_ms(fused),
                   "per_seq_eager_us": 1e3 * _time_ms(per_sequence)}
            row["speedup"] = row["per_seq_eager_us"] / row["fused_graph_us"]
            kv_read = N * Hkv * (96 * 64 * D * 2 * 2 + (n1 + n2) * D * 2)  # selected K/V + both compressed tiers
            row["fused_TBps"] = kv_read / row["fused_graph_us"] / 1e6
            rows.append(row)
            del keys, values, ck1, ck2
    _print_table(f"InfLLM-v2 decode attention per layer, H={H} Hkv={Hkv} D={D} bf16 (us; TB/s = selected K/V + "
                 "compressed keys read)", rows,
                 ["L", "batch", "fused_graph_us", "per_seq_eager_us", "speedup", "fused_TBps", "rel_l2"])
    return rows


# the released 9B shape's projections (hidden 4096, MLP 16384): (name, in K, out N)
FP8_SHAPES = (("qkv", 4096, 6144), ("o_proj", 4096, 4096), ("gate_up", 4096, 32768), ("down", 16384, 4096))


# launch shapes of the decode-sized group GEMM compared at M <= 16 (in-kernel quantisation): (BM, BN, warps, stages,
# swap); the first is triton_gemm.launch_plan's default (benchmarks/decode_gemv.py sweeps many more)
DECODE_PLANS = ((16, 128, 8, 3, 1), (16, 64, 4, 3, 1), (16, 128, 8, 3, 0), (16, 64, 4, 4, 0), (16, 256, 8, 3, 1))
# launch shapes of the one-pass quantiser compared at prefill M: (elements per program, warps); the first is the
# default (triton_gemm.QUANT_TILE)
QUANT_TILES = ((512, 1), (1024, 2), (512, 2), (2048, 4), (4096, 4), (256, 1))


def bench_fp8_gemm(Ms=(1, 8, 8192), shapes=FP8_SHAPES, group: int = 128, device: str = "cuda") -> list[dict]:
    """FP8 linear layers against the bf16 GEMM (cuBLAS through F.linear, the strongest baseline) at decode and
    prefill M: row-wise ``_scaled_mm`` and group-wise Triton, each with its activation quantisation, plus the group
    kernel alone and the quantisation alone, so a slow path shows where its time goes. Each shape is checked
    against the reference first. ``weight TB/s`` = weight bytes read per call / time (the decode bound). Decode M
    (<= 16) quantises inside the group GEMM; ``quant`` is the one-pass Triton quantiser larger M uses, ``quant
    torch`` the PyTorch reference it replaced. ``g128`` is the whole linear as the model runs it (cuBLAS block
    scaling for M >= 64 where available), ``g128 kernel`` the Triton group GEMM alone."""
    import torch.nn.functional as F

    from sala.ops.fp8 import fp8_linear, naive_fp8_linear, quantize_fp8_weight
    from sala.ops.fp8.naive import quantize_groups
    from sala.ops.fp8.triton_gemm import triton_fp8_group_gemm, triton_quantize_groups
    from sala.utils.testing import rel_l2

    dev = torch.device(device)
    backend = "triton" if dev.type == "cuda" else "auto"  # auto on CPU: cpu _scaled_mm, the interpreter for groups
    if dev.type == "cuda" and group == 128:
        from sala.ops.fp8.blockwise import WEIGHT_SCALE_LAYOUTS, pick_layout

        layout = pick_layout(dev)
        path = ("the Triton GEMM (no cuBLAS block scaling here)" if layout is None else
                f"cuBLAS block scaling (weight scales {WEIGHT_SCALE_LAYOUTS[layout][0]})")
        print(f"prefill-sized M with groups of 128 runs {path}")
    rows = []
    for name, k, n in shapes:
        g = torch.Generator(device=dev).manual_seed(k + n)
        w = 0.02 * torch.randn(n, k, device=dev, generator=g)
        w16 = w.bfloat16()
        qr, sr = quantize_fp8_weight(w)
        qg, sg = quantize_fp8_weight(w, group)
        for m in Ms:
            x = torch.randn(m, k, device=dev, generator=g).bfloat16()
            with torch.no_grad():
                errs = {"rowwise": rel_l2(fp8_linear(x, qr, sr, backend=backend).float(),
                                          naive_fp8_linear(x, qr, sr, None, torch.bfloat16).float()),
                        f"g{group}": rel_l2(fp8_linear(x, qg, sg, backend=backend, group_size=group).float(),
                                            naive_fp8_linear(x, qg, sg, None, torch.bfloat16, group).float())}
                xq, xs = quantize_groups(x, group)
                # the engine decodes through CUDA graphs of many kernels: eager timing of a 10 us GEMM measures the
                # launch, and a graph of one call its graph launch
                timer = functools.partial(_graph_ms, calls=32) if dev.type == "cuda" and m <= 16 else _time_ms
                t = {"bf16": timer(lambda: F.linear(x, w16)),
                     "rowwise": timer(lambda: fp8_linear(x, qr, sr, backend=backend)),
                     f"g{group}": timer(lambda: fp8_linear(x, qg, sg, backend=backend, group_size=group)),
                     f"g{group} kernel": timer(lambda: triton_fp8_group_gemm(xq, xs, qg, sg, None, torch.bfloat16, group)),
                     f"g{group} quant": timer(lambda: triton_quantize_groups(x, group)),
                     f"g{group} quant torch": timer(lambda: quantize_groups(x, group))}
                tiles = {}
                if dev.type == "cuda" and m <= 16:  # decode launch shapes: (BM, BN, warps, stages) x K splits
                    for plan in DECODE_PLANS:
                        for split in (None, 1):
                            label = f"plan {plan[1]}n/{plan[2]}w/{plan[3]}s{'/swap' * plan[4]}/{'auto' if split is None else 1}"
                            tiles[f"{label} TB/s"] = k * n / timer(lambda: triton_fp8_group_gemm(
                                x, None, qg, sg, None, torch.bfloat16, group, split_k=split, plan=plan)) / 1e9
                if dev.type == "cuda" and m > 16:  # launch shapes of the quantiser: (elements per program, warps),
                    # GPU time only (a graph replay: no host launch cost, which overlaps the GEMMs in a prefill)
                    for tile in QUANT_TILES:
                        tiles[f"quant {tile[0]}/{tile[1]}w TB/s"] = 3 * m * k / _graph_ms(
                            lambda: triton_quantize_groups(x, group, tile=tile)) / 1e9
            row = {"shape": name, "K": k, "N": n, "M": m, "timing": "graph" if timer is not _time_ms else "eager",
                   **{f"{key} ms": v for key, v in t.items()}, **tiles,
                   **{f"{key} / bf16": t[key] / t["bf16"] for key in t if key != "bf16"},
                   "bf16 weight TB/s": 2 * k * n / t["bf16"] / 1e9, "rowwise weight TB/s": k * n / t["rowwise"] / 1e9,
                   f"g{group} weight TB/s": k * n / t[f"g{group}"] / 1e9, **{f"err {key}": e for key, e in errs.items()}}
            rows.append(row)
    _print_table(f"fp8 linear vs bf16 (groups of {group}; ratio < 1 is faster than bf16)", rows,
                 ["shape", "M", "bf16 ms", "rowwise / bf16", f"g{group} / bf16", f"g{group} kernel / bf16",
                  f"g{group} quant / bf16", f"g{group} quant torch / bf16", "bf16 weight TB/s",
                  f"g{group} weight TB/s", f"err g{group}", "timing"])
    if any(key.startswith("plan ") for r in rows for key in r):
        _print_table("decode group GEMM launch shapes, in-kernel quantisation (weight TB/s; plan BN/warps/stages/"
                     "K splits)", [r for r in rows if r["M"] <= 16],
                     ["shape", "M"] + [key for key in rows[0] if key.startswith("plan ")])
    if any(key.startswith("quant ") for r in rows for key in r):
        _print_table("one-pass quantiser, bf16 in -> e4m3 + scales out (TB/s = 3 bytes per element / time)",
                     [r for r in rows if r["M"] > 16], ["shape", "M"] + [key for key in rows[-1] if key.startswith("quant ")])
    return rows


def bench_kl_rows(rows=(2048, 8192), vocab: int = 49152, device: str = "cuda") -> list[dict]:
    """The distillation KL of one training chunk (``sala.ops.kl.kl_rows``, loss and student-logit gradient, fp32,
    SmolLM2's vocabulary): the Triton kernel against the PyTorch reference it replaces, each checked against fp64
    first. ``TB/s``: 3 row-sized reads and 1 write of [c, V] fp32 for the kernel (its minimum traffic) / time."""
    from sala.ops.kl import kl_rows
    from sala.utils.testing import rel_l2

    dev = torch.device(device)
    out = []
    for c in rows:
        g = torch.Generator(device=dev).manual_seed(c)
        s = 4 * torch.randn(c, vocab, device=dev, generator=g)
        t = 5 * torch.randn(c, vocab, device=dev, generator=g)
        zs, zt = s.double(), t.double()
        want = (zt.softmax(-1) * (zt.log_softmax(-1) - zs.log_softmax(-1))).sum()
        del zs, zt
        row = {"rows": c, "V": vocab}
        for backend in ("naive", "triton"):
            kl, _ = kl_rows(s.clone(), t.clone(), 1.0, True, backend=backend)
            row[f"err {backend}"] = abs(kl.double().item() - want.item()) / abs(want.item())
            s2, t2 = s.clone(), t.clone()
            # both buffers are overwritten in place; timing the same (now rewritten) buffers is the same work
            row[f"{backend} ms"] = _time_ms(lambda: kl_rows(s2, t2, 1.0, True, backend=backend))
        row["speedup"] = row["naive ms"] / row["triton ms"]
        row["triton TB/s"] = 4 * c * vocab * 4 / row["triton ms"] / 1e9
        out.append(row)
    _print_table(f"distillation KL rows, V={vocab}, fp32 (ms; speedup = reference / kernel)", out,
                 ["rows", "naive ms", "triton ms", "speedup", "triton TB/s", "err naive", "err triton"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="sala kernel benchmarks vs baselines measured in the same run")
    parser.add_argument("--only", choices=("lightning", "sparse", "decode", "fp8", "kl", "all"), default="all",
                        help="which sections to run")
    parser.add_argument("--fp8-M", default="1,8,8192", help="comma-separated token counts of the fp8 GEMMs")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="folder for the JSON results")
    parser.add_argument("--prefill-T", default="8192,32768,131072,262144", help="comma-separated prefill lengths")
    parser.add_argument("--sparse-T", default="8192,32768,131072,262144,524288", help="comma-separated sparse-layer lengths")
    parser.add_argument("--decode-batch", default="1,16,64", help="comma-separated decode batch sizes")
    parser.add_argument("--train", action="store_true", help="also time Lightning forward+backward and the sparse backward (T<=32K)")
    parser.add_argument("--verify-T", type=int, default=8192, help="length of the Lightning verify step")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks need a CUDA device")
    info = env_info()
    print("env: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"env": info}
    if args.only in ("lightning", "all"):
        results["lightning_verify"] = verify_lightning(args.verify_T)
        results["lightning_prefill"] = bench_lightning_prefill(tuple(int(x) for x in args.prefill_T.split(",")))
        results["lightning_decode"] = bench_lightning_decode(tuple(int(x) for x in args.decode_batch.split(",")))
        if args.train:
            results["lightning_train"] = bench_lightning_train()
    if args.only in ("sparse", "all"):
        results["sparse"] = bench_sparse(tuple(int(x) for x in args.sparse_T.split(",")))
        if args.train:
            results["sparse_backward"] = bench_sparse_backward()
    if args.only in ("decode", "all"):
        results["sparse_decode"] = bench_sparse_decode()
    if args.only in ("fp8", "all"):
        results["fp8_gemm"] = bench_fp8_gemm(tuple(int(x) for x in args.fp8_M.split(",")))
    if args.only in ("kl", "all"):
        results["kl_rows"] = bench_kl_rows()
    path = args.out / f"kernels_{args.only}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
