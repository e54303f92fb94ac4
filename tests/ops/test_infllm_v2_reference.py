"""InfLLM-v2 reference ops against loop oracles written straight from the spec (§5.3-5.6)."""

from __future__ import annotations

import math

import pytest
import torch

from sala.ops import (
    block_sparse_attention,
    compress_keys,
    dense_causal_attention,
    infllm_v2_attention,
    select_blocks,
    stage1_block_scores,
)
from sala.ops.infllm_v2 import InfLLMv2Params, num_windows
from sala.utils.testing import assert_close, rel_l2

P = InfLLMv2Params(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2, topk=3)


@pytest.fixture(autouse=True, params=["naive", "cpu"])
def op_backend(request, monkeypatch):
    """Every oracle test runs against the reference and against the CPU backend (``auto`` calls follow it)."""
    monkeypatch.setenv("SALA_BACKEND", request.param)
    return request.param


def _rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("L", list(range(28, 61)))
def test_compression_every_length_mod_stride(L):
    k = _rand(L, 2, 4)
    ck = compress_keys(k, 8, 4)
    n = 0 if L < 8 else (L - 8) // 4 + 1
    assert ck.shape == (n, 2, 4) and num_windows(L, 8, 4) == n
    for i in range(n):
        assert torch.allclose(ck[i], k[4 * i : 4 * i + 8].mean(0), atol=1e-14)
    # incremental extension from any window index gives the tail of the full result
    assert torch.equal(compress_keys(k, 8, 4, start=n // 2), ck[n // 2 :])


def test_compression_released_geometry_counts():
    for L in (31, 32, 47, 48, 127, 128, 191, 192, 8191, 8192):
        assert num_windows(L, 32, 16) == (0 if L < 32 else (L - 32) // 16 + 1)
        assert num_windows(L, 128, 64) == (0 if L < 128 else (L - 128) // 64 + 1)


def _stage1_oracle(q, k, p, scale):
    """Loops over tokens/heads/windows; q [T,H,D], k [L,Hkv,D] -> [Hkv, T, n1]."""
    T, H, _ = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    ks, st = p.kernel_size, p.kernel_stride
    w1 = [(i * st + ks - 1, k[i * st : i * st + ks].mean(0)) for i in range(num_windows(k.shape[0], ks, st))]
    w2 = [(j * 4 * st + 4 * ks - 1, k[j * 4 * st : j * 4 * st + 4 * ks].mean(0))
          for j in range(num_windows(k.shape[0], 4 * ks, 4 * st))]
    pos = k.shape[0] - T + torch.arange(T)
    out = torch.zeros(Hkv, T, len(w1), dtype=torch.float64)
    for t in range(T):
        pt = int(pos[t])
        for h in range(H):
            g = h // G
            vis2 = [scale * float(q[t, h] @ c[g]) for e, c in w2 if e <= pt]
            if not vis2:
                continue
            lse = math.log(sum(math.exp(z) for z in vis2))
            for i, (e, c) in enumerate(w1):
                if e <= pt:
                    out[g, t, i] += math.exp(scale * float(q[t, h] @ c[g]) - lse)
    return out, pos


@pytest.mark.parametrize("L,T", [(37, 37), (79, 79), (100, 13), (161, 1), (143, 143)])  # 79, 143 = 15 mod 16
def test_stage1_scores_match_loop_oracle(L, T):
    q, k = _rand(T, 4, 8, seed=1), _rand(L, 2, 8, seed=2)
    ref, pos = _stage1_oracle(q, k, P, 0.3)
    ck1, ck2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    got = stage1_block_scores(q, ck1, ck2, pos, P, 0.3)
    assert got.shape == ref.shape
    assert_close(got, ref, 1e-12)


def _select_oracle(scores, pos, L, p):
    Hkv, T, n1 = scores.shape
    bs, st, ks = p.block_size, p.kernel_stride, p.kernel_size
    nb = math.ceil(L / bs)
    k_sel = min(p.topk + p.local_blocks, nb)
    out = torch.full((Hkv, T, k_sel), -1, dtype=torch.int32)
    for g in range(Hkv):
        for t in range(T):
            qb = int(pos[t]) // bs
            val = []
            for b in range(nb):
                ov = [float(scores[g, t, i]) for i in range(n1) if i * st < (b + 1) * bs and i * st + ks > b * bs]
                v = max(ov) if ov else 0.0
                if b < p.init_blocks or qb - p.local_blocks <= b <= qb:
                    v = math.inf
                val.append(v)
            chosen = sorted(sorted(range(nb), key=lambda b: (-val[b], b))[:k_sel])
            out[g, t] = torch.tensor([b if b <= qb else -1 for b in chosen], dtype=torch.int32)
    return out


@pytest.mark.parametrize("L,T", [(150, 150), (300, 7), (64, 64), (250, 1)])
def test_select_blocks_match_oracle(L, T):
    n1 = num_windows(L, 8, 4)
    scores = torch.rand(2, T, n1, dtype=torch.float64, generator=torch.Generator().manual_seed(L))  # well separated
    pos = L - T + torch.arange(T)
    got = select_blocks(scores, pos, L, P)
    assert torch.equal(got, _select_oracle(scores, pos, L, P))
    qb = pos // 16
    assert ((got <= qb[None, :, None]) | (got == -1)).all()  # never a future block
    assert (got == qb[None, :, None]).any(-1).all()  # own block always there
    assert (got == 0).any(-1).all()  # sink block always there


def test_select_blocks_rounds_bf16_scores_before_topk():
    """bf16 scores are pooled in bf16 (official kernel rounding): blocks whose fp32 scores differ below bf16
    resolution tie, and the tie breaks towards the lower index."""
    L, T = 200, 1
    pos = torch.tensor([L - 1])
    scores = torch.zeros(1, T, num_windows(L, 8, 4), dtype=torch.float32)
    scores[0, 0, 8] = 0.5  # block 2 (windows 7..11)
    scores[0, 0, 20] = 0.5 + 1e-4  # block 5: above block 2 in fp32, equal after bf16 rounding
    # qb = 12: forced blocks 0, 10, 11, 12 fill 4 of K_sel = 5 slots, leaving one free slot
    few = InfLLMv2Params(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2, topk=3)
    fp32_pick = set(select_blocks(scores, pos, L, few)[0, 0].tolist())
    bf16_pick = set(select_blocks(scores.to(torch.bfloat16), pos, L, few)[0, 0].tolist())
    assert 5 in fp32_pick and 2 not in fp32_pick
    assert 2 in bf16_pick and 5 not in bf16_pick


def _attn_oracle(q, k, v, idx, pos, bs, scale):
    T, H, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for t in range(T):
        for h in range(H):
            g = h // G
            blocks = {int(b) for b in idx[g, t] if b >= 0}
            keys = [j for j in range(int(pos[t]) + 1) if j // bs in blocks]
            a = torch.softmax(scale * (k[keys, g] @ q[t, h]), 0)
            out[t, h] = a @ v[keys, g]
    return out


@pytest.mark.parametrize("L,T", [(150, 150), (161, 20), (300, 1)])
def test_block_sparse_attention_matches_oracle(L, T):
    q, k, v = _rand(T, 4, 8, seed=3), _rand(L, 2, 8, seed=4), _rand(L, 2, 8, seed=5)
    pos = L - T + torch.arange(T)
    scores = torch.rand(2, T, num_windows(L, 8, 4), dtype=torch.float64)
    idx = select_blocks(scores, pos, L, P)
    got = block_sparse_attention(q, k, v, idx, pos, 16, 0.3)
    assert_close(got, _attn_oracle(q, k, v, idx, pos, 16, 0.3), 1e-12)


def test_sparse_equals_dense_when_all_blocks_fit():
    """A query whose block index is below K_sel selects every past block: InfLLM-v2 == dense causal (spec §5.5.5).

    Runs the selecting path itself (stage 1, select, block-sparse), not the entry's dense routing of such queries,
    over 10 blocks: the first 5 blocks' queries keep every block and match dense; later ones really drop blocks."""
    L, easy = 160, 80  # 10 blocks of 16; K_sel = topk + local_blocks = 5 blocks
    q, k, v = _rand(L, 4, 8, seed=6), _rand(L, 2, 8, seed=7), _rand(L, 2, 8, seed=8)
    pos = torch.arange(L)
    idx = select_blocks(stage1_block_scores(q, compress_keys(k, 8, 4), compress_keys(k, 32, 16), pos, P, 0.3), pos, L, P)
    kept = (idx >= 0).sum(-1)  # [Hkv, T] blocks each query attends to
    assert torch.equal(kept[:, :easy], (pos[:easy] // 16 + 1).expand(2, -1))  # every past block
    assert (kept[:, easy:] < (pos[easy:] // 16 + 1)).all()  # the sparse path drops blocks past the prefix
    o_sparse = block_sparse_attention(q, k, v, idx, pos, 16, 0.3)
    o_dense = dense_causal_attention(q[None], k[None], v[None], None, 0.3)[0]
    assert_close(o_sparse[:easy], o_dense[:easy], 1e-12)
    assert rel_l2(o_sparse[easy:], o_dense[easy:]) > 1e-2  # and those queries really differ from dense


def test_dense_causal_with_left_padding_matches_unpadded():
    q, k, v = _rand(2, 9, 4, 8, seed=9), _rand(2, 20, 2, 8, seed=10), _rand(2, 20, 2, 8, seed=11)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :6] = False
    o = dense_causal_attention(q, k, v, valid, 0.3)
    o0 = dense_causal_attention(q[:1], k[:1], v[:1], None, 0.3)
    o1 = dense_causal_attention(q[1:], k[1:, 6:], v[1:, 6:], None, 0.3)
    assert_close(o[:1], o0, 1e-12)
    assert_close(o[1:], o1, 1e-12)
    # explicit loop: query t sees keys <= L - T + t
    G = 2
    for t in range(9):
        for h in range(4):
            a = torch.softmax(0.3 * (k[0, : 12 + t, h // G] @ q[0, t, h]), 0)
            assert torch.allclose(o[0, t, h], a @ v[0, : 12 + t, h // G], atol=1e-12)


def test_sparse_op_errors_are_specific():
    q, k = _rand(5, 4, 8), _rand(10, 2, 8)
    with pytest.raises(ValueError, match="query position 12 has no key"):
        infllm_v2_attention(q, k, k, k[:0], k[:0], torch.arange(8, 13), P, 1.0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        block_sparse_attention(_rand(5, 3, 8), k, k, torch.zeros(2, 5, 1, dtype=torch.int32), torch.arange(5), 16, 1.0)
    with pytest.raises(ValueError, match="dense attention wants"):
        dense_causal_attention(q, k, k, None, 1.0)
    with pytest.raises(ValueError, match="at least as many keys"):
        dense_causal_attention(_rand(1, 5, 4, 8), _rand(1, 3, 2, 8), _rand(1, 3, 2, 8), None, 1.0)


@pytest.mark.parametrize("L,T", [(150, 150), (150, 90), (150, 60), (150, 1)])
def test_dense_routing_of_easy_queries_equals_full_sparse_path(L, T):
    """infllm_v2_attention sends queries with p < K_sel * block to dense attention; same result as selecting."""
    q, k, v = _rand(T, 4, 8, seed=12), _rand(L, 2, 8, seed=13), _rand(L, 2, 8, seed=14)
    pos = L - T + torch.arange(T)
    ck1, ck2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    idx = select_blocks(stage1_block_scores(q, ck1, ck2, pos, P, 0.3), pos, L, P)
    ref = block_sparse_attention(q, k, v, idx, pos, 16, 0.3)
    assert_close(infllm_v2_attention(q, k, v, ck1, ck2, pos, P, 0.3), ref, 1e-12)


def test_first_pos_hint_gives_same_result_and_is_checked():
    L, T = 150, 40
    q, k, v = _rand(T, 4, 8, seed=15), _rand(L, 2, 8, seed=16), _rand(L, 2, 8, seed=17)
    pos = L - T + torch.arange(T)
    ck1, ck2 = compress_keys(k, 8, 4), compress_keys(k, 32, 16)
    a = infllm_v2_attention(q, k, v, ck1, ck2, pos, P, 0.3)
    b = infllm_v2_attention(q, k, v, ck1, ck2, pos, P, 0.3, first_pos=L - T)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="query position 150 has no key: only 150 keys given"):
        infllm_v2_attention(q, k, v, ck1, ck2, pos, P, 0.3, first_pos=L - T + 1)
