"""Lightning reference forms agree with each other and with the spec; entry validation."""

from __future__ import annotations

import math

import pytest
import torch

from sala.ops import chunk_lightning, lightning_decay_slopes, lightning_step
from sala.ops.lightning import (
    naive_chunk_lightning,
    naive_lightning_step,
    naive_parallel_lightning,
    naive_recurrent_lightning,
)
from sala.utils.testing import assert_close, rel_l2


@pytest.fixture(autouse=True, params=["naive", "cpu"])
def op_backend(request, monkeypatch):
    """Every oracle test runs against the reference and against the CPU backend (``auto`` calls follow it)."""
    monkeypatch.setenv("SALA_BACKEND", request.param)
    return request.param


def _inputs(B, T, H, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    return q, k, v


def test_slopes_power_of_two_and_released():
    s = lightning_decay_slopes(32)
    expected = torch.tensor([2 ** (-(h + 1) / 4) for h in range(32)], dtype=torch.float64)
    assert torch.allclose(s, expected, rtol=0, atol=1e-15)
    assert s[0].item() == pytest.approx(0.8409, abs=1e-4)
    assert s[31].item() == pytest.approx(0.00390625)


def test_slopes_non_power_of_two_matches_spec_example():
    assert lightning_decay_slopes(6).tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    assert len(lightning_decay_slopes(12)) == 12
    with pytest.raises(ValueError, match="num_heads"):
        lightning_decay_slopes(0)


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 130])
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunk_equals_recurrent_equals_parallel_fp64(T, chunk):
    q, k, v = _inputs(2, T, 3, 8)
    slopes = lightning_decay_slopes(3)
    scale = 8**-0.5
    o_par = naive_parallel_lightning(q, k, v, slopes, scale)
    o_rec, s_rec = naive_recurrent_lightning(q, k, v, slopes, scale)
    o_chk, s_chk = naive_chunk_lightning(q, k, v, slopes, scale, chunk_size=chunk)
    assert_close(o_rec, o_par, 1e-12, "recurrent vs parallel")
    assert_close(o_chk, o_par, 1e-12, "chunk vs parallel")
    assert_close(s_chk, s_rec, 1e-12, "chunk state vs recurrent state")


def test_explicit_loop_oracle_small():
    """Spec §4.3 written out with scalars: S_t = gamma S_{t-1} + k^T v, o_t = s q S_t."""
    q, k, v = _inputs(1, 5, 1, 2)
    slope = lightning_decay_slopes(1)
    o, _ = naive_chunk_lightning(q, k, v, slope, 0.5, chunk_size=2)
    gamma = math.exp(-slope.item())
    S = torch.zeros(2, 2, dtype=torch.float64)
    for t in range(5):
        S = gamma * S + torch.outer(k[0, t, 0], v[0, t, 0])
        assert torch.allclose(o[0, t, 0], 0.5 * q[0, t, 0] @ S, atol=1e-14)


def test_initial_state_carries_exactly():
    q, k, v = _inputs(2, 90, 2, 8)
    slopes = lightning_decay_slopes(2)
    o_full, s_full = naive_chunk_lightning(q, k, v, slopes, 0.3)
    o1, s1 = chunk_lightning(q[:, :37], k[:, :37], v[:, :37], slopes, 0.3)
    o2, s2 = chunk_lightning(q[:, 37:], k[:, 37:], v[:, 37:], slopes, 0.3, initial_state=s1)
    assert_close(torch.cat([o1, o2], 1), o_full, 1e-12)
    assert_close(s2, s_full, 1e-12)


def test_varlen_equals_separate_sequences():
    slopes = lightning_decay_slopes(2)
    lens = [5, 70, 1, 33]
    seqs = [_inputs(1, n, 2, 8, seed=i) for i, n in enumerate(lens)]
    h0 = torch.randn(len(lens), 2, 8, 8, dtype=torch.float64)
    q, k, v = (torch.cat([s[j] for s in seqs], 1) for j in range(3))
    cu = torch.tensor([0, 5, 75, 76, 109])
    o, final = chunk_lightning(q, k, v, slopes, 0.4, initial_state=h0, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_ref, s_ref = naive_recurrent_lightning(*seqs[n], slopes, 0.4, initial_state=h0[n : n + 1])
        assert_close(o[:, a:b], o_ref, 1e-12, f"seq {n}")
        assert_close(final[n : n + 1], s_ref, 1e-12, f"state {n}")


def test_step_updates_state_in_place_and_matches_recurrent():
    q, k, v = _inputs(3, 6, 2, 4)
    slopes = lightning_decay_slopes(2)
    o_ref, s_ref = naive_recurrent_lightning(q, k, v, slopes, 0.7)
    state = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    ptr = state.data_ptr()
    for t in range(6):
        o = lightning_step(q[:, t], k[:, t], v[:, t], slopes, 0.7, state)
        assert_close(o, o_ref[:, t], 1e-12)
    assert state.data_ptr() == ptr
    assert_close(state, s_ref, 1e-12)
    assert_close(naive_lightning_step(q[:, 0], k[:, 0], v[:, 0], slopes, 0.7, torch.zeros_like(state)), o_ref[:, 0], 1e-12)


def test_bf16_inputs_run_in_fp32_and_return_requested_dtype():
    q, k, v = _inputs(1, 40, 2, 8, dtype=torch.bfloat16)
    slopes = lightning_decay_slopes(2)
    o, state = chunk_lightning(q, k, v, slopes, 0.35)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    ref = naive_parallel_lightning(q.double(), k.double(), v.double(), slopes, 0.35)
    assert rel_l2(o, ref) < 1e-2
    o32, _ = chunk_lightning(q, k, v, slopes, 0.35, output_dtype=torch.float32)
    assert o32.dtype == torch.float32 and rel_l2(o32, ref) < 1e-5


def test_entry_errors_are_specific():
    q, k, v = _inputs(2, 8, 2, 4)
    slopes = lightning_decay_slopes(2)
    with pytest.raises(ValueError, match=r"slopes must be \[H=2\]"):
        chunk_lightning(q, k, v, lightning_decay_slopes(3), 1.0)
    with pytest.raises(ValueError, match="cu_seqlens needs batch 1, got 2"):
        chunk_lightning(q, k, v, slopes, 1.0, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=8"):
        chunk_lightning(q[:1], k[:1], v[:1], slopes, 1.0, cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_lightning(q, k, v, slopes, 1.0, initial_state=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"q, k, v must be \[B, T, H, D\]"):
        chunk_lightning(q[0], k[0], v[0], slopes, 1.0)
    with pytest.raises(TypeError, match="state must be float32"):
        lightning_step(q[:, 0], k[:, 0], v[:, 0], slopes, 1.0, torch.zeros(2, 2, 4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="backend must be one of"):
        chunk_lightning(q, k, v, slopes, 1.0, backend="cuda")


def test_env_backend_switch(monkeypatch):
    """SALA_BACKEND picks the backend of an ``auto`` call: naive runs the reference, triton the kernel entry."""
    import sala.ops.lightning.chunk as chunk

    q, k, v = _inputs(1, 8, 2, 4)
    slopes = lightning_decay_slopes(2)
    calls = []
    monkeypatch.setattr(chunk, "triton_chunk_lightning", lambda *a, **kw: calls.append(a) or (a[0], None))
    monkeypatch.setenv("SALA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SALA_BACKEND must be one of"):
        chunk_lightning(q, k, v, slopes, 1.0)
    monkeypatch.setenv("SALA_BACKEND", "naive")
    o, final = chunk_lightning(q, k, v, slopes, 1.0)
    ro, rf = naive_chunk_lightning(q, k, v, slopes, 1.0)
    assert not calls and torch.equal(o, ro) and torch.equal(final, rf)
    monkeypatch.setenv("SALA_BACKEND", "triton")  # CPU tensors: allowed under the interpreter (tests/conftest.py)
    chunk_lightning(q, k, v, slopes, 1.0)
    assert len(calls) == 1 and calls[0][0] is q
