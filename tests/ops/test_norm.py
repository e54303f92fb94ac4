"""Fused Triton RMSNorm vs the reference formula (the interpreter on CPU): values, rounding, gradients."""

from __future__ import annotations

import pytest
import torch

from sala.ops import rms_norm
from sala.ops.norm import naive_rms_norm
from sala.utils.testing import assert_close

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 5, 96), (7, 4, 16), (2, 1, 300), (0, 64)], ids=["hidden", "heads", "odd-D", "empty"])
def test_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (3 * torch.randn(*shape, generator=g)).to(dtype).to(DEV)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype).to(DEV)
    got = rms_norm(x, w, 1e-6, backend="triton")
    want = naive_rms_norm(x, w, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    if x.numel():
        assert_close(got.float(), want.float(), 1e-6 if dtype == torch.float32 else 8e-3, "rms_norm")
        if dtype != torch.float32:  # same rounding points as the reference: almost every element bit-equal
            assert (got == want).float().mean() > 0.97


def test_rms_norm_strided_input_and_mixed_weight():
    x = torch.randn(4, 6, 64, device=DEV).bfloat16()[:, ::2]  # non-contiguous rows
    w = torch.randn(64, device=DEV)  # fp32 weight on bf16 input: fp32 result, like the reference
    got = rms_norm(x, w, 1e-5, backend="triton")
    want = naive_rms_norm(x, w, 1e-5)
    assert got.dtype == torch.float32
    assert_close(got, want, 1e-5, "mixed dtypes")


def test_rms_norm_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 48, generator=g, dtype=torch.float64)
    w = 1 + 0.1 * torch.randn(48, generator=g, dtype=torch.float64)
    dy = torch.randn(5, 3, 48, generator=g, dtype=torch.float64)
    grads = []
    for backend, dt in (("naive", torch.float64), ("triton", torch.float32)):
        xx, ww = (t.to(dt).to(DEV).detach().clone().requires_grad_() for t in (x, w))
        rms_norm(xx, ww, 1e-6, backend=backend).backward(dy.to(dt).to(DEV))
        grads.append((xx.grad.double().cpu(), ww.grad.double().cpu()))
    assert_close(grads[1][0], grads[0][0], 1e-5, "dx")
    assert_close(grads[1][1], grads[0][1], 1e-5, "dw")


def test_rms_norm_errors():
    with pytest.raises(ValueError, match="weight \\[D\\]"):
        rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_on_head_views_of_a_fused_projection(dtype):
    """q/k heads viewed out of one wide GEMM output [B, T, q|k|v] (rows with two strides): normed in place of a
    copy, equal to the reference on a contiguous copy."""
    g = torch.Generator().manual_seed(8)
    B, T, H, D = 2, 5, 3, 32
    wide = (2 * torch.randn(B, T, H * D + 2 * D, generator=g)).to(dtype).to(DEV)
    q = wide[..., : H * D].view(B, T, H, D)
    k = wide[..., H * D : H * D + D].view(B, T, 1, D)
    w = (1 + 0.3 * torch.randn(D, generator=g)).to(dtype).to(DEV)
    for x in (q, k, q[:, :1]):
        got = rms_norm(x, w, 1e-6, backend="triton")
        assert got.is_contiguous() and got.shape == x.shape
        assert_close(got.float(), naive_rms_norm(x.contiguous(), w, 1e-6).float(), 1e-6 if dtype == torch.float32 else 8e-3, "views")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_rms_norm_matches_add_then_norm(dtype):
    from sala.ops import residual_rms_norm
    from sala.ops.elementwise import naive_scaled_residual

    g = torch.Generator().manual_seed(21)
    h, y = ((2 * torch.randn(3, 7, 96, generator=g)).to(dtype).to(DEV) for _ in range(2))
    w = (1 + 0.3 * torch.randn(96, generator=g)).to(dtype).to(DEV)
    r, n = residual_rms_norm(h, y, 0.37, w, 1e-6, backend="triton")
    want_r = naive_scaled_residual(h, y, 0.37)
    want_n = naive_rms_norm(want_r, w, 1e-6)
    assert torch.equal(r, want_r)  # the add rounds exactly like the reference's two ops
    assert_close(n.float(), want_n.float(), 1e-6 if dtype == torch.float32 else 8e-3, "normed")
    if dtype == torch.bfloat16:
        assert (n == want_n).float().mean() > 0.97


def test_residual_rms_norm_gradients_and_errors():
    from sala.ops import residual_rms_norm

    g = torch.Generator().manual_seed(4)
    h, y = (torch.randn(2, 5, 32, generator=g, dtype=torch.float64) for _ in range(2))
    w = 1 + 0.1 * torch.randn(32, generator=g, dtype=torch.float64)
    grads = []
    for backend, dt in (("naive", torch.float64), ("triton", torch.float32)):
        hh, yy = (t.to(dt).to(DEV).detach().clone().requires_grad_() for t in (h, y))
        r, n = residual_rms_norm(hh, yy, 0.5, w.to(dt).to(DEV), 1e-6, backend)
        (r.sum() + n.square().sum()).backward()
        grads.append((hh.grad.double().cpu(), yy.grad.double().cpu()))
    assert_close(grads[1][0], grads[0][0], 1e-5, "dh")
    assert_close(grads[1][1], grads[0][1], 1e-5, "dy")
    with pytest.raises(ValueError, match="one shape"):
        residual_rms_norm(h, y[:, :3], 0.5, w, 1e-6)


def test_rms_norm_zero_size_and_mixed_residual():
    from sala.ops import residual_rms_norm

    x = torch.randn(2, 3, 0, 16, device=DEV)
    assert rms_norm(x, torch.ones(16, device=DEV), 1e-6, backend="triton").shape == x.shape
    h, y = torch.randn(2, 8, device=DEV), torch.randn(2, 8, device=DEV).bfloat16()  # autocast-style mix
    r, n = residual_rms_norm(h, y, 0.5, torch.ones(8, device=DEV), 1e-6, backend="triton")
    assert r.dtype == torch.float32
    assert_close(r, h + y.float() * 0.5, 1e-6, "mixed residual")


@pytest.mark.parametrize("x_dtype, w_dtype, tol", [(torch.bfloat16, torch.float32, 1e-2), (torch.float32, torch.float32, 1e-5),
                                                   (torch.float16, torch.float16, 2e-3)], ids=["bf16-fp32w", "fp32", "fp16"])
def test_rms_norm_backward_kernel_against_fp64(x_dtype, w_dtype, tol):
    """The fused backward (dx, and dw summed from per-program partials over many programs) vs fp64 autograd."""
    g = torch.Generator().manual_seed(7)
    x = 2 * torch.randn(37, 3, 72, generator=g, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(72, generator=g, dtype=torch.float64)
    dy = torch.randn(37, 3, 72, generator=g, dtype=torch.float64)
    xx = x.to(x_dtype).to(DEV).requires_grad_()
    ww = w.to(w_dtype).to(DEV).requires_grad_()
    rms_norm(xx, ww, 1e-6, backend="triton").backward(dy.to(torch.promote_types(x_dtype, w_dtype)).to(DEV))
    xr, wr = (t.to(dt).double().requires_grad_() for t, dt in ((x, x_dtype), (w, w_dtype)))
    naive_rms_norm(xr, wr, 1e-6).backward(dy.to(torch.promote_types(x_dtype, w_dtype)).double())
    assert xx.grad.dtype == x_dtype and ww.grad.dtype == w_dtype
    assert_close(xx.grad.double().cpu(), xr.grad, tol, "dx")
    assert_close(ww.grad.double().cpu(), wr.grad, tol, "dw")


def test_rms_norm_backward_on_head_views_and_one_input():
    """q-norm style: x a strided head view of a projection; gradients for x only, then for the weight only."""
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(6, 5 * 32, generator=g).to(DEV)
    w = (1 + 0.2 * torch.randn(32, generator=g)).to(DEV)
    dy = torch.randn(6, 3, 32, generator=g).to(DEV)
    for need_x, need_w in ((True, False), (False, True)):
        p, ww = proj.clone().requires_grad_(need_x), w.clone().requires_grad_(need_w)
        rms_norm(p[:, :96].view(6, 3, 32), ww, 1e-5, backend="triton").backward(dy)
        pr, wr = proj.double().requires_grad_(need_x), w.double().requires_grad_(need_w)
        naive_rms_norm(pr[:, :96].view(6, 3, 32), wr, 1e-5).backward(dy.double())
        if need_x:
            assert_close(p.grad.double(), pr.grad, 1e-5, "dx")
            assert ww.grad is None
        else:
            assert_close(ww.grad.double(), wr.grad, 1e-5, "dw")
            assert p.grad is None
