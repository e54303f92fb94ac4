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


def _attention_with_lse(q, k, v, scale, causal_top_left):
    """Reference attention in fp64 returning (o, lse): q [B, H, T, D], k/v [B, Hkv, S, D]."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if causal_top_left:
        T, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse


def _cudnn_like(q, k, v, bias, compute_lse, dropout, is_causal, debug, *, scale):
    """The reference with cuDNN attention's signature and outputs (o, lse [B, H, T, 1], ...)."""
    assert bias is None and compute_lse and dropout == 0.0 and not debug
    o, lse = _attention_with_lse(q, k, v, scale, causal_top_left=is_causal)
    return o.to(q.dtype), lse.float().unsqueeze(-1), None


@pytest.mark.parametrize("T,L", [(5, 12), (16, 17), (7, 64)])
def test_split_at_the_chunk_start_and_lse_merge_equal_lower_right_causal(T, L):
    """The cuDNN path on CPU with a reference in place of cuDNN: all earlier keys unmasked + the chunk's own keys
    square-causal, merged by log-sum-exp, equals lower-right causal attention over all keys."""
    from sala.ops.infllm_v2.dense import _cudnn_split, merge_attention

    g = torch.Generator().manual_seed(T * 31 + L)
    q = torch.randn(2, T, 6, 16, generator=g).double()
    k, v = torch.randn(2, L, 2, 16, generator=g).double(), torch.randn(2, L, 2, 16, generator=g).double()
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    want = naive_dense_causal_attention(q, k, v, None, 0.3)
    got = _cudnn_split(qh, kh, vh, 0.3, att=_cudnn_like).transpose(1, 2)
    assert_close(got, want, 1e-6)  # the lse comes back in fp32, as cuDNN's does
    P = L - T  # the parts weighted equally instead of by their log-sum-exps are far off: the test can fail
    o1, _ = _attention_with_lse(qh, kh[:, :, :P], vh[:, :, :P], 0.3, causal_top_left=False)
    o2, _ = _attention_with_lse(qh, kh[:, :, P:], vh[:, :, P:], 0.3, causal_top_left=True)
    assert (((o1 + o2) / 2).transpose(1, 2) - want).abs().max() > 1e-2
    one = torch.zeros(2, 6, T)  # equal log-sum-exps: the plain mean
    assert_close(merge_attention(o1, one, o2, one), (o1 + o2) / 2, 1e-12)


def test_cudnn_split_is_checked_once_then_trusted_or_dropped(monkeypatch, caplog):
    """First use on a device/dtype compares the split with flash: kept when they agree, dropped (with a warning) when
    they disagree or cuDNN raises; chunked prefill's result is flash's either way on that first call."""
    import sala.ops.infllm_v2.dense as dense

    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 6, 4, 16, generator=g), torch.randn(1, 20, 2, 16, generator=g)
    want = naive_dense_causal_attention(q, k, k, None, 0.25)
    split_wanted = dense._split_wanted
    monkeypatch.setattr(dense, "_split_wanted", lambda qh: True)
    for behaviour, kept in (("right", True), ("wrong", False), ("raises", False)):
        monkeypatch.setattr(dense, "_SPLIT_OK", {})
        calls = []

        def fake(qh, kh, vh, scale, behaviour=behaviour):
            calls.append(1)
            if behaviour == "raises":
                raise RuntimeError("cuDNN Frontend error: no valid execution plans")
            out = dense._flash_lower_right(qh, kh, vh, scale)
            return out if behaviour == "right" else out * 1.5

        monkeypatch.setattr(dense, "_cudnn_split", fake)
        for _ in range(3):
            assert_close(sdpa_dense_causal_attention(q, k, k, None, 0.25), want, 1e-5)
        assert dense._SPLIT_OK == {(q.device, q.dtype, 16, 4, 2): kept}
        assert len(calls) == (3 if kept else 1)  # trusted: used on every call; dropped: never again
    # trusted, then a shape cuDNN refuses: that call and the later ones fall back instead of failing the prefill
    monkeypatch.setattr(dense, "_SPLIT_OK", {(q.device, q.dtype, 16, 4, 2): True})
    monkeypatch.setattr(dense, "_cudnn_split", lambda *a: (_ for _ in ()).throw(RuntimeError("no execution plan")))
    assert_close(sdpa_dense_causal_attention(q, k, k, None, 0.25), want, 1e-5)
    assert dense._SPLIT_OK == {(q.device, q.dtype, 16, 4, 2): False} and "cuDNN attention failed" in caplog.text
    assert "disagrees with flash" in caplog.text and "cuDNN attention unavailable" in caplog.text
    assert not split_wanted(q.transpose(1, 2))  # CPU tensors never take it
    monkeypatch.setenv("SALA_CUDNN_SPLIT", "2")
    with pytest.raises(ValueError, match="SALA_CUDNN_SPLIT must be 0 or 1"):
        dense.cudnn_split()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_chunked_prefill_split_matches_reference(dtype):
    """On a GPU: the cuDNN split (checked and trusted after the first call) against the fp32 reference, GQA 4:1."""
    import sala.ops.infllm_v2.dense as dense

    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 256, 8, 128, generator=g)
    k, v = torch.randn(1, 1280, 2, 128, generator=g), torch.randn(1, 1280, 2, 128, generator=g)
    want = naive_dense_causal_attention(q, k, v, None, 128**-0.5)
    for _ in range(2):  # the first call checks the split, the second runs it
        got = sdpa_dense_causal_attention(*(x.cuda().to(dtype) for x in (q, k, v)), None, 128**-0.5)
        assert_close(got.float().cpu(), want, 2e-2 if dtype == torch.bfloat16 else 4e-3)
    assert dense._SPLIT_OK.get((torch.device("cuda", torch.cuda.current_device()), dtype, 128, 8, 2)) is True
