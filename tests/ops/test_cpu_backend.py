"""The ``cpu`` backend (batched Lightning chunks, SDPA, gathered sparse blocks) against the ``naive`` reference.

Fresh random inputs, awkward shapes (9 query / 3 KV heads, lengths off the chunk and block grids, ragged
documents), relative-L2 thresholds by dtype; NaN never passes (``assert_close``).
"""

from __future__ import annotations

import pytest
import torch

from sala.model.cache import SparseLayerCache
from sala.ops import (
    block_sparse_attention,
    chunk_lightning,
    compress_keys,
    decode_attention_batch,
    dense_causal_attention,
    infllm_v2_attention,
    lightning_decay_slopes,
)
from sala.ops.common.dispatch import resolve_backend
from sala.ops.infllm_v2 import InfLLMv2Params, num_windows
from sala.ops.lightning.cpu import cpu_chunk_lightning
from sala.ops.lightning.naive import naive_recurrent_lightning
from sala.utils.testing import assert_close

# about 3x the error measured against the reference (fp32 ~1e-6 .. 4e-7, fp16 ~2.5e-4, bf16 ~2e-3)
RTOL = {torch.float64: 1e-10, torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# small geometry so the sparse path (top-k beyond sink + local window) runs at a few hundred tokens
P = InfLLMv2Params(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2, topk=3)


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("SALA_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    monkeypatch.setenv("SALA_BACKEND", "naive")
    assert resolve_backend("auto", torch.device("cpu")) == "naive"
    assert resolve_backend("cpu", torch.device("cpu")) == "cpu"


# ---- Lightning ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,chunk,segment", [(0, 64, 512), (1, 64, 512), (63, 64, 512), (64, 64, 512), (65, 16, 32),
                                             (200, 16, 48), (333, 64, 128)])
def test_lightning_prefill_matches_recurrence(dtype, T, chunk, segment):
    """Every chunk/segment boundary case: T below, at and past a chunk; partial tail chunks; several segments."""
    B, H, K, V = 2, 9, 16, 24
    q, k, v = (_rand(B, T, H, d, dtype=dtype, seed=s, scale=0.5) for s, d in ((1, K), (2, K), (3, V)))
    h0 = _rand(B, H, K, V, dtype=torch.float64 if dtype == torch.float64 else torch.float32, seed=4, scale=0.3)
    slopes = lightning_decay_slopes(H)
    o, final = cpu_chunk_lightning(q, k, v, slopes, 0.25, h0, True, None, dtype, chunk=chunk, segment=segment)
    o_ref, final_ref = naive_recurrent_lightning(q, k, v, slopes, 0.25, h0)
    assert o.dtype == dtype and final.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert o.shape == (B, T, H, V)
    if T == 0:  # empty input: the state passes through unchanged, and is a copy, not the caller's tensor
        assert torch.equal(final, h0) and final.data_ptr() != h0.data_ptr()
        return
    assert_close(o, o_ref, RTOL[dtype], "o")  # 16-bit: output rounding only, the recurrence runs in fp32
    assert_close(final, final_ref, RTOL[dtype] if dtype == torch.float64 else 5e-6, "final state")


def test_lightning_varlen_documents_start_from_their_own_state():
    """Ragged documents (one empty, boundaries inside chunks) == each document run alone from its h0 row."""
    H, K = 9, 16
    bounds = [0, 70, 70, 71, 200, 333]
    T = bounds[-1]
    q, k, v = (_rand(1, T, H, K, seed=s, scale=0.5) for s in (5, 6, 7))
    h0 = _rand(len(bounds) - 1, H, K, K, seed=8, scale=0.3)
    slopes = lightning_decay_slopes(H)
    cu = torch.tensor(bounds, dtype=torch.int32)
    o, final = chunk_lightning(q, k, v, slopes, 0.25, h0, True, cu, backend="cpu")
    for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
        o_ref, f_ref = naive_recurrent_lightning(q[:, a:b], k[:, a:b], v[:, a:b], slopes, 0.25, h0[n : n + 1])
        if b > a:
            assert_close(o[:, a:b], o_ref, 5e-6, f"doc {n} o")
        assert_close(final[n : n + 1], f_ref, 5e-6, f"doc {n} state")


def test_lightning_gradients_match_reference():
    """Autograd through the batched form (CPU training) equals autograd through the reference, fp64."""
    B, T, H, K = 1, 150, 3, 8
    ins = [_rand(B, T, H, K, dtype=torch.float64, seed=s, scale=0.5).requires_grad_() for s in (9, 10, 11)]
    h0 = _rand(B, H, K, K, dtype=torch.float64, seed=12, scale=0.3).requires_grad_()
    do = _rand(B, T, H, K, dtype=torch.float64, seed=13)
    slopes = lightning_decay_slopes(H)
    grads = {}
    for backend in ("cpu", "naive"):
        o, final = chunk_lightning(*ins, slopes, 0.3, h0, True, backend=backend)
        grads[backend] = torch.autograd.grad((o * do).sum() + final.square().sum(), [*ins, h0])
    for name, a, b in zip(("dq", "dk", "dv", "dh0"), grads["cpu"], grads["naive"]):
        assert_close(a, b, 1e-10, name)


# ---- dense attention ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,L,padded", [(37, 37, False), (1, 50, False), (13, 50, False), (20, 20, True),
                                        (1, 33, True)])
def test_dense_attention_sdpa_matches_reference(dtype, T, L, padded):
    B, H, Hkv, D = 2, 9, 3, 16
    q, k, v = _rand(B, T, H, D, dtype=dtype, seed=1), _rand(B, L, Hkv, D, dtype=dtype, seed=2), _rand(
        B, L, Hkv, D, dtype=dtype, seed=3)
    key_valid = None
    if padded:  # row 1 is left-padded by 5: its pad queries must come out as zeros, not NaN
        key_valid = torch.ones(B, L, dtype=torch.bool)
        key_valid[1, :5] = False
    out = dense_causal_attention(q, k, v, key_valid, 0.25, backend="cpu")
    ref = dense_causal_attention(q, k, v, key_valid, 0.25, backend="naive")
    if padded and T == L:
        # pad queries see no valid key: the reference gives zeros there; SDPA's output for them is unused garbage
        # that must still be finite
        assert torch.isfinite(out).all()
        out, ref = out[:, 5:], ref[:, 5:]
    assert_close(out, ref, RTOL[dtype], "dense attention")


# ---- InfLLM-v2 ---------------------------------------------------------------------------------------------------
def _sparse_inputs(L, T, dtype, seed=0, H=9, Hkv=3, D=16):
    q = _rand(T, H, D, dtype=dtype, seed=seed)
    k = _rand(L, Hkv, D, dtype=dtype, seed=seed + 1)
    v = _rand(L, Hkv, D, dtype=dtype, seed=seed + 2)
    ck1 = compress_keys(k, P.kernel_size, P.kernel_stride, backend="naive")
    ck2 = compress_keys(k, P.coarse_kernel_size, P.coarse_kernel_stride, backend="naive")
    return q, k, v, ck1, ck2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L,T,consecutive", [(301, 301, True), (301, 150, True), (250, 1, True), (97, 97, True),
                                             (301, 120, False)])
def test_infllm_v2_cpu_matches_reference(dtype, L, T, consecutive):
    """Whole path (score, select, attend): selection on query chunks and gathered-block SDPA == reference; also
    for queries at scattered positions (no dense prefix shortcut, chunks spanning far-apart blocks)."""
    q, k, v, ck1, ck2 = _sparse_inputs(L, T, dtype)
    pos = torch.arange(L - T, L) if consecutive else torch.randperm(L, generator=torch.Generator().manual_seed(9))[:T]
    out = infllm_v2_attention(q, k, v, ck1, ck2, pos, P, 0.3, backend="cpu")
    ref = infllm_v2_attention(q, k, v, ck1, ck2, pos, P, 0.3, backend="naive")
    assert_close(out, ref, RTOL[dtype], "infllm-v2")


def test_infllm_v2_cpu_really_is_sparse():
    """The same queries with every block selected (dense attention) differ: the test above compares sparse
    outputs, not dense with dense (L = 301 has 19 blocks, K_sel = 6)."""
    q, k, v, ck1, ck2 = _sparse_inputs(301, 200, torch.float64)
    pos = torch.arange(101, 301)
    sparse = infllm_v2_attention(q, k, v, ck1, ck2, pos, P, 0.3, backend="cpu")
    dense = dense_causal_attention(q[None], k[None], v[None], None, 0.3, backend="naive")[0]
    assert (sparse - dense).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_one_query_block_attention_matches_reference(dtype):
    """A single query (the decode shortcut: no union, no mask tensor) anywhere in the keys, not only at the last
    position: its own block's later keys stay masked, unused (-1) slots and a partial last block are skipped,
    and a head with nothing visible gives zeros."""
    L, Hkv, bs = 90, 3, 16
    q, k, v, _, _ = _sparse_inputs(L, 1, dtype, seed=8)
    g = torch.Generator().manual_seed(9)
    for pos in (89, 50, 16, 3):  # last key; mid-block; a block's first token; inside the first block
        own = pos // bs
        idx = torch.sort(torch.randint(0, own + 1, (Hkv, 1, 4), generator=g, dtype=torch.int32), dim=-1).values
        idx[:, :, -1] = own  # the own block, whose keys after pos must stay unseen
        idx[2, :, 0] = -1
        if pos == 50:
            idx[1] = -1  # this head sees nothing
        p = torch.tensor([pos])
        out = block_sparse_attention(q, k, v, idx, p, bs, 0.3, backend="cpu")
        ref = block_sparse_attention(q, k, v, idx, p, bs, 0.3, backend="naive")
        assert_close(out, ref, RTOL[dtype], f"one query at {pos}")
        if pos == 50:
            assert torch.equal(out[:, 3:6], torch.zeros_like(out[:, 3:6]))  # query heads of KV head 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [40, 90])  # one query chunk, and two (each chunk must get its own lists)
def test_block_sparse_attention_cpu_matches_reference(dtype, T):
    """Random block lists with unused (-1) slots, future blocks, a partial last block and queries that select
    nothing visible (they must come out as zeros, as in the reference)."""
    L, Hkv, bs = 90, 3, 16
    q, k, v, _, _ = _sparse_inputs(L, T, dtype, seed=3)
    pos = torch.arange(L - T, L)
    g = torch.Generator().manual_seed(4)
    idx = torch.randint(-1, 6, (Hkv, T, 4), generator=g, dtype=torch.int32)  # 6 blocks, 90 = 5 full + 10
    idx[0, :5] = -1  # nothing selected at all
    idx[1, :3] = 5  # only the last (partial) block
    out = block_sparse_attention(q, k, v, idx, pos, bs, 0.3, backend="cpu")
    ref = block_sparse_attention(q, k, v, idx, pos, bs, 0.3, backend="naive")
    assert torch.equal(out[:5, :3], torch.zeros_like(out[:5, :3]))
    assert_close(out, ref, RTOL[dtype], "block-sparse attention")


def test_decode_batch_cpu_matches_reference():
    """Engine decode rows: one below dense_len (dense) and two above (sparse), in their own slots."""
    S, C, Hkv, D, H = 3, 320, 3, 16, 9
    keys, values = _rand(S, C, Hkv, D, seed=5), _rand(S, C, Hkv, D, seed=6)
    pos = torch.tensor([50, 299, 180])
    slot = torch.tensor([2, 0, 1])
    n1, n2 = num_windows(C, P.kernel_size, P.kernel_stride), num_windows(C, P.coarse_kernel_size, P.coarse_kernel_stride)
    ck1, ck2 = torch.zeros(S, n1, Hkv, D), torch.zeros(S, n2, Hkv, D)
    for s in range(S):
        a = compress_keys(keys[s], P.kernel_size, P.kernel_stride, backend="naive")
        b = compress_keys(keys[s], P.coarse_kernel_size, P.coarse_kernel_stride, backend="naive")
        ck1[s, : a.shape[0]], ck2[s, : b.shape[0]] = a, b
    q = _rand(3, H, D, seed=7)
    out = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, 0.3, dense_len=100, backend="cpu")
    ref = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, 0.3, dense_len=100, backend="naive")
    assert_close(out, ref, 5e-6, "decode batch")


# ---- the HF cache ------------------------------------------------------------------------------------------------
def test_sparse_cache_appends_equal_concatenation():
    """Appends into the spare-room buffer (across reallocations) hold exactly what concatenation would; replacing
    ``keys`` (as a crop or reorder would) makes the next append start from the replacement; with autograd on,
    appends concatenate so an earlier step's saved tensors stay valid for backward."""
    cache = SparseLayerCache()
    ks, vs = [], []
    for i, T in enumerate([5, 1, 300, 1, 1, 40, 1]):
        k, v = _rand(2, T, 3, 4, seed=10 + i), _rand(2, T, 3, 4, seed=50 + i)
        ks.append(k)
        vs.append(v)
        keys, values = cache.update(k, v)
        assert torch.equal(keys, torch.cat(ks, dim=1)) and torch.equal(values, torch.cat(vs, dim=1))
    assert cache._k_buf.shape[1] < 1.25 * cache.keys.shape[1] + 257  # spare room stays bounded
    assert cache.nbytes == 2 * cache.keys.numel() * 4  # fp32 K and V, no spare room
    cache.keys, cache.values = cache.keys.flip(0)[:, :100].clone(), cache.values.flip(0)[:, :100].clone()  # reorder+crop
    k, v = _rand(2, 1, 3, 4, seed=99), _rand(2, 1, 3, 4, seed=98)
    keys, _ = cache.update(k, v)
    assert torch.equal(keys, torch.cat([torch.cat(ks, dim=1).flip(0)[:, :100], k], dim=1))

    grad_cache = SparseLayerCache()
    w = torch.ones(3, 4, requires_grad=True)
    total = 0
    for i in range(3):
        k = _rand(1, 2, 3, 4, seed=200 + i) * w
        keys, values = grad_cache.update(k, k)
        total = total + (keys * keys).sum()  # saves ``keys`` for backward
    total.backward()  # in-place appends would fail here ("modified by an inplace operation")
    assert w.grad is not None and torch.isfinite(w.grad).all()
# ---- the whole model ---------------------------------------------------------------------------------------------
def test_model_prefill_and_decode_cpu_equal_reference(tiny_sparse_config, monkeypatch):
    """A hybrid on the InfLLM-v2 path (170 tokens > dense_len 96): one-shot prefill under ``cpu`` == under ``naive``,
    and the cpu backend's token-by-token decode (HF cache, spare-room buffers) == the reference prefill's rows."""
    from sala.model import SALAForCausalLM
    from tests.conftest import randomize_

    model = randomize_(SALAForCausalLM(tiny_sparse_config)).float().eval()
    ids = torch.randint(3, 512, (1, 170), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        monkeypatch.setenv("SALA_BACKEND", "naive")
        ref = model(ids).logits
        monkeypatch.setenv("SALA_BACKEND", "cpu")
        assert_close(model(ids).logits, ref, 1e-5, "prefill")
        out = model(ids[:, :120], use_cache=True)
        steps = [out.logits]
        for t in range(120, 170):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert_close(torch.cat(steps, 1), ref, 1e-5, "decode after prefill")


# ---- stage 1 and selection -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sharp", [False, True], ids=["smooth", "underflow-ties"])
def test_stage1_scores_and_selection_equal_the_reference_bit_for_bit(dtype, sharp):
    """The cpu stage 1 (one GEMM per KV head, only the windows a chunk can see) and selection (only the blocks it
    can see, padded with -1) give the reference's exact bits, from chunks that see no coarse window yet to the
    end of the sequence. ``sharp`` scales q up so most window probabilities underflow to exactly 0: the
    selection then rests on index tie-breaks among zeros, which the visible-block shortcut must keep."""
    from sala.ops.infllm_v2.cpu import cpu_select_blocks, cpu_stage1_block_scores
    from sala.ops.infllm_v2.naive import naive_select_blocks, naive_stage1_block_scores

    params = InfLLMv2Params(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2, topk=3)
    L, H, Hkv, D = 613, 9, 3, 32
    g = torch.Generator().manual_seed(40 + sharp)
    q = (torch.randn(L, H, D, generator=g) * (30.0 if sharp else 1.0)).to(dtype)
    k = torch.randn(L, Hkv, D, generator=g).to(dtype)
    ck1, ck2 = compress_keys(k, 8, 4, backend="naive"), compress_keys(k, 32, 16, backend="naive")
    pos = torch.arange(L)
    picks = [torch.arange(0, 20), torch.arange(20, 84), torch.arange(300, 364), torch.arange(L - 64, L),
             torch.sort(torch.randperm(L, generator=g)[:50]).values]  # the last: scattered positions
    checked_nonzero = 0
    for rows in picks:
        want = naive_stage1_block_scores(q[rows], ck1, ck2, pos[rows], params, D**-0.5)
        got = cpu_stage1_block_scores(q[rows], ck1, ck2, pos[rows], params, D**-0.5)
        assert got.dtype == want.dtype and torch.equal(got, want), rows[:3]
        checked_nonzero += int((want != 0).any())
        sel_want = naive_select_blocks(want, pos[rows], L, params)
        assert torch.equal(cpu_select_blocks(got, pos[rows], L, params), sel_want), rows[:3]
        # the shortcut also holds for a call whose keys end well past its queries (a chunk of a longer prefill)
        assert torch.equal(cpu_select_blocks(got, pos[rows], L + 200, params),
                           naive_select_blocks(want, pos[rows], L + 200, params))
    assert checked_nonzero == len(picks) - 1  # only the first chunk sees no coarse window
