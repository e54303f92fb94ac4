"""Pure-PyTorch Lightning attention (spec §4.2-4.3): the oracle forms and the CPU default path.

Lightning is linear attention with a fixed per-head decay gamma_h = exp(-slope_h) and no normaliser::

    S_t = gamma_h * S_{t-1} + k_t^T v_t        S: [K, V], fp32 (fp64 when inputs are fp64)
    o_t = scale * q_t S_t

Everything here runs at ``compute_dtype(q) = promote(q.dtype, float32)`` so that an fp64 model is exact.
No Triton, no other library's kernels.
"""

from __future__ import annotations

import math

import torch


def lightning_decay_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slope list used as Lightning decay rates (spec §4.2), float64 ``[num_heads]``.

    Power of two n: ``slopes[i] = (2^(-8/n))^(i+1)``. Otherwise, with c the largest power of two below n:
    ``slopes(c) ++ slopes(2c)[0::2][: n - c]`` (not monotonic). The released model (n=32) gets 2^(-(h+1)/4).
    The slopes do not depend on the layer (no MiniMax layer factor).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs (spec §7: fp32 recurrence)."""
    return torch.promote_types(dtype, torch.float32)


def _start_state(initial_state: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A private working copy of the incoming state (zeros when there is none)."""
    if initial_state is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return initial_state.to(dtype).clone()


def naive_parallel_lightning(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, scale: float
) -> torch.Tensor:
    """Quadratic oracle ``o_t = scale * sum_{j<=t} gamma^(t-j) (q_t . k_j) v_j`` from a zero state.

    q, k: [B, T, H, K]; v: [B, T, H, V]; slopes: [H] -> o: [B, T, H, V] in the compute dtype.
    Materialises T x T: tests only.
    """
    dt = compute_dtype(q.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    T = q.shape[1]
    idx = torch.arange(T, device=q.device)
    dist = (idx[:, None] - idx[None, :]).to(dt)  # [T, T], t - j
    g = -slopes.to(device=q.device, dtype=dt)  # [H] natural-log decay
    decay = torch.exp(g[:, None, None] * dist.clamp(min=0)) * (dist >= 0)  # [H, T, T]
    scores = torch.einsum("bthk,bshk->bhts", q, k) * decay  # [B, H, T, T]
    return scale * torch.einsum("bhts,bshv->bthv", scores, v)


def naive_recurrent_lightning(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence (the decode semantics).

    q, k: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] or None (zeros)
    -> o: [B, T, H, V] (compute dtype), final_state: [B, H, K, V] (compute dtype).
    """
    dt = compute_dtype(q.dtype)
    B, T, H, K = q.shape
    V = v.shape[-1]
    state = _start_state(initial_state, (B, H, K, V), dt, q.device)
    gamma = torch.exp(-slopes.to(device=q.device, dtype=dt))[None, :, None, None]  # [1, H, 1, 1]
    out = torch.empty(B, T, H, V, dtype=dt, device=q.device)
    for t in range(T):
        kt, vt, qt = k[:, t].to(dt), v[:, t].to(dt), q[:, t].to(dt)  # [B, H, K|V]
        state = gamma * state + kt[..., :, None] * vt[..., None, :]
        out[:, t] = scale * torch.einsum("bhk,bhkv->bhv", qt, state)
    return out, state


def naive_chunk_lightning(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked form (spec §4.3); memory O(B H (C^2 + K V)) whatever T is.

    Within a chunk of length C with local index i and incoming state S0::

        o_i   = scale * gamma^(i+1) q_i S0 + scale * sum_{j<=i} gamma^(i-j) (q_i . k_j) v_j
        S_new = gamma^C S0 + sum_j gamma^(C-1-j) k_j^T v_j

    q, k: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V] or None
    -> o: [B, T, H, V], final_state: [B, H, K, V], both in the compute dtype.
    """
    dt = compute_dtype(q.dtype)
    B, T, H, K = q.shape
    V = v.shape[-1]
    state = _start_state(initial_state, (B, H, K, V), dt, q.device)
    g = -slopes.to(device=q.device, dtype=dt)  # [H]
    out = torch.empty(B, T, H, V, dtype=dt, device=q.device)
    for start in range(0, T, chunk_size):
        C = min(chunk_size, T - start)
        qc = q[:, start : start + C].to(dt).transpose(1, 2)  # [B, H, C, K]
        kc = k[:, start : start + C].to(dt).transpose(1, 2)  # [B, H, C, K]
        vc = v[:, start : start + C].to(dt).transpose(1, 2)  # [B, H, C, V]
        i = torch.arange(C, device=q.device, dtype=dt)
        q_decay = torch.exp(g[:, None] * (i + 1))  # [H, C]
        k_decay = torch.exp(g[:, None] * (C - 1 - i))  # [H, C]
        dist = i[:, None] - i[None, :]  # [C, C]
        intra = torch.exp(g[:, None, None] * dist.clamp(min=0)) * (dist >= 0)  # [H, C, C]
        o_inter = (qc * q_decay[None, :, :, None]) @ state  # [B, H, C, V]
        o_intra = ((qc @ kc.transpose(-1, -2)) * intra) @ vc  # [B, H, C, V]
        out[:, start : start + C] = (scale * (o_inter + o_intra)).transpose(1, 2)
        state = torch.exp(g * C)[None, :, None, None] * state + (kc * k_decay[None, :, :, None]).transpose(-1, -2) @ vc
    return out, state


def naive_lightning_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, scale: float, state: torch.Tensor
) -> torch.Tensor:
    """One decode step for a batch of sequences, updating ``state`` in place.

    q, k: [N, H, K]; v: [N, H, V]; state: [N, H, K, V] (fp32/fp64, written in place) -> o: [N, H, V] (state dtype).
    """
    dt = state.dtype
    gamma = torch.exp(-slopes.to(device=q.device, dtype=dt))[None, :, None, None]
    state.mul_(gamma).add_(k.to(dt)[..., :, None] * v.to(dt)[..., None, :])
    return scale * torch.einsum("nhk,nhkv->nhv", q.to(dt), state)


def naive_lightning_step_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, scale: float, state: torch.Tensor,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """``naive_lightning_step`` on ``state[rows]`` ([S, H, K, V] indexed by ``rows`` [N]), written back in place;
    ``rows=None`` is the plain step on state [N, H, K, V]. Rows must be distinct except for a scratch row whose
    content is never read (the engine's padding rows share one)."""
    if rows is None:
        return naive_lightning_step(q, k, v, slopes, scale, state)
    rows = rows.long()  # index_copy_ takes int64 only
    picked = state.index_select(0, rows)
    o = naive_lightning_step(q, k, v, slopes, scale, picked)
    state.index_copy_(0, rows, picked)
    return o
