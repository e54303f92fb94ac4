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
