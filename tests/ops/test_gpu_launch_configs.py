"""The GPU launch configurations, run by the Triton interpreter (issue 14 item 4: CI runs what ships).

By default the interpreter launches every kernel with small tiles. Inside ``gpu_launch_configs()`` it takes the
configurations compiled kernels use on an H200 (or, with ``RTX_4090``, on a 99 KB-shared-memory card): 128-row
tiles, several blocks per inner step with the masks of a partial last step, TMA block loads, flash-decoding and
stage-1 splits sized for 132 SMs, 64-window score steps, the Lightning tuner's candidates and segment plan. Each
test compares one configuration with the PyTorch reference on fresh random inputs at awkward shapes (9 query
heads over 3 KV heads, head_dim 64, lengths off the block grid, lists with holes and future blocks) and checks,
through a spy on the kernel launches, that the configuration under test is the one that ran. On a GPU the same
tests run the compiled kernels with the device's own configuration (the emulated-card cases are skipped there).
"""

from __future__ import annotations

import math

import pytest
import torch

from sala.ops.common.launch import H200, RTX_4090, gpu_launch_configs
from sala.ops.infllm_v2 import InfLLMv2Params, decode_attention_batch
from sala.ops.infllm_v2.naive import (
    naive_block_sparse_attention,
    naive_compress_keys,
    naive_stage1_block_scores,
)
from sala.ops.lightning.naive import lightning_decay_slopes, naive_chunk_lightning, naive_lightning_step
from sala.utils.testing import assert_close, default_rtol

pytest.importorskip("triton")

from sala.ops.infllm_v2 import compress, sparse_attn, sparse_attn_bwd, topk  # noqa: E402
from sala.ops.lightning import chunk, recurrent  # noqa: E402

pytestmark = pytest.mark.triton

H, HKV, D = 9, 3, 64  # GQA group 3 (padded to 4 rows per token in the kernels)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEV == "cuda"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# window 2 strides, block 4 strides (the released proportions at half size); K_sel = topk + 1
P = InfLLMv2Params(kernel_size=16, kernel_stride=8, block_size=32, init_blocks=1, local_blocks=1, topk=4)


def _gpu(gpu):
    """A GPU to emulate; on a real GPU only its own configuration runs, so other cards' cases are skipped."""
    if CUDA and gpu is not H200:
        pytest.skip(f"{gpu.name} is emulated in the interpreter only")
    return gpu_launch_configs(gpu)


@pytest.fixture
def launches(monkeypatch):
    """Spy on kernel launches: ``launches(kernel, ...)`` records each launch of those kernels as
    (name, grid, keyword arguments); ``launches.of(name)`` lists the keyword arguments of one kernel's launches."""
    seen: list[tuple[str, tuple, dict]] = []

    def watch(*kernels):
        for kernel in kernels:
            run = kernel.run

            def spy(*args, grid, _run=run, _name=kernel.fn.__name__, **kw):
                seen.append((_name, tuple(grid) if isinstance(grid, (tuple, list)) else grid, kw))
                return _run(*args, grid=grid, **kw)

            monkeypatch.setattr(kernel, "run", spy)

    watch.seen = seen
    watch.of = lambda name: [kw for n, _, kw in seen if n == name]
    watch.grids = lambda name: [g for n, g, _ in seen if n == name]
    return watch


def _rand(*shape, dtype, gen, std=1.0):
    return (std * torch.randn(*shape, generator=gen)).to(dtype).to(DEV)


def _qkv(T, L, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(_rand(n, h, D, dtype=dtype, gen=g) for n, h in ((T, H), (L, HKV), (L, HKV)))


def _random_lists(T, K, q_pos, n_blk, bs, seed):
    """Unsorted unique block lists [HKV, T, K] with -1 holes and future blocks (the causal mask must drop them)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((HKV, T, K), -1, dtype=torch.int32)
    for h in range(HKV):
        for t in range(T):
            hi = min(n_blk, int(q_pos[t]) // bs + 2)
            pick = torch.randperm(hi, generator=g)[: K - 1]
            idx[h, t, torch.randperm(K, generator=g)[: len(pick)]] = pick.to(torch.int32)
    return idx.to(DEV)


# -------------------------------------------------------------------------------------------------------------
# block-sparse attention forward: prefill (split lists, tile + token kernels) and decode (flash-decoding split)
# -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # 2-4 s per case in the interpreter
@pytest.mark.parametrize("gpu, dtype", [(H200, torch.float32), (H200, torch.bfloat16), (RTX_4090, torch.bfloat16)],
                         ids=["H200-fp32", "H200-bf16", "RTX4090-bf16"])  # RTX 4090 fp32 differs only in tile NBI 1
def test_sparse_prefill_gpu_config(gpu, dtype, launches):
    """T = 45 queries over L = 1000 keys (31 full 32-key blocks + 8 keys): 45 x 3 groups fill 132 SMs, so the tile
    split runs; 16-token tiles (the last holds 13), 9-slot lists drawn from ~31 blocks so that a block is shared by
    about a quarter of a tile's tokens (both the tile and the private lists are long), several blocks per
    pointer-load step."""
    T, L, K, bs = 45, 1000, 9, P.block_size
    q, k, v = _qkv(T, L, dtype, seed=1)
    q_pos = torch.arange(L - T, L, device=DEV)
    idx = _random_lists(T, K, q_pos, math.ceil(L / bs), bs, seed=2)
    launches(sparse_attn._split_lists_kernel, sparse_attn._sparse_tile_kernel, sparse_attn._sparse_token_kernel)
    with _gpu(gpu):
        cfg = sparse_attn._cfg(q.device)
        out = sparse_attn.triton_block_sparse_attention(q, k, v, idx, q_pos, bs, D**-0.5)
    assert cfg is (sparse_attn.GPU_CONFIG if gpu is H200 else sparse_attn.SMALL_SMEM_CONFIG) or CUDA
    ref = naive_block_sparse_attention(q, k, v, idx, q_pos, bs, D**-0.5)
    assert out.dtype == dtype
    assert_close(out, ref, default_rtol(dtype), f"sparse prefill ({gpu.name} config)")

    names = ("_split_lists_kernel", "_sparse_tile_kernel", "_sparse_token_kernel")
    (split,), (tile,), (tok,) = (launches.of(n) for n in names)
    tma = tile["TMA"]
    if not CUDA:  # H200 + 16-bit K/V: TMA block loads; fp32 or the small-smem card: pointer loads
        assert tma == (gpu is H200 and dtype != torch.float32)
    rows = cfg["tma_rows"] if tma else cfg["rows"]
    assert split["BT"] == tile["BT"] == min(16, rows // 4)
    assert split["CMIN"] == (cfg["tma_share_min"] if tma else cfg["share_min"])
    if not tma:  # several blocks per step: the multi-block path and its partial-step masks
        wide = 2 if dtype == torch.float32 else 1
        assert tile["NBI"] == cfg["tile_keys"] // wide // bs and tok["NBI"] == cfg["tok_keys"] // wide // bs
        assert tok["NBI"] >= 2 and K % tok["NBI"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_decode_gpu_config(dtype, launches):
    """3 queries: the flash-decoding split over S programs (S from 132 SMs), 4 or 2 blocks per step, 13-slot lists
    so the last step of a split is partial; then the merge kernel."""
    T, L, K, bs = 3, 450, 13, P.block_size
    q, k, v = _qkv(T, L, dtype, seed=3)
    q_pos = torch.tensor([200, 447, 449], device=DEV)
    idx = _random_lists(T, K, q_pos, math.ceil(L / bs), bs, seed=4)
    launches(sparse_attn._sparse_token_kernel, sparse_attn._merge_partials_kernel)
    with _gpu(H200):
        out = sparse_attn.triton_block_sparse_attention(q, k, v, idx, q_pos, bs, D**-0.5)
    ref = naive_block_sparse_attention(q, k, v, idx, q_pos, bs, D**-0.5)
    assert_close(out, ref, default_rtol(dtype), "sparse decode")
    (tok,), (grid,) = launches.of("_sparse_token_kernel"), launches.grids("_sparse_token_kernel")
    assert tok["PARTIAL"] and grid[2] >= 2 and len(launches.of("_merge_partials_kernel")) == 1
    assert tok["NBI"] == sparse_attn.GPU_CONFIG["tok_keys"] // (2 if dtype == torch.float32 else 1) // bs >= 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_batch_gpu_config(dtype, launches):
    """The graph-safe batched decode (stage 1 + selection + attention, one cache slot per row) with the GPU
    configuration: rows below and above dense_len, lengths off the block grid, two rows sharing a slot."""
    S, C, dense_len = 3, 600, 300  # rows below 300 attend to up to 10 blocks: 2 splits of 8 or 4 x 2
    g = torch.Generator().manual_seed(5)
    keys, values = _rand(S, C, HKV, D, dtype=dtype, gen=g), _rand(S, C, HKV, D, dtype=dtype, gen=g)
    ck1 = torch.stack([naive_compress_keys(keys[s], P.kernel_size, P.kernel_stride) for s in range(S)])
    ck2 = torch.stack([naive_compress_keys(keys[s], P.coarse_kernel_size, P.coarse_kernel_stride) for s in range(S)])
    slot = torch.tensor([2, 0, 2, 1], device=DEV)
    pos = torch.tensor([599, 150, 333, 530], device=DEV)
    q = _rand(4, H, D, dtype=dtype, gen=g)
    launches(sparse_attn._sparse_token_kernel, topk._stage1_score_kernel)
    with _gpu(H200):
        got = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, D**-0.5, dense_len, backend="triton")
    ref = decode_attention_batch(q, keys, values, ck1, ck2, slot, pos, P, D**-0.5, dense_len, backend="naive")
    assert_close(got.float(), ref.float(), default_rtol(dtype), "decode batch")
    (tok,), (score,) = launches.of("_sparse_token_kernel"), launches.of("_stage1_score_kernel")
    assert tok["BATCHED"] and tok["PARTIAL"] and launches.grids("_sparse_token_kernel")[0][2] >= 2
    assert score["BN"] == topk.GPU_CONFIG["bn"] and score["BT"] == 1


# -------------------------------------------------------------------------------------------------------------
# stage 1 and selection: 32-token tiles, 64 windows per step, pooled in the tile; the LSE split for decode
# -------------------------------------------------------------------------------------------------------------
def _pooled_reference(scores, q_pos, L):
    """Reference block scores after pooling and forcing: [HKV, T, n_blocks] fp32 (forced = +inf)."""
    n1 = scores.shape[-1]
    r, left = P.block_size // P.kernel_stride, (P.kernel_size - 1) // P.kernel_stride
    n_blk = math.ceil(L / P.block_size)
    s, q_pos = scores.float().cpu(), q_pos.cpu()
    out = torch.zeros(*s.shape[:2], n_blk)
    for b in range(n_blk):
        lo, hi = max(0, r * b - left), min(n1, r * b + r, n_blk * r)
        if lo < hi:
            out[..., b] = s[..., lo:hi].amax(-1)
    blk = torch.arange(n_blk)
    qb = (q_pos // P.block_size)[:, None]
    forced = (blk < P.init_blocks) | ((blk >= qb - P.local_blocks) & (blk <= qb))
    return out.masked_fill(forced[None], float("inf"))


def _assert_top_k(idx, pooled, q_pos, rel_tol):
    """Each row of idx is ascending, holds no future block, and is a top-K of ``pooled`` up to near-ties."""
    idx, qb = idx.cpu(), q_pos.cpu() // P.block_size
    K = idx.shape[-1]
    for h in range(idx.shape[0]):
        for t in range(idx.shape[1]):
            row = idx[h, t]
            kept = row[row >= 0]
            assert torch.all(kept[1:] > kept[:-1]) and torch.all(kept <= qb[t]), f"row {h},{t}: {row.tolist()}"
            assert torch.all(row[len(kept):] == -1), f"row {h},{t}: {row.tolist()}"
            past = pooled[h, t, : int(qb[t]) + 1]
            sel = torch.zeros(len(past), dtype=torch.bool)
            sel[kept.long()] = True
            assert int(sel.sum()) == min(K, len(past)), f"row {h},{t}: {row.tolist()}"
            if 0 < int(sel.sum()) < len(past):
                lo, hi = past[sel].min(), past[~sel].max()
                assert lo >= hi - rel_tol * float(hi), f"row {h},{t}: kept {float(lo)} < dropped {float(hi)}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, L", [(45, 700), (1, 8300)], ids=["prefill-T45-L700", "decode-T1-L8300"])
def test_selection_gpu_config(T, L, dtype, launches):
    """Raw stage-1 scores and the fused selection. Prefill: two 32-token tiles (the second partial), 86 fine
    windows = one full and one partial 64-window step, TMA loads of compressed keys for 16-bit inputs. Decode at
    8300 keys: 258 coarse windows, so the LSE is split over programs and merged."""
    q = _rand(T, H, D, dtype=dtype, gen=torch.Generator().manual_seed(6))
    k = _rand(L, HKV, D, dtype=dtype, gen=torch.Generator().manual_seed(7))
    q_pos = torch.arange(L - T, L, device=DEV)
    ck1 = naive_compress_keys(k, P.kernel_size, P.kernel_stride)
    ck2 = naive_compress_keys(k, P.coarse_kernel_size, P.coarse_kernel_stride)
    scale = D**-0.5
    launches(topk._stage1_lse_kernel, topk._stage1_score_kernel, topk._merge_lse_kernel)
    with _gpu(H200):
        scores = topk.triton_stage1_block_scores(q, ck1, ck2, q_pos, P, scale)
        idx = topk.triton_select_from_queries(q, ck1, ck2, q_pos, L, P, scale)
    ref = naive_stage1_block_scores(q, ck1, ck2, q_pos, P, scale)
    assert_close(scores.float(), ref.float(), default_rtol(dtype), "stage-1 scores")
    _assert_top_k(idx, _pooled_reference(ref, q_pos, L), q_pos, 1e-4 if dtype == torch.float32 else 2e-2)

    lse, score = launches.of("_stage1_lse_kernel"), launches.of("_stage1_score_kernel")
    assert [kw["BN"] for kw in lse + score] == [topk.GPU_CONFIG["bn"]] * 4
    assert all(kw["BT"] == topk.GPU_CONFIG["rows"] // 4 for kw in lse + score)
    if T == 1:  # split LSE: several programs per query tile, merged
        assert launches.grids("_stage1_lse_kernel")[0][2] >= 2 and len(launches.of("_merge_lse_kernel")) == 2
    elif not CUDA:
        assert all(kw["TMA"] == (dtype != torch.float32) for kw in lse + score)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compress_gpu_config(dtype, launches):
    """64 windows per program: one full and one partial program per head at L = 837."""
    k = _rand(837, HKV, D, dtype=dtype, gen=torch.Generator().manual_seed(8))
    launches(compress._compress_kernel)
    with _gpu(H200):
        out = compress.triton_compress_keys(k, P.kernel_size, P.kernel_stride)
    ref = naive_compress_keys(k, P.kernel_size, P.kernel_stride)
    assert_close(out.float(), ref.float(), default_rtol(dtype), "compressed keys")
    assert launches.of("_compress_kernel")[0]["BW"] == 64 and launches.grids("_compress_kernel")[0] == (2, HKV)


# -------------------------------------------------------------------------------------------------------------
# block-sparse attention backward (SALA_SPARSE_BACKWARD=triton)
# -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # 2-4 s per case in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_backward_gpu_config(dtype, launches, monkeypatch):
    """dq with 64-key steps (4 or 2 blocks of 16, 7-slot lists: a partial last step), dk/dv with 16 (bf16) or
    4 (fp32) tokens per step over the inverted lists; against autograd through the fp64 reference."""
    monkeypatch.setenv("SALA_SPARSE_BACKWARD", "triton")
    T, L, K, bs = 21, 200, 7, 16
    q, k, v = _qkv(T, L, dtype, seed=9)
    do = _rand(T, H, D, dtype=dtype, gen=torch.Generator().manual_seed(10))
    q_pos = torch.arange(L - T, L, device=DEV)
    idx = _random_lists(T, K, q_pos, math.ceil(L / bs), bs, seed=11)
    grads = []
    for fn, cast in ((naive_block_sparse_attention, torch.float64), (sparse_attn.triton_block_sparse_attention, dtype)):
        qq, kk, vv = (x.to(cast).clone().requires_grad_() for x in (q, k, v))
        if fn is not naive_block_sparse_attention:
            launches(sparse_attn_bwd._bwd_dq_kernel, sparse_attn_bwd._bwd_dkdv_kernel)
        with _gpu(H200):
            fn(qq, kk, vv, idx, q_pos, bs, D**-0.5).backward(do.to(cast))
        grads.append((qq.grad, kk.grad, vv.grad))
    for name, want, got in zip("qkv", *grads):
        assert got.dtype == dtype
        assert_close(got, want, default_rtol(dtype), f"d{name}")
    (dq,), dkdv = launches.of("_bwd_dq_kernel"), launches.of("_bwd_dkdv_kernel")
    cfg, wide, fp32 = sparse_attn_bwd.GPU_CONFIG, 2 if dtype == torch.float32 else 1, dtype == torch.float32
    assert dq["NBI"] == cfg["dq_keys"] // wide // bs >= 2 and K % dq["NBI"]
    assert dkdv[0]["BT"] == cfg["dkdv_rows_fp32" if fp32 else "dkdv_rows"] // 4


# -------------------------------------------------------------------------------------------------------------
# Lightning: chunked prefill with the GPU's segment plan and each tuner candidate; the decode step's V tiles
# -------------------------------------------------------------------------------------------------------------
def _lightning_inputs(dtype, lens, dk, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (_rand(1, T, H, dk, dtype=dtype, gen=g) for _ in range(3))
    h0 = _rand(len(lens), H, dk, dk, dtype=torch.float32, gen=g, std=0.1)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    return q, k, v, h0, cu


def _lightning_reference(q, k, v, h0, cu, slopes, scale):
    """fp64 reference per sequence on the same (rounded) inputs -> (o [1, T, H, V], final [N, H, K, V])."""
    outs, finals = [], []
    bounds = cu.tolist()
    for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
        qkv = (x[:, s:e].double() for x in (q, k, v))
        o, f = naive_chunk_lightning(*qkv, slopes.double(), scale, h0[n : n + 1].double())
        outs.append(o)
        finals.append(f)
    return torch.cat(outs, 1), torch.cat(finals)


@pytest.mark.slow  # 2-4 s per case in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_lightning_chunk_gpu_plan(dtype, launches):
    """Forward and backward with the default GPU plan: documents of 37, 1 and 300 tokens packed in one row, so
    the segment plan for 132 SMs cuts the long one into a 192-token segment (dS kernel + fold) and a 108-token
    one ending in a partial chunk; the V tile is the first candidate's."""
    lens = [37, 1, 300]
    q, k, v, h0, cu = _lightning_inputs(dtype, lens, D, seed=12)
    slopes, scale = lightning_decay_slopes(H).float().to(DEV), D**-0.5
    g = torch.Generator().manual_seed(13)
    do, dfin = _rand(*v.shape, dtype=torch.float32, gen=g), _rand(len(lens), H, D, D, dtype=torch.float32, gen=g)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, h0)]
    launches(chunk._chunk_out_kernel, chunk._segment_state_kernel)
    with _gpu(H200):
        o, fin = chunk.triton_chunk_lightning(*leaves[:3], slopes, scale, leaves[3], True, cu, dtype)
        (o.float() * do).sum().add((fin * dfin).sum()).backward()
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, h0)]
    ro, rfin = _lightning_reference(*ref_leaves, cu, slopes, scale)
    (ro * do.double()).sum().add((rfin * dfin.double()).sum()).backward()
    rtol = default_rtol(dtype)
    assert_close(o, ro, rtol, "o")
    assert_close(fin, rfin, 1e-5, "final state")  # fp32 state from rounded inputs: fp32 accuracy
    for name, a, b in zip(("dq", "dk", "dv", "dh0"), leaves, ref_leaves):
        assert_close(a.grad, b.grad, rtol, name)
    cls = "fp32" if dtype == torch.float32 else "16bit"
    first = chunk._GPU_CONFIGS[cls][0]
    outs = launches.of("_chunk_out_kernel")
    assert len(outs) == 4 and all(kw["BV"] == min(first.bv, D) for kw in outs)  # forward, dq, dk, dv passes
    assert all(kw["HAS_FOLD"] for kw in outs) and len(launches.of("_segment_state_kernel")) == 4
    if not CUDA:  # 1 + 1 + 2 segments (192 + 108 tokens): 132 SMs and the 4-chunk floor give 3-chunk segments
        assert all(w[2] == 4 for w in launches.grids("_chunk_out_kernel"))
        assert all(w[2] == 1 for w in launches.grids("_segment_state_kernel"))


def _candidates():
    """Each distinct (chunk V tile, segment tile) the tuner may pick at K = V = 128, paired up (cycling the
    shorter list) -> [(dtype, _Config, _SegConfig)]."""
    out = []
    for cls, dtype in (("16bit", torch.bfloat16), ("fp32", torch.float32)):
        cfgs = list({c.bv: c for c in chunk._GPU_CONFIGS[cls]}.values())
        segs = list({(s.bk, s.bv): s for s in chunk._SEG_CONFIGS[cls]}.values())
        n = max(len(cfgs), len(segs))
        out += [(dtype, cfgs[i % len(cfgs)], segs[i % len(segs)]) for i in range(n)]
    return out


@pytest.mark.parametrize("dtype, cfg, seg", _candidates(), ids=[
    f"{'bf16' if d == torch.bfloat16 else 'fp32'}-bv{c.bv}-seg{s.bk}x{s.bv}" for d, c, s in _candidates()])
def test_lightning_chunk_each_tuner_candidate(dtype, cfg, seg, launches, monkeypatch):
    """What the tuner may choose for large problems, forced one at a time (forward, K = V = 128, 300 tokens)."""
    monkeypatch.setitem(chunk._GPU_CONFIGS, "fp32" if dtype == torch.float32 else "16bit", (cfg,))
    monkeypatch.setitem(chunk._SEG_CONFIGS, "fp32" if dtype == torch.float32 else "16bit", (seg,))
    dk = 128
    q, k, v, h0, cu = _lightning_inputs(dtype, [300], dk, seed=14)
    slopes, scale = lightning_decay_slopes(H).float().to(DEV), dk**-0.5
    launches(chunk._chunk_out_kernel, chunk._segment_state_kernel)
    with _gpu(H200):
        o, fin = chunk.triton_chunk_lightning(q, k, v, slopes, scale, h0, True, None, dtype)
    ro, rfin = _lightning_reference(q, k, v, h0, cu, slopes, scale)
    assert_close(o, ro, default_rtol(dtype), "o")
    assert_close(fin, rfin, 1e-5, "final state")
    (out,), (segk,) = launches.of("_chunk_out_kernel"), launches.of("_segment_state_kernel")
    assert out["BV"] == cfg.bv and (segk["BK"], segk["BV"]) == (seg.bk, seg.bv)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lightning_step_gpu_plan(dtype, launches):
    """3 sequences x 9 heads are too few programs for 132 SMs: the step splits V into 16-wide tiles."""
    N = 3
    g = torch.Generator().manual_seed(15)
    q, k, v = (_rand(N, H, D, dtype=dtype, gen=g) for _ in range(3))
    state = _rand(N, H, D, D, dtype=torch.float32, gen=g, std=0.1)
    slopes, scale = lightning_decay_slopes(H).float().to(DEV), D**-0.5
    want_state = state.double().clone()
    want = naive_lightning_step(q.double(), k.double(), v.double(), slopes.double(), scale, want_state)
    launches(recurrent._lightning_step_kernel)
    with _gpu(H200):
        o = recurrent.triton_lightning_step(q, k, v, slopes, scale, state, dtype)
    assert_close(o, want, default_rtol(dtype), "o")
    assert_close(state, want_state, 1e-5, "state")
    if not CUDA:
        assert launches.of("_lightning_step_kernel")[0]["BV"] == 16
        assert launches.grids("_lightning_step_kernel")[0] == (4, N * H)


def test_emulated_gpu_facts():
    """What launch plans read inside and outside ``gpu_launch_configs()`` (CPU tensors)."""
    from sala.ops.common import launch
    from sala.ops.infllm_v2.tma import head_block_descriptor

    cpu = torch.device("cpu")
    x = torch.zeros(40, HKV, D, dtype=torch.bfloat16)
    with launch.gpu_launch_configs(RTX_4090):
        assert (launch.num_sms(cpu), launch.smem_per_block(cpu), launch.has_tma(cpu)) == (128, 101376, False)
        assert head_block_descriptor(x, 32) is None  # no TMA on an sm_89 card
        with launch.gpu_launch_configs(H200):  # nests, and restores the outer one
            assert launch.num_sms(cpu) == 132 and launch.has_tma(cpu) and head_block_descriptor(x, 32) is not None
        assert launch.num_sms(cpu) == 128
    if not CUDA:
        assert not launch.gpu_plan(cpu) and launch.interpreter_configs()
        assert (launch.num_sms(cpu), launch.smem_per_block(cpu), launch.has_tma(cpu)) == (4, None, True)
        with launch.gpu_launch_configs():
            assert launch.gpu_plan(cpu) and not launch.interpreter_configs()
            assert topk._cfg() is topk.GPU_CONFIG and sparse_attn_bwd._cfg() is sparse_attn_bwd.GPU_CONFIG
        assert topk._cfg() is topk._INTERP_CONFIG and sparse_attn_bwd._cfg() is sparse_attn_bwd._INTERP_CONFIG
