"""The SDPA dense path (used on CUDA) equals the reference on every branch (CPU run via the triton backend)."""

from __future__ import annotations

import pytest
import torch

from sala.ops import dense_causal_attention
from sala.ops.infllm_v2.dense import sdpa_dense_causal_attention
from sala.ops.infllm_v2.naive import naive_dense_causal_attention
from sala.utils.testing import assert_close


@pytest.mark.parametrize("T,L", [(33, 33), (1, 40), (9, 40), (40, 40)])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_matches_reference(T, L, padded):
    g = torch.Generator().manual_seed(T * 100 + L)
    q = torch.randn(2, T, 4, 16, generator=g)
    k, v = torch.randn(2, L, 2, 16, generator=g), torch.randn(2, L, 2, 16, generator=g)
    valid = None
    if padded:
        valid = torch.ones(2, L, dtype=torch.bool)
        valid[1, : L - T + max(0, T - 5) // 2] = False  # row 1 left-padded, some queries are padding
    ref = naive_dense_causal_attention(q, k, v, valid, 0.25)
    got = sdpa_dense_causal_attention(q, k, v, valid, 0.25)
    rows = torch.ones(2, T, dtype=torch.bool) if valid is None else valid[:, L - T :]
    assert_close(got[rows], ref[rows], 1e-5)


def test_entry_dispatches_to_sdpa_under_triton_backend(monkeypatch):
    """backend="triton" runs the SDPA path (one call, same result as the reference); "naive" never reaches it."""
    import sala.ops.infllm_v2.dense as dense

    calls = []
    monkeypatch.setattr(dense, "sdpa_dense_causal_attention", lambda *a: calls.append(a) or sdpa_dense_causal_attention(*a))
    q, k = torch.randn(1, 5, 4, 16), torch.randn(1, 12, 2, 16)
    b = dense_causal_attention(q, k, k, None, 0.3, backend="naive")
    assert not calls
    a = dense_causal_attention(q, k, k, None, 0.3, backend="triton")
    assert len(calls) == 1 and calls[0][0] is q
    assert_close(a, b, 1e-5)
