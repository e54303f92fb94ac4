"""Triton Lightning kernels == the PyTorch reference: prefill forward and backward, varlen, decode step.

Runs in Triton's CPU interpreter without a GPU (tests/conftest.py sets TRITON_INTERPRET=1 before any
kernel is JIT-compiled) and natively on CUDA. References run in fp64 on the same (rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch

from sala.ops import chunk_lightning, lightning_decay_slopes, lightning_step
from sala.ops.lightning import naive_chunk_lightning, naive_recurrent_lightning
from sala.utils.testing import assert_close

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _rtol(dtype: torch.dtype, result: torch.Tensor) -> float:
    """Tolerance for ``result`` of a run on ``dtype`` inputs. CUDA feeds 16-bit inputs to bf16 dots (the fp32
    state rounded for them): the input dtype's tolerance. The CPU interpreter runs every dot in fp32 on the
    rounded inputs, so only the result's own rounding remains: fp32 results (measured <= 2e-7 at bf16 inputs)
    get the fp32 tolerance, bf16 results (measured <= 3.6e-3, bf16 rounding) the bf16 one."""
    return RTOL[dtype] if DEVICE == "cuda" else RTOL[result.dtype]


def _chunk():
    from sala.ops.lightning.chunk import triton_chunk_lightning

    return triton_chunk_lightning


def _rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def _inputs(B, T, H, K, V, dtype, n_state=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = _rand(B, T, H, K, dtype=dtype, gen=g), _rand(B, T, H, K, dtype=dtype, gen=g)
    v = _rand(B, T, H, V, dtype=dtype, gen=g)
    h0 = None if n_state is None else _rand(n_state, H, K, V, gen=g)
    return q, k, v, h0


def _reference(q, k, v, slopes, scale, h0, cu_seqlens=None):
    """fp64 reference on the same values (varlen handled by the entry's naive path)."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return chunk_lightning(d(q), d(k), d(v), slopes, scale, d(h0), True, cu_seqlens, backend="naive")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0none", "h0"])
@pytest.mark.parametrize(
    "B,T,K,V,seg",
    [(1, 1, 32, 16, None), (2, 17, 16, 32, None), (1, 63, 32, 32, None), (2, 65, 32, 16, 1), (1, 130, 16, 16, 1),
     (1, 200, 32, 32, None)],  # fmt: skip
    ids=lambda x: str(x),
)
def test_chunk_forward_matches_reference(B, T, K, V, seg, with_h0, dtype):
    H = 2
    q, k, v, h0 = _inputs(B, T, H, K, V, dtype, n_state=B if with_h0 else None, seed=T)
    slopes = lightning_decay_slopes(H)
    o, final = _chunk()(q, k, v, slopes, K**-0.5, h0, True, None, torch.float32, seg_chunks=seg)
    ro, rf = _reference(q, k, v, slopes, K**-0.5, h0)
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    assert_close(o, ro, _rtol(dtype, o), "o")
    assert_close(final, rf, _rtol(dtype, final), "final_state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["h0none", "h0"])
@pytest.mark.parametrize("seg", [None, 1], ids=["segauto", "seg1"])
def test_chunk_varlen_matches_reference(seg, with_h0, dtype):
    H, K, V = 2, 32, 16
    cu = torch.tensor([0, 5, 70, 70, 199, 263], dtype=torch.int32, device=DEVICE)  # ragged, one empty
    q, k, v, h0 = _inputs(1, 263, H, K, V, dtype, n_state=5 if with_h0 else None, seed=7)
    slopes = lightning_decay_slopes(H)
    o, final = _chunk()(q, k, v, slopes, 0.3, h0, True, cu, dtype, seg_chunks=seg)
    ro, rf = _reference(q, k, v, slopes, 0.3, h0, cu)
    assert o.dtype == dtype
    assert_close(o, ro, _rtol(dtype, o), "o")
    assert_close(final, rf, _rtol(dtype, final), "final_state")
    if not with_h0:  # the empty sequence's final state is its (zero) initial state
        assert torch.count_nonzero(final[2]) == 0


def test_entry_dispatches_to_triton_and_drops_final_state():
    q, k, v, h0 = _inputs(1, 70, 2, 32, 32, torch.bfloat16, n_state=1)
    slopes = lightning_decay_slopes(2)
    o, final = chunk_lightning(q, k, v, slopes, 0.2, h0, output_final_state=False, backend="triton")
    assert final is None and o.dtype == torch.bfloat16
    ro, _ = _reference(q, k, v, slopes, 0.2, h0)
    assert_close(o, ro, _rtol(torch.bfloat16, o), "o")


def test_chunked_prefill_carries_state():
    """Prefill in two calls (state carried) == one call; uneven split inside a chunk."""
    H, K, V = 2, 16, 32
    q, k, v, h0 = _inputs(1, 150, H, K, V, torch.float32, n_state=1, seed=3)
    slopes, run = lightning_decay_slopes(H), _chunk()
    o, final = run(q, k, v, slopes, 0.25, h0, True, None, torch.float32)
    o1, s1 = run(q[:, :77], k[:, :77], v[:, :77], slopes, 0.25, h0, True, None, torch.float32)
    o2, s2 = run(q[:, 77:], k[:, 77:], v[:, 77:], slopes, 0.25, s1, True, None, torch.float32)
    assert_close(torch.cat([o1, o2], 1), o, 1e-5, "o")
    assert_close(s2, final, 1e-5, "final_state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "B,T,cu,seg",
    [(2, 130, None, 1), (1, 65, None, None), (1, 263, [0, 5, 70, 70, 199, 263], 1)],
    ids=["B2-T130-seg1", "B1-T65", "varlen-seg1"],
)
def test_chunk_backward_matches_reference(B, T, cu, seg, dtype):
    H, K, V = 2, 32, 16
    n_state = B if cu is None else len(cu) - 1
    cu_t = None if cu is None else torch.tensor(cu, device=DEVICE)
    q, k, v, h0 = _inputs(B, T, H, K, V, dtype, n_state=n_state, seed=11)
    g = torch.Generator().manual_seed(12)
    do, dht = _rand(B, T, H, V, gen=g), _rand(n_state, H, K, V, gen=g)
    slopes = lightning_decay_slopes(H)

    ours = [t.clone().requires_grad_() for t in (q, k, v, h0)]
    o, final = _chunk()(*ours[:3], slopes, 0.3, ours[3], True, cu_t, torch.float32, seg_chunks=seg)
    ((o * do).sum() + (final * dht).sum()).backward()

    ref = [t.detach().double().requires_grad_() for t in (q, k, v, h0)]
    ro, rf = chunk_lightning(*ref[:3], slopes, 0.3, ref[3], True, cu_t, backend="naive")
    ((ro * do.double()).sum() + (rf * dht.double()).sum()).backward()

    assert_close(o, ro, _rtol(dtype, o), "o")
    for name, a, b in zip(("dq", "dk", "dv", "dh0"), ours, ref):
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, b.grad, _rtol(dtype, a.grad), name)


@pytest.mark.parametrize("use", ["o", "final"])
def test_chunk_backward_partial_use(use):
    """Only o is used (dS_T is None: reverse passes start from zero), or only the final state (do is None)."""
    H, K, V = 2, 16, 16
    q, k, v, _ = _inputs(1, 90, H, K, V, torch.float32, seed=5)
    slopes = lightning_decay_slopes(H)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    o, final = _chunk()(*ours, slopes, 0.5, None, True, None, torch.float32)
    (o if use == "o" else final).square().sum().backward()
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ro, rf = naive_chunk_lightning(*ref, slopes, 0.5)
    (ro if use == "o" else rf).square().sum().backward()
    for name, a, b in zip(("dq", "dk", "dv"), ours, ref):
        if b.grad is None:  # the final state does not depend on q
            assert a.grad is None
            continue
        assert_close(a.grad, b.grad, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,K,V", [(1, 32, 16), (3, 16, 32), (5, 32, 32)], ids=lambda x: str(x))
def test_step_matches_recurrence_and_updates_state_in_place(N, K, V, dtype):
    from sala.ops.lightning.recurrent import triton_lightning_step

    H, steps = 2, 3
    g = torch.Generator().manual_seed(N)
    q, k = _rand(N, steps, H, K, dtype=dtype, gen=g), _rand(N, steps, H, K, dtype=dtype, gen=g)
    v = _rand(N, steps, H, V, dtype=dtype, gen=g)
    state = _rand(N, H, K, V, gen=g)
    slopes = lightning_decay_slopes(H)
    ro, rf = naive_recurrent_lightning(q.double(), k.double(), v.double(), slopes, 0.4, state.double())
    ptr = state.data_ptr()
    outs = [triton_lightning_step(q[:, t], k[:, t], v[:, t], slopes, 0.4, state, dtype) for t in range(steps)]
    assert state.data_ptr() == ptr and state.dtype == torch.float32
    o = torch.stack(outs, 1)
    assert o.dtype == dtype
    # the output is rounded to ``dtype``; the state stays fp32
    assert_close(o, ro, _rtol(dtype, o), "o")
    assert_close(state, rf, 1e-5, "state")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_step_strided_inputs(state_dtype):
    """q/k/v as views of a fused projection (non-contiguous heads); an fp64 state stays exact (reference path)."""
    N, H, K = 2, 2, 16
    qkv = _rand(N, H, 3 * K, dtype=state_dtype)
    q, k, v = qkv[..., :K], qkv[..., K : 2 * K], qkv[..., 2 * K :]
    state = _rand(N, H, K, K, dtype=state_dtype)
    slopes = lightning_decay_slopes(H)
    g = torch.exp(-slopes.to(DEVICE))[None, :, None, None]
    expected_state = g * state.double() + k.double()[..., :, None] * v.double()[..., None, :]
    expected = 0.3 * torch.einsum("nhk,nhkv->nhv", q.double(), expected_state)
    o = lightning_step(q, k, v, slopes, 0.3, state, backend="triton")
    assert o.dtype == state_dtype
    tol = 1e-5 if state_dtype == torch.float32 else 1e-12
    assert_close(o, expected, tol, "o")
    assert_close(state, expected_state, tol, "state")


def test_prefill_then_step_equals_longer_prefill():
    H, K, V = 2, 32, 32
    q, k, v, _ = _inputs(1, 81, H, K, V, torch.bfloat16, seed=9)
    slopes = lightning_decay_slopes(H)
    _, state = _chunk()(q[:, :80], k[:, :80], v[:, :80], slopes, 0.2, None, True, None, torch.float32)
    o_step = lightning_step(q[:, 80], k[:, 80], v[:, 80], slopes, 0.2, state, torch.float32, backend="triton")
    ro, rf = _reference(q, k, v, slopes, 0.2, None)
    assert_close(o_step, ro[:, 80], _rtol(torch.bfloat16, o_step), "o")
    assert_close(state, rf, _rtol(torch.bfloat16, state), "state")


def test_step_rejects_non_contiguous_state():
    from sala.ops.lightning.recurrent import triton_lightning_step

    state = _rand(2, 2, 16, 16).transpose(-1, -2)
    q = _rand(2, 2, 16)
    with pytest.raises(ValueError, match="contiguous"):
        triton_lightning_step(q, q, q, lightning_decay_slopes(2), 0.1, state, torch.float32)


@pytest.mark.parametrize("backend", ["naive", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_with_state_rows_steps_only_those_rows(backend, dtype):
    """An engine's state pool [S, H, K, V]: rows [N] pick each sequence's slot; the step equals the plain step on the
    gathered rows, written back in place, and every other row is untouched."""
    N, S, H, K, V = 3, 6, 2, 32, 16
    g = torch.Generator().manual_seed(11)
    q, k = _rand(N, H, K, dtype=dtype, gen=g), _rand(N, H, K, dtype=dtype, gen=g)
    v = _rand(N, H, V, dtype=dtype, gen=g)
    pool = _rand(S, H, K, V, gen=g)
    rows = torch.tensor([4, 0, 2], device=DEVICE)
    slopes = lightning_decay_slopes(H)
    gathered = pool[rows].double()
    want = naive_recurrent_lightning(q[:, None].double(), k[:, None].double(), v[:, None].double(), slopes, 0.7, gathered)
    before, ptr = pool.clone(), pool.data_ptr()
    o = lightning_step(q, k, v, slopes, 0.7, pool, dtype, backend=backend, state_rows=rows)
    assert pool.data_ptr() == ptr and o.shape == (N, H, V) and o.dtype == dtype
    assert_close(o, want[0][:, 0], _rtol(dtype, o), "o")
    assert_close(pool[rows], want[1], 1e-5, "stepped rows")
    others = [s for s in range(S) if s not in rows.tolist()]
    assert torch.equal(pool[others], before[others])


def test_step_state_rows_errors():
    q = _rand(2, 2, 16)
    pool = _rand(4, 2, 16, 16)
    with pytest.raises(ValueError, match="state_rows must be an integer tensor \\[N\\]"):
        lightning_step(q, q, q, lightning_decay_slopes(2), 0.1, pool, state_rows=torch.tensor([0, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="state must be \\[S, H, K, V\\]"):
        lightning_step(q, q, q, lightning_decay_slopes(2), 0.1, _rand(4, 3, 16, 16), state_rows=torch.tensor([0, 1], device=DEVICE))


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_step_state_rows_strided_and_int32(backend):
    """state_rows as a column of an index table (stride 2) and as int32: same as a contiguous int64 copy."""
    N, S, H, K, V = 2, 4, 2, 16, 16
    g = torch.Generator().manual_seed(13)
    q, k, v = _rand(N, H, K, gen=g), _rand(N, H, K, gen=g), _rand(N, H, V, gen=g)
    pool = _rand(S, H, K, V, gen=g)
    table = torch.tensor([[3, 7], [1, 9]], device=DEVICE)  # rows are column 0: [3, 1], stride 2
    slopes = lightning_decay_slopes(H)
    want_pool = pool.clone()
    want = lightning_step(q, k, v, slopes, 0.5, want_pool, backend=backend, state_rows=torch.tensor([3, 1], device=DEVICE))
    for rows in (table[:, 0], table[:, 0].int()):
        p = pool.clone()
        o = lightning_step(q, k, v, slopes, 0.5, p, backend=backend, state_rows=rows)
        assert torch.equal(o, want) and torch.equal(p, want_pool)
