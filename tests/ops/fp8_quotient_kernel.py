"""A test kernel (not collected): the fp8 quantisers' quotient ``_quotient(x, scale)`` written out row by row, for
``test_fp8.py`` to compare with IEEE division. Its own module because the interpreter resolves a kernel's names in
the module that defines it, and ``test_fp8.py`` must import without Triton."""

import triton
import triton.language as tl

from sala.ops.fp8.triton_gemm import _quotient


@triton.jit
def quotient_kernel(x_ptr, s_ptr, o_ptr, C: tl.constexpr):
    """x [R, C] fp32, s [R] -> o [R, C] = _quotient(x, s); one program per row."""
    r = tl.program_id(0) + tl.arange(0, 1)
    c = tl.arange(0, C)
    x = tl.load(x_ptr + r[:, None] * C + c[None, :])
    tl.store(o_ptr + r[:, None] * C + c[None, :], _quotient(x, tl.load(s_ptr + r)))
