"""Fused elementwise glue (SwiGLU product, sigmoid gate, scaled residual) vs the reference formulas, with the
reference's rounding points (the interpreter on CPU), gradients, and the fallbacks."""

from __future__ import annotations

import pytest
import torch

from sala.ops import scaled_residual, sigmoid_gate, silu_mul
from sala.ops.elementwise import naive_scaled_residual, naive_sigmoid_gate, naive_silu_mul
from sala.utils.testing import assert_close

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
OPS = [
    (lambda a, b, be: silu_mul(a, b, be), lambda a, b: naive_silu_mul(a, b)),
    (lambda a, b, be: sigmoid_gate(a, b, be), lambda a, b: naive_sigmoid_gate(a, b)),
    (lambda a, b, be: scaled_residual(a, b, 0.2165, be), lambda a, b: naive_scaled_residual(a, b, 0.2165)),
]
IDS = ["silu_mul", "sigmoid_gate", "scaled_residual"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("op", OPS, ids=IDS)
@pytest.mark.parametrize("shape", [(3, 7, 300), (1, 1, 64), (0, 5)], ids=["prefill", "decode", "empty"])
def test_glue_matches_reference(op, dtype, shape):
    g = torch.Generator().manual_seed(sum(shape) + int(dtype.itemsize))
    a = (3 * torch.randn(*shape, generator=g)).to(dtype).to(DEV)
    b = (3 * torch.randn(*shape, generator=g)).to(dtype).to(DEV)
    fused, ref = op
    got, want = fused(a, b, "triton"), ref(a, b)
    assert got.dtype == want.dtype and got.shape == want.shape
    if a.numel():
        assert_close(got.float(), want.float(), 1e-6 if dtype == torch.float32 else 4e-3, "glue")
        if dtype != torch.float32:  # same rounding points: nearly every element bit-equal
            assert (got == want).float().mean() > 0.98


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_glue_gradients(op):
    g = torch.Generator().manual_seed(3)
    a, b, dy = (torch.randn(4, 33, generator=g, dtype=torch.float64) for _ in range(3))
    grads = []
    for backend, dt in (("naive", torch.float64), ("triton", torch.float32)):
        aa, bb = (t.to(dt).to(DEV).detach().clone().requires_grad_() for t in (a, b))
        op[0](aa, bb, backend).backward(dy.to(dt).to(DEV))
        grads.append((aa.grad.double().cpu(), bb.grad.double().cpu()))
    for x, y, name in zip(grads[1], grads[0], "ab"):
        assert_close(x, y, 1e-5, f"d{name}")


def test_glue_falls_back_for_mixed_or_strided_inputs():
    a = torch.randn(4, 8, device=DEV)
    b = torch.randn(8, 4, device=DEV).t()  # strided
    assert_close(silu_mul(a, b, "triton"), naive_silu_mul(a, b), 1e-6, "strided")
    c = torch.randn(4, 8, device=DEV, dtype=torch.float64)
    assert silu_mul(c, c, "triton").dtype == torch.float64  # fp64: the reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_glue_on_column_slices_of_a_fused_projection(op, dtype):
    """gate/up (or o/z) as column slices of one wide GEMM output: the Triton path takes them as rows with their
    own stride (no copy) and matches the reference on the same views."""
    from sala.ops.elementwise import _fused

    g = torch.Generator().manual_seed(5)
    wide = (3 * torch.randn(2, 7, 2 * 48 + 16, generator=g)).to(dtype).to(DEV)
    a, b = wide[..., :48], wide[..., 64:112]
    assert not a.is_contiguous() and _fused(a, b, "triton")
    got, want = op[0](a, b, "triton"), op[1](a, b)
    assert got.is_contiguous() and got.shape == a.shape
    assert_close(got.float(), want.float(), 1e-6 if dtype == torch.float32 else 4e-3, "glue on slices")
