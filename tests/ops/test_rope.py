"""Fused Triton RoPE vs the reference formula (the interpreter on CPU): values, strides, gradients."""

from __future__ import annotations

import pytest
import torch

from sala.model.modeling_sala import rope_cos_sin
from sala.ops import apply_rope
from sala.ops.rope import naive_apply_rope
from sala.utils.testing import assert_close

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tables(B, T, D, start=0):
    pos = (torch.arange(T) + start).expand(B, T) + torch.arange(B)[:, None] * 1000  # each row its own positions
    return rope_cos_sin(pos.to(DEV), D, 10000.0, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 5, 4, 32), (1, 3, 3, 128), (3, 1, 2, 96)], ids=["B2", "H3-D128", "decode-D96"])
def test_rope_matches_reference(shape, dtype):
    B, T, H, D = shape
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(D)).to(dtype).to(DEV)
    cos, sin = _tables(B, T, D, start=77)
    got = apply_rope(x, cos, sin, backend="triton")
    want = naive_apply_rope(x, cos, sin)
    assert got.dtype == dtype
    assert_close(got.float(), want.float(), 1e-6 if dtype == torch.float32 else 8e-3, "rope")


def test_rope_strided_input_and_shared_tables():
    x = torch.randn(2, 4, 6, 64, device=DEV)[:, :, ::2]  # heads strided
    cos, sin = _tables(1, 4, 64)  # one table row broadcast over the batch
    assert_close(apply_rope(x, cos, sin, backend="triton"), naive_apply_rope(x, cos, sin), 1e-6, "strided")


def test_rope_gradient_is_the_inverse_rotation():
    x = torch.randn(2, 3, 2, 16, dtype=torch.float64)
    dy = torch.randn_like(x)
    cos, sin = _tables(2, 3, 16)
    grads = []
    for backend, dt in (("naive", torch.float64), ("triton", torch.float32)):
        xx = x.to(dt).to(DEV).detach().clone().requires_grad_()
        c, s = (cos, sin) if dt == torch.float32 else (cos.double(), sin.double())
        apply_rope(xx, c, s, backend=backend).backward(dy.to(dt).to(DEV))
        grads.append(xx.grad.double().cpu())
    assert_close(grads[1], grads[0], 1e-6, "dx")


def test_rope_errors():
    cos, sin = _tables(1, 3, 16)
    with pytest.raises(ValueError, match="D even"):
        apply_rope(torch.randn(1, 3, 2, 15), cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(torch.randn(1, 4, 2, 16), cos, sin)


@pytest.mark.parametrize("with_rope", [True, False], ids=["norm+rope", "norm-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qk_norm_rope_matches_norm_then_rope(dtype, with_rope):
    """q/k as head views of one fused projection output; one kernel == rms_norm then apply_rope (reference), with
    bf16 results bit-equal (same rounding points)."""
    from sala.model.modeling_sala import rope_cos_sin
    from sala.ops import qk_norm_rope
    from sala.ops.norm import naive_rms_norm

    g = torch.Generator().manual_seed(12)
    B, T, H, Hkv, D = 2, 5, 3, 2, 32
    wide = (2 * torch.randn(B, T, (H + 2 * Hkv) * D, generator=g)).to(dtype).to(DEV)
    q, k = wide[..., : H * D].view(B, T, H, D), wide[..., H * D : (H + Hkv) * D].view(B, T, Hkv, D)
    wq, wk = ((1 + 0.3 * torch.randn(D, generator=g)).to(dtype).to(DEV) for _ in range(2))
    rope = rope_cos_sin(torch.arange(40, 40 + T, device=DEV).expand(B, T), D, 10000.0, dtype) if with_rope else None
    got_q, got_k = qk_norm_rope(q, k, wq, wk, 1e-6, rope, backend="triton")
    want_q, want_k = naive_rms_norm(q, wq, 1e-6), naive_rms_norm(k, wk, 1e-6)
    if with_rope:
        want_q, want_k = naive_apply_rope(want_q, *rope), naive_apply_rope(want_k, *rope)
    for got, want, name in ((got_q, want_q, "q"), (got_k, want_k, "k")):
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
        assert_close(got.float(), want.float(), 1e-6 if dtype == torch.float32 else 8e-3, name)
        if dtype == torch.bfloat16:
            assert (got == want).float().mean() > 0.97


def test_qk_norm_rope_gradients_and_errors():
    from sala.model.modeling_sala import rope_cos_sin
    from sala.ops import qk_norm_rope

    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 3, 2, 16, generator=g, dtype=torch.float64), torch.randn(1, 3, 1, 16, generator=g, dtype=torch.float64)
    w = 1 + 0.1 * torch.randn(16, generator=g, dtype=torch.float64)
    rope = rope_cos_sin(torch.arange(3)[None], 16, 100.0, torch.float32)
    grads = []
    for backend, dt in (("naive", torch.float64), ("triton", torch.float32)):
        qq, kk = (t.to(dt).to(DEV).detach().clone().requires_grad_() for t in (q, k))
        tables = tuple(r.to(DEV).to(torch.promote_types(dt, torch.float32)) for r in rope)
        a, b = qk_norm_rope(qq, kk, w.to(dt).to(DEV), w.to(dt).to(DEV), 1e-6, tables, backend)
        (a.square().sum() + (b * 3).sum()).backward()
        grads.append((qq.grad.double().cpu(), kk.grad.double().cpu()))
    assert_close(grads[1][0], grads[0][0], 1e-5, "dq")
    assert_close(grads[1][1], grads[0][1], 1e-5, "dk")
    with pytest.raises(ValueError, match="qk_norm_rope wants q"):
        qk_norm_rope(q, k[:, :2], w, w, 1e-6, None)


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_qk_norm_rope_separate_k_eps(backend):
    """k_eps gives k its own norm epsilon (q keeps eps), on both paths; large eps so the difference shows."""
    from sala.ops import qk_norm_rope
    from sala.ops.norm import naive_rms_norm

    g = torch.Generator().manual_seed(31)
    q, k = 0.1 * torch.randn(1, 3, 2, 16, generator=g), 0.1 * torch.randn(1, 3, 1, 16, generator=g)
    q, k = q.to(DEV), k.to(DEV)
    w = torch.ones(16, device=DEV)
    got_q, got_k = qk_norm_rope(q, k, w, w, 1e-6, None, backend, k_eps=0.5)
    assert_close(got_q, naive_rms_norm(q, w, 1e-6), 1e-6, "q keeps eps")
    assert_close(got_k, naive_rms_norm(k, w, 0.5), 1e-6, "k uses k_eps")
    assert not torch.allclose(got_k, naive_rms_norm(k, w, 1e-6), rtol=1e-2)
