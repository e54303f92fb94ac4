"""Triton InfLLM-v2 kernels (compress, stage 1, selection, block-sparse attention) against the naive reference.

On CPU these run in the Triton interpreter (conftest sets TRITON_INTERPRET=1). Shapes are small but awkward:
lengths off the stride/block grid and ≡ 15 mod 16, chunk continuation (T < L), decode (T = 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from sala.ops import block_sparse_attention, compress_keys, infllm_v2_attention
from sala.ops.infllm_v2 import InfLLMv2Params
from sala.ops.infllm_v2.naive import (
    naive_block_sparse_attention,
    naive_compress_keys,
    naive_select_blocks,
    naive_stage1_block_scores,
)
from sala.utils.testing import assert_close

triton = pytest.importorskip("triton")

from sala.ops.infllm_v2.compress import triton_compress_keys  # noqa: E402
from sala.ops.infllm_v2.sparse_attn import triton_block_sparse_attention  # noqa: E402
from sala.ops.infllm_v2.topk import (  # noqa: E402
    triton_select_blocks,
    triton_select_from_queries,
    triton_stage1_block_scores,
)

pytestmark = pytest.mark.triton

P = InfLLMv2Params(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2, topk=3)
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # real kernels on a GPU, the interpreter elsewhere
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

# (L, T, H, Hkv, D): full prefill, chunk continuation, decode; 47 and 143 are ≡ 15 (mod 16)
CASES = [(100, 100, 4, 2, 16), (161, 40, 8, 1, 32), (47, 47, 8, 1, 16), (143, 16, 4, 2, 32), (300, 1, 4, 2, 16)]
CASE_IDS = [f"L{c[0]}-T{c[1]}-H{c[2]}-Hkv{c[3]}-D{c[4]}" for c in CASES]


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)


def _inputs(L, T, H, Hkv, D, dtype, seed=0):
    q = _rand(T, H, D, dtype=dtype, seed=seed)
    k = _rand(L, Hkv, D, dtype=dtype, seed=seed + 1)
    v = _rand(L, Hkv, D, dtype=dtype, seed=seed + 2)
    q_pos = torch.arange(L - T, L, device=DEV)
    ck1 = naive_compress_keys(k, P.kernel_size, P.kernel_stride)
    ck2 = naive_compress_keys(k, P.coarse_kernel_size, P.coarse_kernel_stride)
    return q, k, v, q_pos, ck1, ck2, D**-0.5


def _pooled(scores, q_pos, L):
    """Reference block scores after pooling and forcing: [Hkv, T, n_blocks] fp32 (forced = +inf)."""
    Hkv, T, n1 = scores.shape
    r, n_blk = P.block_size // P.kernel_stride, math.ceil(L / P.block_size)
    s, q_pos = scores.float().cpu(), q_pos.cpu()
    out = torch.zeros(Hkv, T, n_blk)
    for b in range(n_blk):
        lo, hi = max(0, r * b - 1), min(n1, r * b + r, n_blk * r)
        if lo < hi:
            out[..., b] = s[..., lo:hi].amax(-1)
    blk = torch.arange(n_blk)
    qb = (q_pos // P.block_size)[:, None]
    forced = (blk < P.init_blocks) | ((blk >= qb - P.local_blocks) & (blk <= qb))
    return out.masked_fill(forced[None], float("inf"))


def _assert_valid_topk(idx, pooled, q_pos, rel_tol):
    """idx must be an ascending top-K of ``pooled`` up to ``rel_tol`` near-ties, with future blocks -1."""
    Hkv, T, K = idx.shape
    idx, qb = idx.cpu(), q_pos.cpu() // P.block_size
    for h in range(Hkv):
        for t in range(T):
            row = idx[h, t]
            kept = row[row >= 0]
            assert torch.all(kept[1:] > kept[:-1]), f"not ascending: {row.tolist()}"
            assert torch.all(kept <= qb[t]) and torch.all(row[len(kept):] == -1), f"bad tail: {row.tolist()}"
            past = pooled[h, t, : int(qb[t]) + 1]
            sel = torch.zeros(len(past), dtype=torch.bool)
            sel[kept.long()] = True
            # future blocks score 0 and lose ties to past ones, so the K choices land on past blocks first
            assert int(sel.sum()) == min(K, len(past)), f"row {h},{t}: {row.tolist()}"
            if sel.all() or not sel.any():
                continue
            lo, hi = past[sel].min(), past[~sel].max()
            assert lo >= hi - rel_tol * max(float(hi), 1e-30), f"row {h},{t}: selected {float(lo)} < unselected {float(hi)}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [37, 100, 161, 300, 47])
def test_compress_keys(L, dtype):
    k = _rand(L, 2, 32, dtype=dtype, seed=L)
    for ks, st in ((8, 4), (32, 16)):
        for start in (0, 3):
            ref = naive_compress_keys(k, ks, st, start)
            out = triton_compress_keys(k, ks, st, start)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            if ref.numel():
                assert_close(out, ref, 1e-6 if dtype == torch.float32 else 5e-3, f"ck L={L} ks={ks} start={start}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_stage1_block_scores(case, dtype):
    q, k, v, q_pos, ck1, ck2, scale = _inputs(*case, dtype)
    ref = naive_stage1_block_scores(q, ck1, ck2, q_pos, P, scale)
    out = triton_stage1_block_scores(q, ck1, ck2, q_pos, P, scale)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close(out, ref, RTOL[dtype], "stage-1 scores")
    assert torch.equal(out == 0, ref == 0), "invisible windows must score exactly 0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_select_blocks_matches_reference(case, dtype):
    q, k, v, q_pos, ck1, ck2, scale = _inputs(*case, dtype)
    scores = naive_stage1_block_scores(q, ck1, ck2, q_pos, P, scale)
    ref = naive_select_blocks(scores, q_pos, case[0], P)
    out = triton_select_blocks(scores, q_pos, case[0], P)
    assert out.dtype == torch.int32 and torch.equal(out, ref)  # same scores in: identical, ties included


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_select_from_queries_with_short_ck1_ignores_unwritten_scores(dtype, monkeypatch):
    """A ck1 shorter than the positions imply (public API) scores the missing windows 0, like the reference,
    even where the pooled-score buffers start as NaN; fp16 also covers the selection's 13-low-zero-bit keys."""
    L, T, H, Hkv, D = 161, 40, 8, 1, 32
    q, k, v, q_pos, ck1, ck2, scale = _inputs(L, T, H, Hkv, D, dtype, seed=3)
    ck1 = ck1[: ck1.shape[0] - 33]
    ref = naive_select_blocks(naive_stage1_block_scores(q, ck1, ck2, q_pos, P, scale), q_pos, L, P)
    empty, empty_like = torch.empty, torch.empty_like

    def nan_filled(t):
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_filled(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_filled(empty_like(*a, **kw)))
    out = triton_select_from_queries(q, ck1, ck2, q_pos, L, P, scale)
    monkeypatch.undo()
    _assert_valid_topk(out, _pooled(naive_stage1_block_scores(q, ck1, ck2, q_pos, P, scale), q_pos, L), q_pos, rel_tol=2e-2)
    assert (out == ref).float().mean() > 0.97


def test_select_blocks_ties_and_forced():
    """All-equal scores: the lowest blocks win ties; forced blocks always in; released-like K_sel > blocks."""
    L, T = 200, 5
    q_pos = torch.tensor([15, 16, 63, 150, 199], device=DEV)
    n1 = (L - P.kernel_size) // P.kernel_stride + 1
    for scores in (torch.ones(2, T, n1, device=DEV), torch.zeros(2, T, n1, device=DEV), _rand(2, T, n1, dtype=torch.float32, seed=3).abs()):
        for params in (P, InfLLMv2Params(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=2, local_blocks=1, topk=20)):
            ref = naive_select_blocks(scores, q_pos, L, params)
            assert torch.equal(triton_select_blocks(scores, q_pos, L, params), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES + [(1200, 1, 4, 2, 16)], ids=CASE_IDS + ["L1200-T1-split"])
def test_select_from_queries(case, dtype):
    q, k, v, q_pos, ck1, ck2, scale = _inputs(*case, dtype)
    scores = naive_stage1_block_scores(q, ck1, ck2, q_pos, P, scale)
    ref = naive_select_blocks(scores, q_pos, case[0], P)
    out = triton_select_from_queries(q, ck1, ck2, q_pos, case[0], P, scale)
    assert out.shape == ref.shape and out.dtype == torch.int32
    if dtype == torch.float32 and DEV == "cpu":  # the interpreter sums in the reference's order
        assert torch.equal(out, ref)
    else:  # near-ties may flip (half-precision scores, GPU summation order), but it must be a valid top-k
        _assert_valid_topk(out, _pooled(scores, q_pos, case[0]), q_pos, rel_tol=1e-4 if dtype == torch.float32 else 2e-2)


ATTN_CASES = [(64, 64, 4, 2, 16), (161, 40, 8, 1, 32), (143, 3, 4, 2, 32), (300, 1, 8, 1, 16)]
ATTN_IDS = [f"L{c[0]}-T{c[1]}-H{c[2]}-Hkv{c[3]}-D{c[4]}" for c in ATTN_CASES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTN_CASES, ids=ATTN_IDS)
def test_block_sparse_attention(case, dtype):
    q, k, v, q_pos, ck1, ck2, scale = _inputs(*case, dtype)
    idx = naive_select_blocks(naive_stage1_block_scores(q, ck1, ck2, q_pos, P, scale), q_pos, case[0], P)
    ref = naive_block_sparse_attention(q, k, v, idx, q_pos, P.block_size, scale)
    out = triton_block_sparse_attention(q, k, v, idx, q_pos, P.block_size, scale)
    assert out.dtype == q.dtype
    assert_close(out, ref, RTOL[dtype], "block-sparse attention")


def _random_lists(Hkv, T, K, q_pos, n_blk, seed):
    """Unsorted unique block lists with -1 holes and some future blocks (which the causal mask must drop)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((Hkv, T, K), -1, dtype=torch.int32)
    q_pos = q_pos.cpu()
    for h in range(Hkv):
        for t in range(T):
            hi = min(n_blk, int(q_pos[t]) // P.block_size + 2)
            pick = torch.randperm(hi, generator=g)[: K - 1]
            slots = torch.randperm(K, generator=g)[: len(pick)]
            idx[h, t, slots] = pick.to(torch.int32)
    return idx.to(DEV)


@pytest.mark.parametrize("share", [True, 1, 8, False], ids=["tile+token", "union-tile", "intersection-tile", "token-only"])
@pytest.mark.parametrize("T", [1, 30])
def test_block_sparse_attention_arbitrary_lists(T, share, monkeypatch):
    """share_min = 1 sends every block a tile token chose through the tile kernel (rows of the other tokens
    masked), 8 = the tile size only blocks every token chose; True keeps the config's (2 in the interpreter)."""
    from sala.ops.infllm_v2 import sparse_attn

    if T == 1 and share is not True:
        pytest.skip("decode does not use the tile split")
    monkeypatch.setattr(sparse_attn, "num_sms", lambda device: 4)  # a GPU's SM count would send T=30 to decode
    monkeypatch.setitem(sparse_attn._cfg(), "share", share is not False)
    if not isinstance(share, bool):
        monkeypatch.setitem(sparse_attn._cfg(), "share_min", share)
    L, H, Hkv, D = 130, 4, 2, 16
    q, k, v, q_pos, *_ = _inputs(L, T, H, Hkv, D, torch.float32, seed=5)
    idx = _random_lists(Hkv, T, 5, q_pos, math.ceil(L / P.block_size), seed=T)
    ref = naive_block_sparse_attention(q, k, v, idx, q_pos, P.block_size, D**-0.5)
    out = triton_block_sparse_attention(q, k, v, idx, q_pos, P.block_size, D**-0.5)
    assert_close(out, ref, 1e-5, "attention with arbitrary lists")


@pytest.mark.parametrize("BT, share_min", [(2, 1), (2, 2), (4, 3)])
def test_split_lists_partitions_each_tile(BT, share_min, monkeypatch):
    """Every token's blocks end up exactly once: in its tile's list (with its bit set, when >= share_min tile
    tokens chose the block) or in its private list; out-of-range entries are dropped. 35 or 18 tiles x 2 groups
    are more than the interpreter's 32 persistent programs, so scratch rows are reused (and must be reset)."""
    from sala.ops.infllm_v2 import sparse_attn
    from sala.ops.infllm_v2.sparse_attn import split_lists

    monkeypatch.setattr(sparse_attn, "num_sms", lambda device: 4)  # 32 programs on a GPU too: scratch reuse
    Hkv, T, K, n_blk = 2, 69, 6, 7
    g = torch.Generator().manual_seed(share_min)
    idx = torch.full((Hkv, T, K), -1, dtype=torch.int32)
    for h in range(Hkv):
        for t in range(T):
            pick = torch.randperm(n_blk + 2, generator=g)[: int(torch.randint(0, K + 1, (1,), generator=g))]
            idx[h, t, torch.randperm(K, generator=g)[: len(pick)]] = pick.to(torch.int32)  # some >= n_blk
    tile, bits, tile_n, private, private_n = (x.cpu() for x in split_lists(idx.to(DEV), n_blk * 16 - 5, 16, BT, share_min))
    for h in range(Hkv):
        for i_t in range(math.ceil(T / BT)):
            toks = range(i_t * BT, min(T, i_t * BT + BT))
            chosen = {t: {int(b) for b in idx[h, t] if 0 <= b < n_blk} for t in toks}
            entries = tile[h, i_t, : tile_n[h, i_t]].tolist()
            assert len(entries) == len(set(entries))
            for b, m in zip(entries, bits[h, i_t, : tile_n[h, i_t]].tolist()):
                holders = {t for t in toks if b in chosen[t]}
                assert m == sum(1 << (t - i_t * BT) for t in holders) and len(holders) >= share_min
            for t in toks:
                priv = private[h, t, : private_n[h, t]].tolist()
                assert sorted(priv + [b for b in entries if b in chosen[t]]) == sorted(chosen[t])
                assert all(sum(b in chosen[u] for u in toks) < share_min for b in priv)
    with pytest.raises(ValueError, match="tile_tokens must be in"):
        split_lists(idx.to(DEV), n_blk * 16, 16, 17, share_min)


def test_block_sparse_attention_backward():
    L, T, H, Hkv, D = 80, 24, 4, 2, 16
    q, k, v, q_pos, ck1, ck2, scale = _inputs(L, T, H, Hkv, D, torch.float32, seed=7)
    idx = naive_select_blocks(naive_stage1_block_scores(q, ck1, ck2, q_pos, P, scale), q_pos, L, P)
    do = _rand(T, H, D, dtype=torch.float32, seed=8)
    grads = []
    for fn in (naive_block_sparse_attention, triton_block_sparse_attention):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        fn(qq, kk, vv, idx, q_pos, P.block_size, scale).backward(do)
        grads.append((qq.grad, kk.grad, vv.grad))
    for name, a, b in zip("qkv", grads[1], grads[0]):
        assert_close(a, b, 1e-5, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_entries_dispatch_to_triton(dtype):
    L, T, H, Hkv, D = 161, 20, 8, 1, 32
    q, k, v, q_pos, _, _, scale = _inputs(L, T, H, Hkv, D, dtype, seed=11)
    ck1 = compress_keys(k, P.kernel_size, P.kernel_stride, backend="triton")
    ck2 = compress_keys(k, P.coarse_kernel_size, P.coarse_kernel_stride, backend="triton")
    ref = infllm_v2_attention(q, k, v, ck1, ck2, q_pos, P, scale, backend="naive")
    out = infllm_v2_attention(q, k, v, ck1, ck2, q_pos, P, scale, backend="triton")
    assert_close(out, ref, RTOL[dtype], "infllm_v2_attention")
    idx = triton_select_from_queries(q, ck1, ck2, q_pos, L, P, scale)
    fused = block_sparse_attention(q, k, v, idx, q_pos, P.block_size, scale, backend="triton")
    assert_close(fused, ref, RTOL[dtype], "fused selection path")


def test_errors():
    q, k, v, q_pos, ck1, ck2, scale = _inputs(64, 4, 4, 2, 16, torch.float32)
    idx = torch.zeros(2, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        triton_block_sparse_attention(q, k, v, idx, q_pos, 24, scale)
    with pytest.raises(ValueError, match="topk_idx must be"):
        triton_block_sparse_attention(q, k, v, idx[:1], q_pos, 16, scale)
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        triton_stage1_block_scores(q.double(), ck1.double(), ck2.double(), q_pos, P, scale)
    with pytest.raises(ValueError, match="kernel_stride"):
        bad = InfLLMv2Params(kernel_size=8, kernel_stride=6, block_size=16, init_blocks=1, local_blocks=2, topk=3)
        triton_select_from_queries(q, ck1, ck2, q_pos, 64, bad, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(80, 24, 4, 2, 16), (161, 40, 8, 1, 32), (300, 9, 4, 2, 16)],
                         ids=["L80-T24", "L161-T40-G8", "L300-T9-chunk"])
def test_triton_sparse_backward_matches_reference(case, dtype, monkeypatch):
    """SALA_SPARSE_BACKWARD=triton: dq/dk/dv against autograd through the naive attention (fp64 oracle for fp32
    inputs), with real selections (sink/local blocks chosen by every token: many work items per block)."""
    monkeypatch.setenv("SALA_SPARSE_BACKWARD", "triton")
    L, T, H, Hkv, D = case
    q, k, v, q_pos, ck1, ck2, scale = _inputs(L, T, H, Hkv, D, dtype, seed=11)
    idx = naive_select_blocks(naive_stage1_block_scores(q, ck1, ck2, q_pos, P, scale), q_pos, L, P)
    do = _rand(T, H, D, dtype=dtype, seed=12)
    grads = []
    for fn, cast in ((naive_block_sparse_attention, torch.float64), (triton_block_sparse_attention, dtype)):
        qq, kk, vv = (x.to(cast).clone().requires_grad_() for x in (q, k, v))
        fn(qq, kk, vv, idx, q_pos, P.block_size, scale).backward(do.to(cast))
        grads.append((qq.grad, kk.grad, vv.grad))
    for name, a, b in zip("qkv", grads[1], grads[0]):
        assert a.dtype == dtype
        assert_close(a.double(), b, RTOL[dtype] * (2 if dtype == torch.bfloat16 else 1), f"d{name}")


def test_triton_sparse_backward_work_items():
    """The inverted lists hold every (group, block, token) selection once, in chunks of at most ``chunk``."""
    from sala.ops.infllm_v2.sparse_attn_bwd import _work_items

    idx = torch.tensor([[[0, 2, -1], [0, 1, 2], [0, -1, -1]], [[1, -1, -1], [1, 0, -1], [1, 2, 0]]], dtype=torch.int32)
    tokens, items = _work_items(idx, n_blk=3, chunk=2)
    seen = []
    for h, b, lo, n in items.tolist():
        assert 1 <= n <= 2
        seen += [(h, b, t) for t in tokens[lo : lo + n].tolist()]
    want = [(h, int(b), t) for h in range(2) for t in range(3) for b in idx[h, t] if b >= 0]
    assert sorted(seen) == sorted(want)


def test_tile_config_fits_small_shared_memory_cards(monkeypatch):
    """99 KB-per-block cards (RTX 4090 / 5090) get 64-key tile steps; H100-class cards keep 128."""
    from sala.ops.common import launch
    from sala.ops.infllm_v2 import sparse_attn

    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", "0")
        m.setattr(launch, "_cuda_smem_per_block", lambda index: 101376)
        assert sparse_attn._cfg(torch.device("cuda", 0))["tile_keys"] == 64
        m.setattr(launch, "_cuda_smem_per_block", lambda index: 232448)
        assert sparse_attn._cfg(torch.device("cuda", 0)) is sparse_attn.GPU_CONFIG
        assert sparse_attn._cfg(torch.device("cpu")) is sparse_attn.GPU_CONFIG
    # the interpreter plans like either card inside gpu_launch_configs(), and small otherwise
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with launch.gpu_launch_configs(launch.RTX_4090):
        assert sparse_attn._cfg(torch.device("cpu")) is sparse_attn.SMALL_SMEM_CONFIG
    with launch.gpu_launch_configs(launch.H200):
        assert sparse_attn._cfg(torch.device("cpu")) is sparse_attn.GPU_CONFIG
    assert sparse_attn._cfg(torch.device("cpu")) is sparse_attn._INTERP_CONFIG


def test_sparse_backward_mode(monkeypatch):
    """SALA_SPARSE_BACKWARD: auto by default (Triton on CUDA, recompute in the CPU interpreter), validated."""
    from sala.utils.env import sparse_backward

    monkeypatch.delenv("SALA_SPARSE_BACKWARD", raising=False)
    assert sparse_backward() == "auto"
    monkeypatch.setenv("SALA_SPARSE_BACKWARD", " Torch ")
    assert sparse_backward() == "torch"
    monkeypatch.setenv("SALA_SPARSE_BACKWARD", "cuda")
    with pytest.raises(ValueError, match="SALA_SPARSE_BACKWARD must be one of"):
        sparse_backward()


@pytest.mark.parametrize("share_min", [1, 2, 8], ids=["union", "2of8", "all8"])
def test_tma_prefill_matches_pointer_loads(share_min, monkeypatch):
    """The prefill tile + token kernels with K/V blocks loaded through tensor descriptors (TMA on Hopper; the
    interpreter emulates them) agree with the pointer-load kernels and the reference, with partial last blocks
    (L off the block grid), masked tile rows and K/V that are views into a wider cache. 8-token tiles (32 rows
    at G=4); share_min 1 sends every chosen block to the tile, 8 only those all chose."""
    from sala.ops.infllm_v2 import sparse_attn

    monkeypatch.setattr(sparse_attn, "num_sms", lambda device: 4)  # T=37 takes the tile split on a GPU too
    monkeypatch.setitem(sparse_attn._cfg(), "tma_rows", 32)
    monkeypatch.setitem(sparse_attn._cfg(), "tma_share_min", share_min)
    L, T, H, Hkv, D = 157, 37, 8, 2, 32
    q, k, v, q_pos, *_ = _inputs(L, T, H, Hkv, D, torch.bfloat16, seed=11)
    cache = _rand(2, L + 9, Hkv, D, dtype=torch.bfloat16, seed=12)
    cache[0, :L], cache[1, :L] = k, v
    k, v = cache[0, :L], cache[1, :L]  # strided views: stride(0) = Hkv * D, but not contiguous with each other
    # lists drawn from a few blocks, so that tiles share blocks (every variant reaches the tile kernel)
    g = torch.Generator().manual_seed(3)
    idx = torch.full((Hkv, T, 6), -1, dtype=torch.int32)
    for h in range(Hkv):
        for t in range(T):
            hi = int(q_pos[t]) // P.block_size + 1
            pick = torch.randperm(hi, generator=g)[:5] if hi <= 6 else torch.randperm(6, generator=g)[:5] + hi - 6
            idx[h, t, torch.randperm(6, generator=g)[:len(pick)]] = pick.to(torch.int32)
    idx = idx.to(DEV)
    assert int(sparse_attn.split_lists(idx, L, P.block_size, 8, share_min)[2].sum()) > 0, "empty tile lists"
    used = []
    real = sparse_attn._tma_descriptors
    monkeypatch.setattr(sparse_attn, "_tma_descriptors", lambda *a_: used.append(real(*a_)) or used[-1])
    out = triton_block_sparse_attention(q, k, v, idx, q_pos, P.block_size, D**-0.5)
    assert used and used[-1] is not None, "the TMA path was not taken"
    monkeypatch.setitem(sparse_attn._cfg(), "tma", False)
    plain = triton_block_sparse_attention(q, k, v, idx, q_pos, P.block_size, D**-0.5)
    assert used[-1] is None
    ref = naive_block_sparse_attention(q.float(), k.float(), v.float(), idx, q_pos, P.block_size, D**-0.5)
    assert_close(out, ref, 1e-2, "TMA loads vs reference")
    assert_close(out, plain, 1e-2, "TMA loads vs pointer loads")


def test_tma_descriptors_only_where_they_apply():
    """fp32 K/V, a head dim that is not a power of two and unpacked heads keep the pointer loads."""
    from sala.ops.infllm_v2 import sparse_attn

    def descs(k, block=16):
        idx = torch.zeros(k.shape[1], 1, 1, dtype=torch.int32, device=DEV)
        return sparse_attn._tma_descriptors(k, k, sparse_attn._launch(k[:1].repeat(1, 2, 1), k, idx, block, 1.0))

    k = _rand(40, 2, 32, dtype=torch.bfloat16, seed=0)
    assert descs(k) is not None or (DEV == "cuda" and torch.cuda.get_device_capability()[0] < 9)
    assert descs(k.float()) is None
    assert descs(_rand(40, 2, 24, dtype=torch.bfloat16, seed=0)) is None
    assert descs(_rand(40, 32, 2, dtype=torch.bfloat16, seed=0).transpose(1, 2)) is None  # heads not packed
    assert descs(k[:0]) is None  # no keys
    assert descs(k[:1].expand(40, 2, 32)) is None  # broadcast rows (stride 0)
    assert descs(_rand(40, 2, 256, dtype=torch.bfloat16, seed=0), 64) is None  # box past the tuned 64 keys x 128
    assert descs(k, 8) is None  # 8-key blocks: the P.V dot needs K >= 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stage1_tma_matches_pointer_loads(dtype, monkeypatch):
    """Stage 1 with the compressed keys loaded through descriptors gives bit-identical pooled scores and the
    same selection as with pointer loads, also when ck1 is a view into a wider buffer whose other rows are NaN."""
    from sala.ops.infllm_v2 import topk

    L, T, H, Hkv, D = 150, 61, 8, 2, 32
    q, k, v, q_pos, ck1, ck2, scale = _inputs(L, T, H, Hkv, D, dtype, seed=21)
    wide = torch.full((ck1.shape[0] + 5, Hkv, D), float("nan"), dtype=dtype, device=DEV)
    wide[: ck1.shape[0]] = ck1
    ck1 = wide[: ck1.shape[0]]
    seen = []
    real = topk._ck_descriptor
    monkeypatch.setattr(topk, "_ck_descriptor", lambda *a_: seen.append(real(*a_)) or seen[-1])
    scores = triton_stage1_block_scores(q, ck1, ck2, q_pos, P, scale)
    idx = triton_select_from_queries(q, ck1, ck2, q_pos, L, P, scale)
    assert seen and all(d is not None for d in seen), "the TMA path was not taken"
    monkeypatch.setitem(topk._cfg(), "tma", False)
    assert torch.equal(triton_stage1_block_scores(q, ck1, ck2, q_pos, P, scale), scores)
    assert torch.equal(triton_select_from_queries(q, ck1, ck2, q_pos, L, P, scale), idx)
    assert not torch.isnan(scores.float()).any()
