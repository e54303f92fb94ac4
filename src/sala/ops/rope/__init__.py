"""RoPE entry: the reference formula or one fused Triton kernel."""

from __future__ import annotations

import torch

from sala.ops.common.dispatch import resolve_backend
from sala.ops.rope.naive import naive_apply_rope

__all__ = ["apply_rope", "naive_apply_rope"]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Rotate-half (NeoX) RoPE in fp32 (fp64 for fp64 tables), cast back to x's dtype (spec §4.1).

    x: [B, T, H, D] with D even; cos, sin: [B or 1, T, 1, D] with duplicated halves -> [B, T, H, D].
    """
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != sin.shape or cos.dim() != 4 or cos.shape[1:] != (x.shape[1], 1, x.shape[3]) \
            or cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"apply_rope wants x [B, T, H, D] (D even) and cos/sin [B|1, T, 1, D]; got x {tuple(x.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if (resolve_backend(backend, x.device) == "triton" and cos.dtype == torch.float32 and sin.dtype == torch.float32
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        from sala.ops.rope.fused import triton_apply_rope

        return triton_apply_rope(x, cos, sin)
    return naive_apply_rope(x, cos, sin)
