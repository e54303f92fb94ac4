"""Lightning attention entries: chunked prefill (``chunk_lightning``) and one-token decode (``lightning_step``).

Shapes follow fla: q, k: [B, T, H, K]; v: [B, T, H, V]; states [N, H, K, V] in fp32 (fp64 for fp64 inputs).
Varlen input is packed as [1, sum T, H, D] with ``cu_seqlens`` [N+1] (int32/int64, starts at 0).
"""

from __future__ import annotations

import torch

from sala.ops.common.dispatch import call, register
from sala.ops.common.fallback import map_sequences
from sala.ops.lightning.naive import (
    compute_dtype,
    lightning_decay_slopes,
    naive_chunk_lightning,
    naive_lightning_step,
    naive_lightning_step_rows,
    naive_parallel_lightning,
    naive_recurrent_lightning,
)

__all__ = [
    "chunk_lightning",
    "compute_dtype",
    "lightning_decay_slopes",
    "lightning_step",
    "naive_chunk_lightning",
    "naive_lightning_step",
    "naive_parallel_lightning",
    "naive_recurrent_lightning",
]


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] matching q's [B, T, H]; got v {tuple(v.shape)}, q {tuple(q.shape)}")
    if slopes.shape != (q.shape[2],):
        raise ValueError(f"slopes must be [H={q.shape[2]}], got {tuple(slopes.shape)}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, q: torch.Tensor) -> None:
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch 1, got {q.shape[0]}; flatten to [1, sum T, H, D]")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    cs = cu_seqlens.tolist()
    if cs[0] != 0 or cs[-1] != q.shape[1] or any(b < a for a, b in zip(cs, cs[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={q.shape[1]} without decreasing, got {cs}")


def chunk_lightning(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning attention over whole sequences (prefill), carrying an optional initial state.

    q, k: [B, T, H, K]; v: [B, T, H, V]; slopes: [H] (decay rates, gamma = exp(-slope));
    initial_state: [N, H, K, V] or None; cu_seqlens: [N+1] (then B must be 1) or None (N = B)
    -> o: [B, T, H, V] in ``output_dtype`` (default q.dtype), final_state: [N, H, K, V] fp32/fp64 or None.
    """
    _check_qkv(q, k, v, slopes)
    n_seq = q.shape[0]
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, q)
        n_seq = cu_seqlens.numel() - 1
    state_shape = (n_seq, q.shape[2], q.shape[3], v.shape[3])
    if initial_state is not None and tuple(initial_state.shape) != state_shape:
        raise ValueError(f"initial_state must be [N, H, K, V] = {state_shape}, got {tuple(initial_state.shape)}")
    out_dtype = output_dtype or q.dtype
    return call("chunk_lightning", backend, q.device,
                q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens, out_dtype)


@register("chunk_lightning", "naive")
def _naive_chunk_lightning(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens, out_dtype):
    """The reference, one sequence at a time for varlen input."""
    def run(q, k, v, h0):
        return naive_chunk_lightning(q, k, v, slopes, scale, h0)

    o, final = (run(q, k, v, initial_state) if cu_seqlens is None
                else map_sequences(run, cu_seqlens, (q, k, v), (initial_state,)))
    return o.to(out_dtype), (final if output_final_state else None)


@register("chunk_lightning", "cpu")
def _cpu_chunk_lightning(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens, out_dtype):
    from sala.ops.lightning.cpu import cpu_chunk_lightning

    return cpu_chunk_lightning(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens, out_dtype)


@register("chunk_lightning", "triton")
def _triton_chunk_lightning(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens, out_dtype):
    from sala.ops.lightning.chunk import triton_chunk_lightning

    return triton_chunk_lightning(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens, out_dtype)


def lightning_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    state: torch.Tensor,
    output_dtype: torch.dtype | None = None,
    backend: str = "auto",
    state_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token per sequence; ``state`` is updated in place (no allocation, CUDA-graph friendly).

    q, k: [N, H, K]; v: [N, H, V]; state: [N, H, K, V] fp32/fp64 -> o: [N, H, V] in ``output_dtype``.
    ``state_rows`` [N] (integer, on the state's device, values in [0, S)): sequence n uses ``state[state_rows[n]]``
    of a larger state [S, H, K, V], so an engine steps its cache slots without gathering and scattering them.
    Rows must be distinct, except rows pointing at a scratch row whose content is never read (the engine's
    padding rows share one; what lands there is unspecified). Values are not bounds-checked (that would sync).
    """
    if q.dim() != 3 or q.shape != k.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"lightning_step wants q, k [N, H, K] and v [N, H, V]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    want = (q.shape[0], q.shape[1], q.shape[2], v.shape[2])
    if state_rows is not None:
        if state_rows.shape != (q.shape[0],) or state_rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"state_rows must be an integer tensor [N] = [{q.shape[0]}], got {state_rows.dtype} {tuple(state_rows.shape)}")
        if state_rows.device != state.device:
            raise ValueError(f"state_rows must be on the state's device {state.device}, got {state_rows.device}")
        want = (state.shape[0],) + want[1:]
    if state.dim() != 4 or tuple(state.shape) != want:
        raise ValueError(f"state must be [{'S' if state_rows is not None else 'N'}, H, K, V] = {want}, got {tuple(state.shape)}")
    if state.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"Lightning state must be float32 (or float64), got {state.dtype}")
    out_dtype = output_dtype or q.dtype
    return call("lightning_step", backend, q.device, q, k, v, slopes, scale, state, out_dtype, state_rows)


@register("lightning_step", "naive")
def _naive_lightning_step(q, k, v, slopes, scale, state, out_dtype, state_rows):
    return naive_lightning_step_rows(q, k, v, slopes, scale, state, state_rows).to(out_dtype)


@register("lightning_step", "triton")
def _triton_lightning_step(q, k, v, slopes, scale, state, out_dtype, state_rows):
    from sala.ops.lightning.recurrent import triton_lightning_step

    return triton_lightning_step(q, k, v, slopes, scale, state, out_dtype, state_rows)
