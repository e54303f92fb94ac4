"""Graph-safe batched decode ops (one token per row, each row in its own cache slot) vs per-row references.

``decode_attention_batch`` (Triton: stage 1 + selection + attention with slot indirection and per-row
dense/sparse choice) against the reference loop, and ``append_compressed_keys`` against compressing the whole
slot. On CPU the Triton side runs in the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from sala.ops import append_compressed_keys, compress_keys, decode_attention_batch, infllm_v2_attention
from sala.ops.infllm_v2 import InfLLMv2Params, num_windows
from sala.ops.infllm_v2.naive import naive_compress_keys, naive_dense_causal_attention
from sala.utils.testing import assert_close

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

P = InfLLMv2Params(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2, topk=3)
DENSE_LEN = 96
DEV = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _slots(S, C, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(S, C, Hkv, D, generator=g).to(dtype).to(DEV)
    values = torch.randn(S, C, Hkv, D, generator=g).to(dtype).to(DEV)
    return keys, values


def _full_compression(keys, C):
    S = keys.shape[0]
    n1, n2 = num_windows(C, P.kernel_size, P.kernel_stride), num_windows(C, P.coarse_kernel_size, P.coarse_kernel_stride)
    ck1 = torch.stack([naive_compress_keys(keys[s, :C], P.kernel_size, P.kernel_stride) for s in range(S)])
    ck2 = torch.stack([naive_compress_keys(keys[s, :C], P.coarse_kernel_size, P.coarse_kernel_stride) for s in range(S)])
    assert ck1.shape[1] == n1 and ck2.shape[1] == n2
    return ck1, ck2


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_decode_attention_batch_matches_per_row_reference(dtype):
    """Rows at both sides of dense_len, lengths off the block grid, two rows sharing a slot, slots out of order."""
    S, C, H, Hkv, D = 4, 400, 8, 2, 16
    keys, values = _slots(S, C, Hkv, D, dtype, seed=1)
    ck1, ck2 = _full_compression(keys, C)  # windows beyond a row's position exist but must not be seen
    slot = torch.tensor([2, 0, 3, 1, 2], device=DEV)
    pos = torch.tensor([399, 94, 95, 142, 200], device=DEV)  # dense: 94 (L=95); sparse: L = 96, 143, 201, 400
    q = torch.randn(5, H, D, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEV)
    scale = D**-0.5
    got = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, scale, DENSE_LEN, backend="triton")
    assert got.dtype == dtype and not got.isnan().any()
    for t in range(5):
        s, L = int(slot[t]), int(pos[t]) + 1
        kb, vb = keys[s, :L].float(), values[s, :L].float()
        if L < DENSE_LEN:
            want = naive_dense_causal_attention(q[None, t : t + 1].float(), kb[None], vb[None], None, scale)[0, 0]
        else:
            c1 = ck1[s, : num_windows(L, 8, 4)]
            c2 = ck2[s, : num_windows(L, 32, 16)]
            # selection must follow the model dtype's rounding: run the reference at the input dtype
            want = infllm_v2_attention(q[t : t + 1], keys[s, :L], values[s, :L], c1, c2, pos[t : t + 1], P, scale,
                                       "naive")[0].float()
        assert_close(got[t].float(), want, RTOL[dtype], f"row {t} (L={L})")
    ref = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, scale, DENSE_LEN, backend="naive")
    assert_close(got.float(), ref.float(), RTOL[dtype], "triton vs reference entry")


def test_decode_attention_batch_dense_only():
    """dense_len None (an all-softmax model): a flash-decoding pass over every block up to the row's own."""
    S, C, H, Hkv, D = 3, 300, 4, 1, 32
    keys, values = _slots(S, C, Hkv, D, torch.float32, seed=3)
    slot = torch.tensor([1, 2, 0], device=DEV)
    pos = torch.tensor([0, 299, 77], device=DEV)
    q = torch.randn(3, H, D, generator=torch.Generator().manual_seed(4)).to(DEV)
    got = decode_attention_batch(q, keys, values, None, None, slot, pos, P, 0.3, None, backend="triton")
    ref = decode_attention_batch(q, keys, values, None, None, slot, pos, P, 0.3, None, backend="naive")
    assert_close(got, ref, 1e-5, "dense decode batch")
    with pytest.raises(ValueError, match="compressed-key caches"):
        decode_attention_batch(q, keys, values, None, None, slot, pos, P, 0.3, DENSE_LEN)
    with pytest.raises(ValueError, match="slot/pos"):
        decode_attention_batch(q, keys, values, None, None, slot[:2], pos, P, 0.3, None)


@pytest.mark.parametrize("backend", ["triton", "naive"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_append_compressed_keys_builds_the_full_compression(backend, dtype):
    """Appending token by token from an empty cache gives exactly (bit for bit) what compressing the whole slot
    with the same backend gives, so prefill-built and decode-built windows agree."""
    S, C, Hkv, D = 3, 140, 2, 16
    keys, _ = _slots(S, C, Hkv, D, dtype, seed=5)
    ck1 = torch.full((S, num_windows(C, 8, 4), Hkv, D), float("nan"), dtype=dtype, device=DEV)
    ck2 = torch.full((S, num_windows(C, 32, 16), Hkv, D), float("nan"), dtype=dtype, device=DEV)
    for p in range(C):  # slot 1 runs 3 tokens behind; slot 0 stops at 100
        slot = torch.tensor([0, 1, 2] if p < 100 else [1, 2], device=DEV)
        pos = torch.tensor([p, max(p - 3, 0), p] if p < 100 else [max(p - 3, 0), p], device=DEV)
        append_compressed_keys(keys, ck1, ck2, slot, pos, 8, 4, backend=backend)
    for s, L in ((0, 100), (1, C - 3), (2, C)):
        for buf, ks, st in ((ck1, 8, 4), (ck2, 32, 16)):
            n = num_windows(L, ks, st)
            want = compress_keys(keys[s, :L], ks, st, backend=backend)
            torch.testing.assert_close(buf[s, :n], want, rtol=0, atol=0)
            assert buf[s, n:].isnan().all(), f"slot {s}: a window past length {L} was written"


@pytest.mark.parametrize("dense_len", [DENSE_LEN, None], ids=["sparse-model", "dense-model"])
def test_decode_batch_never_reads_past_the_row(dense_len):
    """Cache memory after a row's position may be anything (never written, or a freed buffer): NaN there must
    not reach the output, although the row's own block and the capacity extend past it."""
    S, C, H, Hkv, D = 2, 320, 8, 2, 16
    keys, values = _slots(S, C, Hkv, D, torch.float32, seed=7)
    slot = torch.tensor([1, 0], device=DEV)
    pos = torch.tensor([200, 90], device=DEV)
    ck1, ck2 = None, None
    if dense_len is not None:
        ck1, ck2 = _full_compression(keys, C)
    for s, p in zip(slot.tolist(), pos.tolist()):
        keys[s, p + 1 :] = float("nan")
        values[s, p + 1 :] = float("nan")
    q = torch.randn(2, H, D, generator=torch.Generator().manual_seed(8)).to(DEV)
    got = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, 0.25, dense_len, backend="triton")
    ref = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, 0.25, dense_len, backend="naive")
    assert not got.isnan().any()
    assert_close(got, ref, 1e-5, "NaN past the position")


def test_decode_batch_selection_reads_each_rows_slot():
    """Stage 1 + selection of the batch equal the per-row reference selection, with slots whose compressed keys
    differ in scale (a row scored against another slot's ck1 or ck2 would pick other blocks)."""
    from sala.ops.infllm_v2.naive import naive_select_blocks, naive_stage1_block_scores
    from sala.ops.infllm_v2.topk import triton_select_decode_batch

    S, C, H, Hkv, D = 3, 640, 8, 2, 16
    keys, _ = _slots(S, C, Hkv, D, torch.float32, seed=9)
    keys *= torch.tensor([0.5, 1.0, 3.0], device=DEV).view(S, 1, 1, 1)  # distinct score scales per slot
    ck1, ck2 = _full_compression(keys, C)
    slot = torch.tensor([2, 0, 1, 2], device=DEV)
    pos = torch.tensor([639, 500, 333, 94], device=DEV)  # the last row is below dense_len
    q = torch.randn(4, H, D, generator=torch.Generator().manual_seed(10)).to(DEV)
    idx, counts = triton_select_decode_batch(q, ck1, ck2, slot, pos, C, P, 0.25, DENSE_LEN)
    for t in range(4):
        s, L = int(slot[t]), int(pos[t]) + 1
        if L < DENSE_LEN:
            want = torch.arange(-(-L // P.block_size), device=DEV)
        else:
            c1, c2 = ck1[s, : num_windows(L, 8, 4)], ck2[s, : num_windows(L, 32, 16)]
            scores = naive_stage1_block_scores(q[t : t + 1], c1, c2, pos[t : t + 1], P, 0.25)
            sel = naive_select_blocks(scores, pos[t : t + 1], L, P)  # [Hkv, 1, K_sel]
        for h in range(Hkv):
            ref = want if L < DENSE_LEN else sel[h, 0][sel[h, 0] >= 0].sort().values
            n = int(counts[h, t])
            assert n == ref.numel(), f"row {t} head {h}: {n} blocks, want {ref.numel()}"
            assert torch.equal(idx[h, t, :n].long(), ref.long()), f"row {t} head {h}"


class _GridSpy:
    """Stands in for a Triton kernel: records each launch grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.mark.parametrize("dense_len", [DENSE_LEN, None], ids=["sparse-model", "dense-model"])
def test_decode_batch_single_row_splits_by_its_own_length(dense_len, monkeypatch):
    """Batch 1 in a large cache: the LSE and attention work is split over several programs sized for the
    capacity, and each program re-splits the row's own (shorter) lists; the merge must equal the reference."""
    from sala.ops.infllm_v2 import sparse_attn, topk

    S, C, H, Hkv, D = 2, 1600, 4, 2, 16
    keys, values = _slots(S, C, Hkv, D, torch.float32, seed=13)
    ck1, ck2 = _full_compression(keys, C) if dense_len else (None, None)
    q = torch.randn(1, H, D, generator=torch.Generator().manual_seed(14)).to(DEV)
    lse, attn = _GridSpy(topk._stage1_lse_kernel), _GridSpy(sparse_attn._sparse_token_kernel)
    for p in (1000, 150, 40):
        slot, pos = torch.tensor([1], device=DEV), torch.tensor([p], device=DEV)
        with monkeypatch.context() as m:
            m.setattr(topk, "_stage1_lse_kernel", lse)
            m.setattr(sparse_attn, "_sparse_token_kernel", attn)
            got = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, 0.25, dense_len, backend="triton")
        ref = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, 0.25, dense_len, backend="naive")
        assert_close(got, ref, 1e-5, f"position {p}")
    # the capacity-sized split really runs > 1 program per (row, KV head): the grids' last axis
    assert len(attn.grids) == 3 and all(g[:2] == (1, Hkv) and g[2] > 1 for g in attn.grids), attn.grids
    if dense_len:
        assert len(lse.grids) == 3 and all(g[2] > 1 for g in lse.grids), lse.grids


def test_decode_batch_errors():
    S, C, H, Hkv, D = 2, 64, 4, 2, 16
    keys, values = _slots(S, C, Hkv, D, torch.float32, seed=15)
    ck1, ck2 = _full_compression(keys, C)
    q = torch.randn(1, H, D, device=DEV)
    slot, pos = torch.tensor([0], device=DEV), torch.tensor([10], device=DEV)
    with pytest.raises(ValueError, match="share D"):
        decode_attention_batch(q[..., :8], keys, values, ck1, ck2, slot, pos, P, 0.3, DENSE_LEN)
    with pytest.raises(ValueError, match="ck1 must be"):
        decode_attention_batch(q, keys, values, ck1[:1], ck2, slot, pos, P, 0.3, DENSE_LEN)
    with pytest.raises(TypeError, match="integer"):
        decode_attention_batch(q, keys, values, ck1, ck2, slot.float(), pos, P, 0.3, DENSE_LEN)
    with pytest.raises(ValueError, match="keys/values"):
        append_compressed_keys(keys[0], ck1, ck2, slot, pos, 8, 4)


@pytest.mark.parametrize("S,BS", [(150, 64), (5, 8), (64, 64)])
def test_flash_decoding_merge_of_many_splits(monkeypatch, S, BS):
    """The merge of S (o, log2-sum-exp) partials per (query, head) row, BS splits per load: against the softmax
    weighting of the partials in fp64, with empty splits (-inf, o = 0) scattered in, one row empty throughout (0)
    and more splits than one load holds (150 over steps of 64)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton

    from sala.ops.infllm_v2.sparse_attn import _merge_partials_kernel

    g = torch.Generator().manual_seed(S)
    T, H, D = 2, 3, 24
    R = T * H
    po = torch.randn(S, R, D, generator=g)
    pl = 8 * torch.randn(S, R, generator=g)
    empty = torch.rand(S, R, generator=g) < 0.3
    empty[:, 4] = True
    pl[empty], po[empty] = float("-inf"), 0.0
    w = torch.softmax(pl.double() * torch.log(torch.tensor(2.0, dtype=torch.float64)), dim=0).nan_to_num(0.0)
    want = (w[..., None] * po.double()).sum(0).view(T, H, D)
    o = torch.full((T, H, D), float("nan"))
    _merge_partials_kernel[(R,)](po, pl, o, S, R, H, o.stride(0), o.stride(1), D=D,
                                 BD=triton.next_power_of_2(D), BS=BS, RNE=False)
    assert torch.equal(o[1, 1], torch.zeros(D))  # row 4: every split empty
    assert_close(o.double(), want, 1e-6, f"merge of {S} splits, {BS} per load")
