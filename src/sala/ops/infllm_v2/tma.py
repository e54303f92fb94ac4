"""TMA tensor descriptors over per-head row blocks of [N, Hkv, D] tensors (K, V, compressed keys).

On Hopper and newer, a kernel that loads whole blocks of one KV head (``desc.load([row, head * D])`` -> [rows, D])
gets one bulk asynchronous copy into swizzled shared memory instead of per-thread gathers. The Triton interpreter
emulates descriptors, so the same kernel code runs in the CPU tests.
"""

from __future__ import annotations

import torch

from sala.ops.common.launch import has_tma

try:  # host-side descriptors: triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: every kernel keeps its pointer loads
    TensorDescriptor = None


def head_block_descriptor(x: torch.Tensor, rows: int):
    """Descriptor over ``x`` [N, Hkv, D] viewed as [N, Hkv * D] with box [rows, D] (rows past N read as 0), or
    None where it does not apply: no TMA (pre-Hopper GPUs, old triton), fp32 (twice the shared memory per box),
    no rows, a head dim that is not a power of two in [16, 256], more than 256 rows, or a layout a descriptor
    cannot describe (heads not packed, overlapping or broadcast rows, rows or base not 16-byte aligned)."""
    D = x.shape[2]
    if TensorDescriptor is None or x.dtype not in (torch.float16, torch.bfloat16) or x.shape[0] == 0:
        return None
    if D & (D - 1) or not 16 <= D <= 256 or not 1 <= rows <= 256:
        return None
    if not has_tma(x.device):
        return None
    packed = x.stride(2) == 1 and x.stride(1) == D and x.stride(0) >= x.shape[1] * D  # rows may not overlap
    if not packed or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
        return None
    return TensorDescriptor(x, [x.shape[0], x.shape[1] * D], [x.stride(0), 1], [rows, D])
