"""Distillation KL of logit rows: the Triton kernel (interpreter) against the PyTorch reference and against an
fp64 computation from the definition; the training loss through it against the same loss through the reference."""

from __future__ import annotations

import pytest
import torch

from sala.ops.kl import kl_rows, naive_kl_rows
from sala.utils.testing import assert_close


def _logits(c, v, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(c, v, generator=g)


def _fp64(s, t, temperature):
    """sum_rows T^2 KL(p_t || p_s) and T (p_s - p_t) in fp64, from the definition."""
    zs, zt = s.double() / temperature, t.double() / temperature
    ps, pt = zs.softmax(-1), zt.softmax(-1)
    kl = (pt * (pt.log() - ps.log())).sum() * temperature**2
    return kl, (ps - pt) * temperature


@pytest.mark.parametrize("c,v", [(5, 1000), (3, 64), (2, 4097)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_triton_kl_rows_matches_reference_and_fp64(monkeypatch, c, v, temperature):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    s, t = _logits(c, v, seed=v), _logits(c, v, seed=v + 1, scale=5.0)
    s[0] = s[0] + 30.0  # a row far from zero: the log-normalisers must not overflow
    want_kl, want_g = _fp64(s, t, temperature)
    for backend in ("naive", "triton"):
        kl, g = kl_rows(s.clone(), t.clone(), temperature, True, backend=backend)
        assert_close(kl.double().reshape(1), want_kl.reshape(1), 1e-5, f"{backend} KL vs fp64")
        assert_close(g.double(), want_g, 1e-5, f"{backend} gradient vs fp64")
        kl_only, none = kl_rows(s.clone(), t.clone(), temperature, False, backend=backend)
        assert none is None and torch.equal(kl_only, kl)


def test_kl_rows_of_equal_rows_is_zero_with_zero_gradient(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    s = _logits(4, 300, seed=3)
    kl, g = kl_rows(s.clone(), s.clone(), 1.0, True, backend="triton")
    assert abs(kl.item()) < 1e-5 and g.abs().max().item() < 1e-6


def test_kl_rows_input_errors():
    s = torch.randn(2, 8)
    with pytest.raises(ValueError, match="one shape"):
        kl_rows(s, torch.randn(2, 9), 1.0, True)
    with pytest.raises(ValueError, match="one dtype"):
        kl_rows(s, s.double(), 1.0, True)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kl_rows(s, s.clone(), 0.0, True)
    assert naive_kl_rows(s.clone(), s.clone(), 1.0, False)[1] is None


def test_fused_linear_kl_through_the_kernel_equals_the_reference(monkeypatch):
    """The whole chunked training loss (fp32, a mask, temperature 2, several chunks) with the KL rows on the
    Triton kernel and on the reference: same loss and same gradients."""
    from sala.train.losses import fused_linear_kl

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(37, 24, generator=g)
    ws = (0.3 * torch.randn(200, 24, generator=g)).requires_grad_()
    ht, wt = torch.randn(37, 16, generator=g), 0.3 * torch.randn(200, 16, generator=g)
    mask = torch.rand(37, generator=g) > 0.2
    results = {}
    for backend in ("naive", "triton"):
        monkeypatch.setenv("SALA_BACKEND", backend)
        h = hs.clone().requires_grad_()
        ws.grad = None
        loss = fused_linear_kl(h, ws, ht, wt, student_scale=0.5, teacher_scale=0.7, mask=mask, chunk_size=16,
                               temperature=2.0)
        loss.backward()
        results[backend] = (loss.detach(), h.grad.clone(), ws.grad.clone())
    for a, b, name in zip(results["naive"], results["triton"], ("loss", "hidden grad", "weight grad")):
        assert_close(b.reshape(-1).double(), a.reshape(-1).double(), 1e-5, name)


@pytest.mark.gpu
def test_cuda_kl_rows_matches_fp64():
    """The compiled kernel: SmolLM2's vocabulary (49,152: 12 tiles of 4,096), a ragged one, temperature 2."""
    for v, temperature in ((49152, 1.0), (5000, 2.0)):
        s, t = _logits(64, v, seed=v).cuda(), _logits(64, v, seed=v + 1, scale=5.0).cuda()
        want_kl, want_g = _fp64(s, t, temperature)
        kl, g = kl_rows(s.clone(), t.clone(), temperature, True, backend="triton")
        assert_close(kl.double().reshape(1), want_kl.reshape(1), 1e-5, f"cuda KL vs fp64, V={v}")
        assert_close(g.double(), want_g, 1e-5, f"cuda gradient vs fp64, V={v}")
