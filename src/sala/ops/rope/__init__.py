"""RoPE entry: the reference formula or one fused Triton kernel."""

from __future__ import annotations

import torch

from sala.ops.common.dispatch import call, register
from sala.ops.rope.naive import naive_apply_rope

__all__ = ["apply_rope", "naive_apply_rope", "qk_norm_rope"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Rotate-half (NeoX) RoPE in fp32 (fp64 for fp64 tables), cast back to x's dtype (spec §4.1).

    x: [B, T, H, D] with D even; cos, sin: [B or 1, T, 1, D] with duplicated halves -> [B, T, H, D].
    """
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape != sin.shape or cos.dim() != 4 or cos.shape[1:] != (x.shape[1], 1, x.shape[3]) \
            or cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"apply_rope wants x [B, T, H, D] (D even) and cos/sin [B|1, T, 1, D]; got x {tuple(x.shape)}, "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    return call("apply_rope", backend, x.device, x, cos, sin)


register("apply_rope", "naive", naive_apply_rope)


@register("apply_rope", "triton",
          accepts=lambda x, cos, sin: cos.dtype == torch.float32 and sin.dtype == torch.float32 and x.dtype in _FLOAT)
def _triton_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from sala.ops.rope.fused import triton_apply_rope

    return triton_apply_rope(x, cos, sin)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float,
                 rope: tuple[torch.Tensor, torch.Tensor] | None, backend: str = "auto", k_eps: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head q/k RMSNorm (one [D] weight each), then RoPE when ``rope`` = (cos, sin) is given: what
    ``rms_norm`` and ``apply_rope`` compute one after the other, in one kernel on CUDA (four otherwise).

    q: [B, T, H, D], k: [B, T, Hkv, D]; wq, wk: [D]; cos, sin: [B|1, T, 1, D] -> (q', k'). ``eps`` serves both
    norms unless ``k_eps`` gives k its own. The Triton path
    takes inputs with unit stride along D (e.g. views of one fused projection) and no autograd.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or wq.shape != (q.shape[3],) \
            or wk.shape != wq.shape:
        raise ValueError(f"qk_norm_rope wants q [B, T, H, D], k [B, T, Hkv, D] and weights [D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, weights {tuple(wq.shape)}, {tuple(wk.shape)}")
    k_eps = eps if k_eps is None else k_eps
    return call("qk_norm_rope", backend, q.device, q, k, wq, wk, eps, k_eps, rope)


@register("qk_norm_rope", "naive", takes_backend=True)
def _norms_then_rope(q, k, wq, wk, eps, k_eps, rope, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm`` on q and k, then ``apply_rope`` on both when ``rope`` is given, each entry on ``backend``."""
    from sala.ops.norm import rms_norm

    q, k = rms_norm(q, wq, eps, backend), rms_norm(k, wk, k_eps, backend)
    if rope is not None:
        cos, sin = rope
        q, k = apply_rope(q, cos, sin, backend), apply_rope(k, cos, sin, backend)
    return q, k


def _fusable_qk(q, k, wq, wk, eps, k_eps, rope) -> bool:
    cos, sin = rope if rope is not None else (None, None)
    return (q.dtype == k.dtype and q.dtype in _FLOAT
            and wq.dtype == wk.dtype and wq.dtype in _FLOAT and q.shape[3] % 2 == 0
            and q.stride(-1) == 1 and k.stride(-1) == 1
            and (rope is None or (cos.dtype == torch.float32 and sin.dtype == torch.float32 and cos.shape == sin.shape
                                  and cos.dim() == 4 and cos.shape[1:] == (q.shape[1], 1, q.shape[3])
                                  and cos.shape[0] in (1, q.shape[0])))
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, wq, wk))))


@register("qk_norm_rope", "triton", accepts=_fusable_qk)
def _triton_qk_norm_rope(q, k, wq, wk, eps, k_eps, rope) -> tuple[torch.Tensor, torch.Tensor]:
    from sala.ops.rope.fused import triton_qk_norm_rope

    cos, sin = rope if rope is not None else (None, None)
    return triton_qk_norm_rope(q, k, wq, wk, eps, k_eps, cos, sin)
