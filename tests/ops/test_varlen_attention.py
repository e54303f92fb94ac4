"""Packed-document attention (``varlen_causal_attention``): each document attends causally to itself alone.

The oracle is the reference dense attention run on each document by itself. CPU: the ``cpu`` and ``naive``
backends, values and gradients. GPU (``-m gpu``): the one-launch flash path, bf16, with SmolLM2's 9/3 heads.
"""

from __future__ import annotations

import pytest
import torch

from sala.ops import varlen_causal_attention
from sala.ops.infllm_v2.naive import naive_dense_causal_attention
from sala.utils.testing import assert_close


def _docs(lens, H, Hkv, D, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    N = sum(lens)
    q, k, v = (torch.randn(N, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    return q, k, v, torch.tensor(bounds, dtype=torch.int32, device=device), bounds


def _oracle(q, k, v, bounds, scale):
    """Each document alone through the reference, in fp64."""
    return torch.cat([naive_dense_causal_attention(q[None, a:b].double(), k[None, a:b].double(),
                                                   v[None, a:b].double(), None, scale)[0]
                      for a, b in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("backend", ["cpu", "naive"])
@pytest.mark.parametrize("lens", [(17,), (5, 1, 30, 12), (64, 3)])
def test_documents_never_see_each_other(backend, lens):
    q, k, v, cu, bounds = _docs(lens, 9, 3, 16, seed=sum(lens))
    for t in (q, k, v):
        t.requires_grad_(True)
    got = varlen_causal_attention(q, k, v, cu, bounds, 0.25, backend=backend)
    ref = _oracle(q, k, v, bounds, 0.25)
    assert_close(got, ref.float(), 1e-5)
    w = torch.randn_like(got)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert_close(a, b.float(), 1e-5)


def test_a_later_document_changes_nothing_before_it():
    q, k, v, cu, bounds = _docs((20, 15), 4, 2, 16, seed=3)
    base = varlen_causal_attention(q, k, v, cu, bounds, 0.3, backend="cpu")
    k2, v2 = k.clone(), v.clone()
    k2[20:] += 5.0
    v2[20:] -= 3.0
    moved = varlen_causal_attention(q, k2, v2, cu, bounds, 0.3, backend="cpu")
    assert torch.equal(moved[:20], base[:20])
    assert (moved[20:] - base[20:]).abs().max() > 0.1
    # one document of 35 tokens would let the second half see the first
    joint = varlen_causal_attention(q, k, v, torch.tensor([0, 35], dtype=torch.int32), [0, 35], 0.3, backend="cpu")
    assert (joint[20:] - base[20:]).abs().max() > 1e-3


@pytest.mark.parametrize("bad, match", [
    (dict(bounds=[0, 10, 10, 40]), "rise strictly"),
    (dict(bounds=[0, 39]), "rise strictly"),
    (dict(cu=torch.tensor([0, 40], dtype=torch.int32)), "disagree"),
    (dict(k=torch.randn(40, 2, 8)), "q \\[N, H, D\\]"),
    (dict(k=torch.randn(40, 2, 16), v=torch.randn(40, 2, 16)), "multiple of KV heads"),
])
def test_bad_inputs_are_named(bad, match):
    q, k, v, cu, bounds = _docs((10, 30), 9, 3, 16, seed=1)
    args = dict(q=q, k=k, v=v, cu=cu, bounds=bounds) | bad
    with pytest.raises(ValueError, match=match):
        varlen_causal_attention(args["q"], args["k"], args["v"], args["cu"], args["bounds"], 0.25, backend="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [(2048,), (700, 1, 1100, 247), (5000, 3192)])
def test_gpu_flash_varlen_matches_reference(lens):
    """bf16, 9 query / 3 KV heads of 64 (SmolLM2), values and gradients against fp64 per-document attention."""
    q, k, v, cu, bounds = _docs(lens, 9, 3, 64, seed=len(lens), device="cuda", dtype=torch.bfloat16)
    for t in (q, k, v):
        t.requires_grad_(True)
    got = varlen_causal_attention(q, k, v, cu, bounds, 0.125, backend="triton")
    ref = _oracle(q, k, v, bounds, 0.125)
    assert_close(got.double(), ref, 1e-2)
    w = torch.randn_like(got)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert_close(a.double(), b, 2e-2)


def test_flash_varlen_switch_is_checked(monkeypatch):
    from sala.utils.env import flash_varlen

    monkeypatch.setenv("SALA_FLASH_VARLEN", "0")
    assert flash_varlen() is False
    monkeypatch.setenv("SALA_FLASH_VARLEN", "yes")
    with pytest.raises(ValueError, match="SALA_FLASH_VARLEN must be 0 or 1"):
        flash_varlen()
