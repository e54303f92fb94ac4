"""Every kernel on the training and inference path at the SmolLM2-135M geometry (issue: SmolLM2 -> SALA):
9 query heads (not a power of two), 3 KV heads in the softmax layers (GQA group 3), 9 Lightning heads (K/V
expanded), head_dim 64, hidden 576. Fast path (Triton; SDPA for dense attention) vs the naive reference on
fresh random inputs, forward and backward.

CPU: the Triton interpreter at small T (conftest sets TRITON_INTERPRET=1). The ``gpu`` tests use realistic
lengths (512 / 2048 / 8192 packed with documents of 37, 2011, 1, ... tokens, bf16, the released
sparse_config); run just them on a CUDA machine with ``pytest -m gpu tests/ops/test_smollm2_geometry.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from sala.model import SALAForCausalLM, preset
from sala.model.configuration_sala import mixer_schedule
from sala.model.modeling_sala import rope_cos_sin
from sala.ops import (
    append_compressed_keys,
    apply_rope,
    chunk_lightning,
    compress_keys,
    decode_attention_batch,
    dense_causal_attention,
    infllm_v2_attention,
    lightning_decay_slopes,
    lightning_step,
    qk_norm_rope,
    residual_rms_norm,
    rms_norm,
    sigmoid_gate,
    silu_mul,
)
from sala.ops.elementwise import naive_scaled_residual, naive_sigmoid_gate, naive_silu_mul
from sala.ops.infllm_v2 import InfLLMv2Params, num_windows
from sala.ops.infllm_v2.naive import (
    naive_block_sparse_attention,
    naive_compress_keys,
    naive_dense_causal_attention,
    naive_select_blocks,
    naive_stage1_block_scores,
)
from sala.ops.lightning import naive_recurrent_lightning
from sala.ops.norm import naive_rms_norm
from sala.ops.rope import naive_apply_rope
from sala.utils.testing import assert_close, rel_l2
from tests.conftest import randomize_

triton = pytest.importorskip("triton")

from sala.ops.infllm_v2.sparse_attn import triton_block_sparse_attention  # noqa: E402
from sala.ops.infllm_v2.topk import (  # noqa: E402
    triton_select_blocks,
    triton_select_from_queries,
    triton_stage1_block_scores,
)
from sala.ops.lightning.chunk import triton_chunk_lightning  # noqa: E402

pytestmark = pytest.mark.triton

H, HKV, D, HIDDEN = 9, 3, 64, 576  # SmolLM2-135M: 9 x 64 = 576, GQA group 3
DEV = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# the released proportions (window = 2 strides, block = 4 strides) at half size with a short selection: K_sel = 5
# of which 3 are forced (sink, previous, own block), so 2 are chosen by score; the sparse path starts at 160 tokens
P = InfLLMv2Params(kernel_size=16, kernel_stride=8, block_size=32, init_blocks=1, local_blocks=1, topk=4)
P_RELEASED = InfLLMv2Params(kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, local_blocks=32, topk=64)
# packed training rows at each training length: a 1-token document and lengths off the 64-token chunk grid
DOCS = {512: [37, 1, 474], 2048: [37, 2011], 8192: [37, 2011, 1, 6143]}


def _rand(*shape, dtype=torch.float32, gen=None, std=1.0):
    return (std * torch.randn(*shape, generator=gen)).to(device=DEV, dtype=dtype)


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


def _leaves(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def _grads(tensors):
    return [t.grad for t in tensors if t is not None]


# -------------------------------------------------------------------------------------------------------------
# Lightning (9 heads, K = V = 64)
# -------------------------------------------------------------------------------------------------------------
def test_decay_slopes_for_nine_heads():
    """ALiBi rule for n = 9 (not a power of two): slopes(8) ++ slopes(16)[0::2][:1] = 2^-1 .. 2^-8, 2^-0.5."""
    want = torch.tensor([2.0**-i for i in range(1, 9)] + [2.0**-0.5], dtype=torch.float64)
    torch.testing.assert_close(lightning_decay_slopes(H), want, rtol=0, atol=1e-15)
    from sala.model.modeling_sala import _slopes

    torch.testing.assert_close(_slopes(H, "cpu"), want, rtol=0, atol=1e-15)  # what the Lightning layers use


def _lightning_case(dtype, B, T, n_state, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (_rand(B, T, H, D, dtype=dtype, gen=g) for _ in range(3))
    h0 = None if n_state is None else _rand(n_state, H, D, D, gen=g, std=0.1)
    return q, k, v, h0


def _check_chunk_lightning(dtype, *, B=1, T=None, lens=None, with_h0, seg, seed, rtol=None):
    """Triton prefill (o, final state and dq/dk/dv/dh0 under random cotangents) vs the fp64 reference.
    Batched [B, T] when ``lens`` is None, else one packed row of documents ``lens`` (cu_seqlens)."""
    cu = None if lens is None else _cu(lens)
    B, T, n = (B, T, B) if lens is None else (1, sum(lens), len(lens))
    q, k, v, h0 = _lightning_case(dtype, B, T, n if with_h0 else None, seed)
    g = torch.Generator().manual_seed(seed + 1)
    do, dht = _rand(*v.shape, gen=g), _rand(n, H, D, D, gen=g)
    slopes, scale = lightning_decay_slopes(H), D**-0.5

    ours = _leaves(q, k, v, h0)
    o, final = triton_chunk_lightning(*ours[:3], slopes, scale, ours[3], True, cu, torch.float32, seg_chunks=seg)
    ((o * do).sum() + (final * dht).sum()).backward()
    ref = _leaves(q, k, v, h0, dtype=torch.float64)
    ro, rf = chunk_lightning(*ref[:3], slopes, scale, ref[3], True, cu, backend="naive")
    ((ro * do.double()).sum() + (rf * dht.double()).sum()).backward()

    rtol = rtol or RTOL[dtype]
    assert_close(o, ro, rtol, "o")
    assert_close(final, rf, rtol, "final_state")
    for name, a, b in zip(("dq", "dk", "dv", "dh0"), _grads(ours), _grads(ref)):
        assert a.dtype == (torch.float32 if name == "dh0" else dtype)
        assert_close(a, b, rtol, name)


FP32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(
    "B,T,seg,with_h0,dtype",
    [(2, 77, None, False, FP32), (2, 77, None, True, BF16), (1, 130, 1, True, FP32)],
    ids=["B2-T77-fp32", "B2-T77-h0-bf16", "B1-T130-seg1-h0-fp32"],
)
def test_chunk_lightning_batched(B, T, seg, with_h0, dtype):
    _check_chunk_lightning(dtype, B=B, T=T, with_h0=with_h0, seg=seg, seed=T)


@pytest.mark.parametrize(
    "seg,with_h0,dtype",
    [(None, False, BF16), (None, True, FP32), (1, True, BF16), (1, False, FP32)],
    ids=["bf16", "h0-fp32", "seg1-h0-bf16", "seg1-fp32"],
)
def test_chunk_lightning_varlen(seg, with_h0, dtype):
    """Packed documents of 37, 1 and 90 tokens (none a multiple of the 64-token chunk; 90 crosses one)."""
    _check_chunk_lightning(dtype, lens=[37, 1, 90], with_h0=with_h0, seg=seg, seed=5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lightning_prefill_then_decode_steps(dtype):
    """Triton prefill of 70 tokens, then 3 ``lightning_step`` calls on an engine-style state pool (state_rows)
    == the token-by-token fp64 recurrence over all 73 tokens."""
    N, T0, steps = 3, 70, 3
    q, k, v, _ = _lightning_case(dtype, N, T0 + steps, None, seed=21)
    slopes, scale = lightning_decay_slopes(H), D**-0.5
    _, state = chunk_lightning(q[:, :T0], k[:, :T0], v[:, :T0], slopes, scale, backend="triton")
    pool = _rand(5, H, D, D, gen=torch.Generator().manual_seed(22))
    rows = torch.tensor([3, 0, 4], device=DEV)
    pool[rows] = state
    untouched = pool[[1, 2]].clone()
    outs = [lightning_step(q[:, t], k[:, t], v[:, t], slopes, scale, pool, backend="triton", state_rows=rows)
            for t in range(T0, T0 + steps)]
    ro, rf = naive_recurrent_lightning(q.double(), k.double(), v.double(), slopes, scale)
    assert outs[0].dtype == dtype and pool.dtype == torch.float32
    assert_close(torch.stack(outs, 1), ro[:, T0:], RTOL[dtype], "decode o")
    assert_close(pool[rows], rf, RTOL[dtype], "decode state")
    assert torch.equal(pool[[1, 2]], untouched)
    # the plain (no state_rows) step, fp32
    st = state.clone()
    o = lightning_step(q[:, T0].float(), k[:, T0].float(), v[:, T0].float(), slopes, scale, st, backend="triton")
    assert_close(o, ro[:, T0], RTOL[dtype], "plain step")


# -------------------------------------------------------------------------------------------------------------
# Dense causal attention of the softmax layers (GQA 9 / 3)
# -------------------------------------------------------------------------------------------------------------
def _check_dense(dtype, B, T, L, key_valid=None, backward=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _rand(B, T, H, D, dtype=dtype, gen=g), _rand(B, L, HKV, D, dtype=dtype, gen=g), _rand(B, L, HKV, D, dtype=dtype, gen=g)
    scale = D**-0.5
    ours = _leaves(q, k, v)
    o = dense_causal_attention(*ours, key_valid, scale, backend="triton")  # torch SDPA (flash / cuDNN on CUDA)
    ref = _leaves(q, k, v, dtype=torch.float64 if DEV == "cpu" else torch.float32)
    ro = naive_dense_causal_attention(*ref, key_valid, scale)
    rows = torch.ones(B, T, dtype=torch.bool, device=DEV) if key_valid is None else key_valid[:, L - T :]
    assert o.dtype == dtype
    assert_close(o[rows], ro[rows], RTOL[dtype], "o")
    if backward:
        do = _rand(B, T, H, D, gen=torch.Generator().manual_seed(seed + 1))
        (o.float() * do).sum().backward()
        (ro * do.to(ro.dtype)).sum().backward()
        for name, a, b in zip(("dq", "dk", "dv"), _grads(ours), _grads(ref)):
            assert_close(a, b, RTOL[dtype] * (2 if dtype == torch.bfloat16 else 1), name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,L", [(2, 77, 77), (2, 9, 40), (3, 1, 40)], ids=["prefill-T77", "chunk-T9-L40", "decode-L40"])
def test_dense_causal_attention(B, T, L, dtype):
    _check_dense(dtype, B, T, L, seed=T + L)


def test_dense_causal_attention_left_padded():
    valid = torch.ones(2, 40, dtype=torch.bool, device=DEV)
    valid[1, :13] = False
    _check_dense(torch.float32, 2, 20, 40, key_valid=valid, backward=False, seed=3)


# -------------------------------------------------------------------------------------------------------------
# InfLLM-v2 (H = 9, Hkv = 3, D = 64)
# -------------------------------------------------------------------------------------------------------------
def _sparse_inputs(L, T, dtype, params=P, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _rand(T, H, D, dtype=dtype, gen=g), _rand(L, HKV, D, dtype=dtype, gen=g), _rand(L, HKV, D, dtype=dtype, gen=g)
    q_pos = torch.arange(L - T, L, device=DEV)
    ck1 = naive_compress_keys(k, params.kernel_size, params.kernel_stride)
    ck2 = naive_compress_keys(k, params.coarse_kernel_size, params.coarse_kernel_stride)
    return q, k, v, q_pos, ck1, ck2, D**-0.5


def _pooled(scores, q_pos, L, params):
    """Block scores after pooling and forcing, as the reference selection sees them: [Hkv, T, n_blocks] fp32."""
    Hkv, T, n1 = scores.shape
    r, left = params.block_size // params.kernel_stride, (params.kernel_size - 1) // params.kernel_stride
    n_blk = math.ceil(L / params.block_size)
    padded = torch.zeros(Hkv, T, n_blk * r + 2 * left + r, device=scores.device)
    usable = min(n1, n_blk * r)
    padded[..., left : left + usable] = scores[..., :usable].float()
    pooled = padded.unfold(-1, r + left, r)[..., :n_blk, :].amax(-1)
    blk = torch.arange(n_blk, device=scores.device)
    qb = (q_pos // params.block_size)[:, None]
    forced = (blk < params.init_blocks) | ((blk >= qb - params.local_blocks) & (blk <= qb))
    return pooled.masked_fill(forced[None], float("inf")), qb


def _assert_valid_topk(idx, scores, q_pos, L, params, rel_tol):
    """idx is an ascending top-K_sel of the pooled scores (up to ``rel_tol`` near-ties), future blocks -1."""
    pooled, qb = _pooled(scores, q_pos, L, params)
    n_blk = pooled.shape[-1]
    blk = torch.arange(n_blk, device=idx.device)
    past = blk[None, None, :] <= qb[None]  # [1, T, n_blk]
    kept = idx >= 0
    assert torch.all(torch.where(kept, idx, 0) <= qb[None]), "a selected block lies in the future"
    srt = torch.where(kept, idx, n_blk + 1)
    assert torch.all((srt[..., 1:] > srt[..., :-1]) | ~kept[..., 1:]), "not ascending / duplicated"
    sel = torch.zeros(*pooled.shape[:2], n_blk + 1, dtype=torch.bool, device=idx.device)
    sel.scatter_(-1, torch.where(kept, idx, n_blk).long(), True)
    sel = sel[..., :n_blk]
    want_n = torch.clamp(past.sum(-1), max=idx.shape[-1]).expand_as(sel[..., 0])
    assert torch.equal(sel.sum(-1), want_n), "wrong number of selected blocks"
    lo = torch.where(sel, pooled, float("inf")).amin(-1)
    hi = torch.where(~sel & past, pooled, float("-inf")).amax(-1)
    ok = (lo >= hi - rel_tol * hi.abs().clamp_min(1e-30)) | torch.isinf(hi)
    assert ok.all(), f"{int((~ok).sum())} rows selected a block scoring below an unselected one"


@pytest.mark.parametrize("dtype", DTYPES)
def test_compress_keys(dtype):
    k = _rand(333, HKV, D, dtype=dtype, gen=torch.Generator().manual_seed(1))
    for ks, st in ((P.kernel_size, P.kernel_stride), (P.coarse_kernel_size, P.coarse_kernel_stride)):
        for start in (0, 3):
            ref = naive_compress_keys(k, ks, st, start)
            out = compress_keys(k, ks, st, start, backend="triton")
            assert out.shape == ref.shape and out.dtype == dtype and ref.numel()
            assert_close(out, ref, 1e-6 if dtype == torch.float32 else 5e-3, f"ck ks={ks} start={start}")


@pytest.mark.parametrize(
    "L,T,dtype",
    [(200, 200, FP32), (330, 40, FP32), (330, 40, BF16), (300, 1, BF16)],
    ids=["L200-T200-fp32", "L330-T40-fp32", "L330-T40-bf16", "decode-L300-bf16"],
)
def test_stage1_scores_and_selection(L, T, dtype):
    q, k, v, q_pos, ck1, ck2, scale = _sparse_inputs(L, T, dtype, seed=L + T)
    ref = naive_stage1_block_scores(q, ck1, ck2, q_pos, P, scale)
    out = triton_stage1_block_scores(q, ck1, ck2, q_pos, P, scale)
    assert out.shape == ref.shape == (HKV, T, ck1.shape[0])
    assert_close(out, ref, RTOL[dtype], "stage-1 scores")
    assert torch.equal(out == 0, ref == 0), "invisible windows must score exactly 0"
    idx = naive_select_blocks(ref, q_pos, L, P)
    qb = (q_pos // P.block_size)[None, :, None]
    assert ((idx > 0) & (idx < qb - P.local_blocks)).any(), "no block was chosen by score: the case tests nothing"
    assert torch.equal(triton_select_blocks(ref, q_pos, L, P), idx)  # same scores in: identical selection
    fused = triton_select_from_queries(q, ck1, ck2, q_pos, L, P, scale)
    assert fused.shape == idx.shape and fused.dtype == torch.int32
    if dtype == torch.float32 and DEV == "cpu":  # the interpreter sums in the reference's order
        assert torch.equal(fused, idx)
    else:  # near-ties may flip (bf16 scores, GPU summation order): a valid top-k of the reference scores
        _assert_valid_topk(fused, ref, q_pos, L, P, 1e-4 if dtype == torch.float32 else 2e-2)


def _check_block_sparse(L, T, dtype, params, seed, bwd_rtol):
    """Triton stage 2 with the reference's block lists: o and dq/dk/dv vs autograd through the reference."""
    q, k, v, q_pos, ck1, ck2, scale = _sparse_inputs(L, T, dtype, params, seed=seed)
    idx = naive_select_blocks(naive_stage1_block_scores(q, ck1, ck2, q_pos, params, scale), q_pos, L, params)
    do = _rand(T, H, D, dtype=dtype, gen=torch.Generator().manual_seed(seed + 1))
    ref_dt = torch.float64 if DEV == "cpu" else torch.float32
    ours, ref = _leaves(q, k, v), _leaves(q, k, v, dtype=ref_dt)
    o = triton_block_sparse_attention(*ours, idx, q_pos, params.block_size, scale)
    ro = naive_block_sparse_attention(*ref, idx, q_pos, params.block_size, scale)
    assert o.dtype == dtype
    assert_close(o, ro, RTOL[dtype], "o")
    o.backward(do)
    ro.backward(do.to(ref_dt))
    for name, a, b in zip(("dq", "dk", "dv"), _grads(ours), _grads(ref)):
        assert a.dtype == dtype
        assert_close(a, b, bwd_rtol, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backward", ["torch", "triton"])
@pytest.mark.parametrize("case", [(330, 24), (300, 1)], ids=["L330-T24", "decode-L300"])
def test_block_sparse_attention_fwd_bwd(case, backward, dtype, monkeypatch):
    """Both backward implementations (SALA_SPARSE_BACKWARD: the Triton kernels are the default on CUDA)."""
    monkeypatch.setenv("SALA_SPARSE_BACKWARD", backward)
    _check_block_sparse(*case, dtype, P, seed=case[1], bwd_rtol=RTOL[dtype] * (2 if dtype == torch.bfloat16 else 1))


@pytest.mark.parametrize(
    "case,dtype",
    [pytest.param((200, 200), FP32, id="L200-T200-fp32", marks=pytest.mark.slow),
     pytest.param((330, 24), BF16, id="L330-T24-bf16"), pytest.param((300, 1), FP32, id="decode-L300-fp32"),
     pytest.param((300, 1), BF16, id="decode-L300-bf16")],
)
def test_infllm_v2_attention_entry(case, dtype, monkeypatch):
    """The whole path (Triton compression, fused selection, stage 2 and its Triton backward) vs the reference
    entry: the dense prefix below (topk + local) blocks and the sparse tail."""
    monkeypatch.setenv("SALA_SPARSE_BACKWARD", "triton")
    L, T = case
    q, k, v, q_pos, _, _, scale = _sparse_inputs(L, T, dtype, seed=L * T)
    ours, ref = _leaves(q, k, v), _leaves(q, k, v)

    def run(qkv, backend):
        ck1 = compress_keys(qkv[1], P.kernel_size, P.kernel_stride, backend=backend)
        ck2 = compress_keys(qkv[1], P.coarse_kernel_size, P.coarse_kernel_stride, backend=backend)
        return infllm_v2_attention(*qkv, ck1, ck2, q_pos, P, scale, backend=backend)

    o, ro = run(ours, "triton"), run(ref, "naive")
    assert_close(o, ro, RTOL[dtype], "o")
    do = _rand(T, H, D, dtype=dtype, gen=torch.Generator().manual_seed(7))
    o.backward(do)
    ro.backward(do)
    for name, a, b in zip(("dq", "dk", "dv"), _grads(ours), _grads(ref)):
        assert_close(a, b, RTOL[dtype] * (2 if dtype == torch.bfloat16 else 1), name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_batch_and_compressed_key_appends(dtype):
    """Engine decode: after a prefill of 230 tokens, compressed keys appended token by token == whole-slot
    compression; one batched decode step (rows on both sides of dense_len, two rows sharing a slot) == the
    per-row reference."""
    S, C, prefill, dense_len = 3, 300, 230, 256
    g = torch.Generator().manual_seed(31)
    keys, values = _rand(S, C, HKV, D, dtype=dtype, gen=g), _rand(S, C, HKV, D, dtype=dtype, gen=g)
    tiers = ((P.kernel_size, P.kernel_stride), (P.coarse_kernel_size, P.coarse_kernel_stride))
    ck1, ck2 = (torch.full((S, num_windows(C, ks, st), HKV, D), float("nan"), dtype=dtype, device=DEV) for ks, st in tiers)
    for buf, (ks, st) in zip((ck1, ck2), tiers):  # what the prefill left in the cache
        n = num_windows(prefill, ks, st)
        buf[:, :n] = torch.stack([naive_compress_keys(keys[s, :prefill], ks, st) for s in range(S)])
    lens = [C, 290, 250]
    for p in range(prefill, C):
        live = [s for s in range(S) if p < lens[s]]
        append_compressed_keys(keys, ck1, ck2, torch.tensor(live, device=DEV), torch.full((len(live),), p, device=DEV),
                               P.kernel_size, P.kernel_stride, backend="triton")
    for s, L in enumerate(lens):
        for buf, (ks, st), name in zip((ck1, ck2), tiers, ("ck1", "ck2")):
            n = num_windows(L, ks, st)
            assert_close(buf[s, :n], naive_compress_keys(keys[s, :L], ks, st), 1e-6 if dtype == torch.float32 else 5e-3, name)
            assert buf[s, n:].isnan().all(), f"{name}: a window past length {L} was written"
    ck1, ck2 = ck1.nan_to_num(0.0), ck2.nan_to_num(0.0)  # windows past a slot's length are never read
    slot = torch.tensor([0, 2, 1, 0], device=DEV)
    pos = torch.tensor([299, 249, 255, 130], device=DEV)  # sparse (L = 300, 256), dense (250, 131)
    q = _rand(4, H, D, dtype=dtype, gen=g)
    got = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, D**-0.5, dense_len, backend="triton")
    ref = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, D**-0.5, dense_len, backend="naive")
    assert got.dtype == dtype
    assert_close(got, ref, RTOL[dtype], "decode batch")


# -------------------------------------------------------------------------------------------------------------
# fused norm / RoPE / elementwise kernels at hidden 576, head_dim 64
# -------------------------------------------------------------------------------------------------------------
def _tol(dtype):
    return 1e-6 if dtype == torch.float32 else 8e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_residual_at_hidden_576(dtype):
    g = torch.Generator().manual_seed(41)
    x, y = _rand(2, 7, HIDDEN, dtype=dtype, gen=g, std=2.0), _rand(2, 7, HIDDEN, dtype=dtype, gen=g)
    w = (1 + 0.3 * torch.randn(HIDDEN, generator=g)).to(dtype).to(DEV)
    assert_close(rms_norm(x, w, 1e-5, backend="triton").float(), naive_rms_norm(x, w, 1e-5).float(), _tol(dtype), "rms_norm")
    with torch.no_grad():  # the one-kernel residual + norm (inference)
        r, n = residual_rms_norm(x, y, 0.37, w, 1e-5, backend="triton")
    want_r = naive_scaled_residual(x, y, 0.37)
    assert torch.equal(r, want_r)
    assert_close(n.float(), naive_rms_norm(want_r, w, 1e-5).float(), _tol(dtype), "residual_rms_norm")
    # gradients of the norm over 576 (training)
    ours, ref = _leaves(x, w, dtype=torch.float32), _leaves(x, w, dtype=torch.float64)
    dy = _rand(2, 7, HIDDEN, gen=g)
    rms_norm(*ours, 1e-5, backend="triton").backward(dy)
    naive_rms_norm(*ref, 1e-5).backward(dy.double())
    for name, a, b in zip(("dx", "dw"), _grads(ours), _grads(ref)):
        assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_kv", [HKV, H], ids=["softmax-9-3", "lightning-9-9"])
def test_qk_norm_rope_nine_heads(n_kv, dtype):
    """q/k as head views of one fused projection [q | k | v] (what the model hands the kernel), RoPE positions of
    two rows; inference kernel == rms_norm then apply_rope, and the training path's gradients."""
    g = torch.Generator().manual_seed(n_kv)
    B, T = 2, 5
    wide = _rand(B, T, (H + 2 * n_kv) * D, dtype=dtype, gen=g, std=2.0)
    q, k = wide[..., : H * D].view(B, T, H, D), wide[..., H * D : (H + n_kv) * D].view(B, T, n_kv, D)
    wq, wk = ((1 + 0.3 * torch.randn(D, generator=g)).to(dtype).to(DEV) for _ in range(2))
    rope = rope_cos_sin((torch.arange(T) + torch.tensor([[0], [500]])).to(DEV), D, 100000.0, torch.float32)
    with torch.no_grad():
        got_q, got_k = qk_norm_rope(q, k, wq, wk, 1e-5, rope, backend="triton")
    want_q = naive_apply_rope(naive_rms_norm(q, wq, 1e-5), *rope)
    want_k = naive_apply_rope(naive_rms_norm(k, wk, 1e-5), *rope)
    assert got_q.shape == (B, T, H, D) and got_k.shape == (B, T, n_kv, D)
    assert_close(got_q.float(), want_q.float(), _tol(dtype), "q")
    assert_close(got_k.float(), want_k.float(), _tol(dtype), "k")
    assert_close(apply_rope(q, *rope, backend="triton").float(), naive_apply_rope(q, *rope).float(), _tol(dtype), "rope")
    # training: norm + rope with autograd (Triton rms_norm / rope backward) vs fp64
    ours, ref = _leaves(q, k, dtype=torch.float32), _leaves(q, k, dtype=torch.float64)
    dq, dk = _rand(B, T, H, D, gen=g), _rand(B, T, n_kv, D, gen=g)
    a, b = qk_norm_rope(*ours, wq.float(), wk.float(), 1e-5, rope, backend="triton")
    ((a * dq).sum() + (b * dk).sum()).backward()
    ra, rb = qk_norm_rope(*ref, wq.double(), wk.double(), 1e-5, tuple(r.double() for r in rope), backend="naive")
    ((ra * dq.double()).sum() + (rb * dk.double()).sum()).backward()
    for name, x, y in zip(("dq", "dk"), _grads(ours), _grads(ref)):
        assert_close(x, y, 1e-5, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_and_swiglu_at_smollm2_widths(dtype):
    """sigmoid output gate over H * D = 576 and SwiGLU over SmolLM2's intermediate 1536, as column slices of
    one fused GEMM output."""
    g = torch.Generator().manual_seed(51)
    wide = _rand(3, 7, 2 * 1536, dtype=dtype, gen=g)
    gate, up = wide[..., :1536], wide[..., 1536:]
    assert_close(silu_mul(gate, up, backend="triton").float(), naive_silu_mul(gate, up).float(), _tol(dtype), "silu_mul")
    x, z = _rand(3, 7, H * D, dtype=dtype, gen=g), _rand(3, 7, H * D, dtype=dtype, gen=g)
    assert_close(sigmoid_gate(x, z, backend="triton").float(), naive_sigmoid_gate(x, z).float(), _tol(dtype), "gate")


# -------------------------------------------------------------------------------------------------------------
# the whole model: a SmolLM2-shaped SALA hybrid, Triton backend vs the reference backend, packed input
# -------------------------------------------------------------------------------------------------------------
def _smollm2_config(layers=2, sparse_layers=(0,), vocab=256, intermediate=192, **sparse):
    """SmolLM2-135M's attention geometry as ``sala convert`` builds it (tied embeddings, no muP scales, q/k norm in
    the Lightning layers only, NoPE gated softmax layers), with fewer layers and a small vocabulary. The default
    sparse_config is small (16-token blocks, 4 + 1 selected) so that CPU-sized documents reach InfLLM-v2."""
    sc = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=16, topk=4, dense_len=64)
    return preset(
        "tiny", vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=H, num_key_value_heads=HKV, head_dim=D, mixer_types=mixer_schedule(layers, sparse_layers),
        tie_word_embeddings=True, scale_emb=1.0, scale_depth=math.sqrt(layers), dim_model_base=HIDDEN,
        rope_theta=100000.0, max_position_embeddings=16384, sparse_config={**sc, **sparse},
    )


def _run_model(model, docs, cu, packed, dlogits):
    """Logits [1, sum T, V] and the parameter gradients of sum(logits * dlogits)."""
    model.zero_grad()
    if packed:
        logits = model(input_ids=torch.cat(docs, 1), cu_seqlens=cu, use_cache=False).logits
    else:  # every document alone: the reference for packing
        logits = torch.cat([model(input_ids=d, use_cache=False).logits for d in docs], 1)
    (logits.float() * dlogits).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_model_triton_packed_matches_reference_documents(monkeypatch):
    """Packed row of 37, 1, 90 and 5 tokens (90 >= dense_len: InfLLM-v2 in the softmax layer past its first
    80 queries) under SALA_BACKEND=triton == each document alone under SALA_BACKEND=naive: logits and every
    parameter's gradient (Lightning and softmax layer, norms, tied embedding)."""
    cfg = _smollm2_config()
    assert cfg.lightning_nkv == H and cfg.num_key_value_heads == HKV and cfg.head_dim * H == cfg.hidden_size
    model = randomize_(SALAForCausalLM(cfg), std=0.05).float().train().to(DEV)
    lens = [37, 1, 90, 5]
    gen = torch.Generator().manual_seed(61)
    docs = [torch.randint(3, cfg.vocab_size, (1, n), generator=gen).to(DEV) for n in lens]
    dlogits = _rand(1, sum(lens), cfg.vocab_size, gen=gen)
    monkeypatch.setenv("SALA_BACKEND", "naive")
    ref_logits, ref_grads = _run_model(model, docs, None, False, dlogits)
    monkeypatch.setenv("SALA_BACKEND", "triton")
    logits, grads = _run_model(model, docs, _cu(lens), True, dlogits)
    assert_close(logits, ref_logits, 1e-4, "logits")
    for n, g in grads.items():
        assert_close(g, ref_grads[n], 1e-4, n)


# -------------------------------------------------------------------------------------------------------------
# GPU only: realistic lengths, bf16, the released sparse_config
# -------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0none", "h0"])
@pytest.mark.parametrize("T", sorted(DOCS))
def test_gpu_chunk_lightning_packed(T, with_h0):
    _check_chunk_lightning(torch.bfloat16, lens=DOCS[T], with_h0=with_h0, seg=None, seed=T)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T", [(8, 512), (4, 2048), (1, 8192)], ids=["B8-T512", "B4-T2048", "B1-T8192"])
def test_gpu_dense_causal_attention(B, T):
    _check_dense(torch.bfloat16, B, T, T, seed=T)


@pytest.mark.gpu
@pytest.mark.parametrize("L,T", [(8192, 8192), (8192, 2048), (8192, 1)], ids=["prefill-8192", "chunk-2048", "decode"])
def test_gpu_infllm_v2_released_config(L, T, monkeypatch):
    """Released sparse_config (32/16 windows, 64-token blocks, 64 + 32 selected): stage 2 fwd/bwd with the
    reference's lists, then the whole Triton path vs the reference entry (same bf16 score rounding)."""
    monkeypatch.setenv("SALA_SPARSE_BACKWARD", "auto")  # the Triton backward on CUDA
    _check_block_sparse(L, T, torch.bfloat16, P_RELEASED, seed=T, bwd_rtol=2e-2)
    q, k, v, q_pos, ck1, ck2, scale = _sparse_inputs(L, T, torch.bfloat16, P_RELEASED, seed=T + 1)
    tck1 = compress_keys(k, P_RELEASED.kernel_size, P_RELEASED.kernel_stride, backend="triton")
    assert_close(tck1, ck1, 5e-3, "ck1")
    scores = naive_stage1_block_scores(q, ck1, ck2, q_pos, P_RELEASED, scale)
    assert_close(triton_stage1_block_scores(q, ck1, ck2, q_pos, P_RELEASED, scale), scores, 1e-2, "stage-1 scores")
    idx = triton_select_from_queries(q, ck1, ck2, q_pos, L, P_RELEASED, scale)
    _assert_valid_topk(idx, scores, q_pos, L, P_RELEASED, 2e-2)
    o = infllm_v2_attention(q, k, v, ck1, ck2, q_pos, P_RELEASED, scale, backend="triton")
    ro = infllm_v2_attention(q, k, v, ck1, ck2, q_pos, P_RELEASED, scale, backend="naive")  # fp32 math, bf16 scores
    assert_close(o, ro, 1e-2, "infllm_v2_attention")


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[37, 2011, 1, 6143], [37, 1, 1011, 7143]], ids=["8192-dense-docs", "8192-sparse-doc"])
def test_gpu_model_bf16_packed(lens):
    """A 4-layer SmolLM2-shaped hybrid in bf16 on a packed 8192-token row, released sparse_config except
    dense_len 4096 (the 7143-token document runs InfLLM-v2 past its first 6144 queries). The Triton model's
    error against an fp32 reference must be no worse than the reference ops' own error in bf16 (x1.5)."""
    cfg = _smollm2_config(layers=4, sparse_layers=(0, 3), vocab=8192, intermediate=1536, kernel_size=32,
                          kernel_stride=16, block_size=64, window_size=2048, topk=64, dense_len=4096)
    base = randomize_(SALAForCausalLM(cfg), std=0.05)
    gen = torch.Generator().manual_seed(71)
    ids = torch.randint(3, cfg.vocab_size, (1, sum(lens)), generator=gen).to(DEV)
    docs = list(ids.split(lens, dim=1))
    dlogits = _rand(1, sum(lens), cfg.vocab_size, gen=gen, std=1e-3)
    runs = {}
    for name, dtype, backend in (("ref32", torch.float32, "naive"), ("ref16", torch.bfloat16, "naive"),
                                 ("triton16", torch.bfloat16, "triton")):
        model = SALAForCausalLM(cfg).to(DEV, dtype)
        model.load_state_dict(base.state_dict())
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SALA_BACKEND", backend)
            runs[name] = _run_model(model.train(), docs, _cu(lens), True, dlogits)
        del model
    (l32, g32), (l16, g16), (lt, gt) = runs["ref32"], runs["ref16"], runs["triton16"]
    base_err, err = rel_l2(l16, l32), rel_l2(lt, l32)
    assert err <= 1.5 * base_err + 1e-3, f"logits: triton bf16 {err:.3e} vs reference bf16 {base_err:.3e}"
    for n in g32:
        base_err, err = rel_l2(g16[n], g32[n]), rel_l2(gt[n], g32[n])
        assert err <= 1.5 * base_err + 1e-3, f"{n}: triton bf16 {err:.3e} vs reference bf16 {base_err:.3e}"
