"""Pure-PyTorch InfLLM-v2 sparse attention (spec §5.3-5.6), one sequence at a time.

Pieces, in the order the sparse layer runs them::

    ck1, ck2 = compress_keys(K, ks, st), compress_keys(K, 4 ks, 4 st)        # mean-pooled windows
    scores   = stage1_block_scores(q, ck1, ck2, q_pos)                       # [Hkv, T, n1]
    topk_idx = select_blocks(scores, q_pos, L)                               # [Hkv, T, K_sel], -1 unused
    o        = block_sparse_attention(q, K, V, topk_idx, q_pos)              # [T, H, D]

Keys are indexed by absolute position (``k[j]`` is the key at position j), queries carry their positions in
``q_pos``. The query axis is processed in chunks so nothing T x L is materialised for long inputs.

Precision: everything runs in ``promote(q.dtype, float32)``; for bf16/fp16 inputs the stage-1 scores are
rounded to the input dtype before pooling (the official pooling kernel takes half-precision scores), so a
bf16 model follows the official rounding while fp32/fp64 models select at their own precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Bytes of fp32 scratch per query chunk; bounds memory at any length.
_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True, kw_only=True)
class InfLLMv2Params:
    """Sparse-attention geometry (spec §1.1 ``sparse_config``); the coarse tier uses 4x window and stride."""

    kernel_size: int = 32
    """Fine compression window (tokens)."""
    kernel_stride: int = 16
    """Fine compression stride (tokens)."""
    block_size: int = 64
    """Selection block (tokens)."""
    init_blocks: int = 1
    """Always-selected sink blocks at the start."""
    local_blocks: int = 32
    """Blocks before the query's own block that are always selected (window_size / block_size)."""
    topk: int = 64
    """Selected blocks beyond the local window; K_sel = topk + local_blocks."""

    @property
    def coarse_kernel_size(self) -> int:
        return 4 * self.kernel_size

    @property
    def coarse_kernel_stride(self) -> int:
        return 4 * self.kernel_stride

    def num_selected(self, num_keys: int) -> int:
        """K_sel = min(topk + local_blocks, number of blocks)."""
        return min(self.topk + self.local_blocks, math.ceil(num_keys / self.block_size))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def num_windows(length: int, kernel_size: int, kernel_stride: int) -> int:
    """Complete windows in ``length`` tokens: floor((L - ks) / st) + 1, or 0 if L < ks."""
    return 0 if length < kernel_size else (length - kernel_size) // kernel_stride + 1


def _query_chunk(num_heads: int, num_keys: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, 4 * num_heads * max(num_keys, 1)))


def naive_compress_keys(k: torch.Tensor, kernel_size: int, kernel_stride: int, start: int = 0) -> torch.Tensor:
    """Mean of each complete window ``k[st*i : st*i + ks]`` for i >= ``start``, in k's dtype.

    k: [L, Hkv, D] -> [n - start, Hkv, D] with n = num_windows(L, ks, st).
    """
    n = num_windows(k.shape[0], kernel_size, kernel_stride)
    if start >= n:
        return k.new_empty(0, *k.shape[1:])
    span = k[start * kernel_stride : (n - 1) * kernel_stride + kernel_size]
    windows = span.unfold(0, kernel_size, kernel_stride)  # [n - start, Hkv, D, ks]
    return windows.mean(dim=-1)


def stage1_output(q: torch.Tensor, ck1: torch.Tensor) -> tuple[torch.dtype, torch.Tensor]:
    """(compute dtype, zeroed stage-1 score tensor [Hkv, T, n1]) for q [T, H, D], ck1 [n1, Hkv, D]: scores are kept
    in q's dtype for bf16/fp16 inputs (as the official kernels round them before top-k), else the compute dtype."""
    dt = compute_dtype(q.dtype)
    out_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else dt
    return dt, torch.zeros(ck1.shape[1], q.shape[0], ck1.shape[0], dtype=out_dtype, device=q.device)


def naive_stage1_block_scores(
    q: torch.Tensor,
    ck1: torch.Tensor,
    ck2: torch.Tensor,
    q_pos: torch.Tensor,
    params: InfLLMv2Params,
    scale: float,
) -> torch.Tensor:
    """Group-summed fine-window probabilities normalised by the coarse-tier LSE (spec §5.4).

    score[g, t, i] = sum_{h in group g} exp(s q_th . ck1_i - LSE_th),  LSE_th = logsumexp_{j in V2(p)} s q_th . ck2_j
    with V1(p) = {i : st*i + ks - 1 <= p} and V2(p) likewise for the coarse tier (complete windows only).
    Entries outside V1(p), and queries with no visible coarse window, score 0.

    q: [T, H, D]; ck1: [n1, Hkv, D]; ck2: [n2, Hkv, D]; q_pos: [T] -> [Hkv, T, n1]
    (q's dtype for bf16/fp16 inputs, else the compute dtype).
    """
    dt, out = stage1_output(q, ck1)
    T, H, D = q.shape
    n1, Hkv = ck1.shape[0], ck1.shape[1]
    G = H // Hkv
    if n1 == 0 or T == 0:
        return out
    end1 = torch.arange(n1, device=q.device) * params.kernel_stride + params.kernel_size - 1  # last token of window
    end2 = torch.arange(ck2.shape[0], device=q.device) * params.coarse_kernel_stride + params.coarse_kernel_size - 1
    k1 = ck1.to(dt).repeat_interleave(G, dim=1)  # [n1, H, D]
    k2 = ck2.to(dt).repeat_interleave(G, dim=1)  # [n2, H, D]
    step = _query_chunk(H, n1 + ck2.shape[0])
    for a in range(0, T, step):
        qc = q[a : a + step].to(dt)  # [Tc, H, D]
        pos = q_pos[a : a + step]
        s2 = scale * torch.einsum("thd,nhd->htn", qc, k2)  # [H, Tc, n2]
        s2 = s2.masked_fill(~(end2[None, :] <= pos[:, None])[None], float("-inf"))
        lse = torch.logsumexp(s2, dim=-1, keepdim=True)  # [H, Tc, 1], -inf if nothing visible
        s1 = scale * torch.einsum("thd,nhd->htn", qc, k1)  # [H, Tc, n1]
        p = torch.exp(s1 - lse)
        visible = (end1[None, :] <= pos[:, None])[None] & torch.isfinite(lse)
        p = torch.where(visible, p, torch.zeros((), dtype=dt, device=q.device))
        out[:, a : a + step] = p.view(Hkv, G, -1, n1).sum(dim=1).to(out.dtype)
    return out


def naive_select_blocks(
    scores: torch.Tensor, q_pos: torch.Tensor, num_keys: int, params: InfLLMv2Params, k_sel: int | None = None
) -> torch.Tensor:
    """Max-pool window scores to blocks, force sink + local blocks, take top K_sel (spec §5.5).

    Block b pools the windows overlapping it (for ks = 2 st: i in [r b - 1, r b + r - 1], r = bs / st).
    Forced (+inf): b < init_blocks, or qb - local_blocks <= b <= qb with qb = p // bs. Ties break towards the
    lower block index. The K_sel indices are sorted ascending and any index > qb (future) becomes -1.

    scores: [Hkv, T, n1]; q_pos: [T]; num_keys: L -> topk_idx [Hkv, T, K_sel] int32 (``k_sel`` overrides K_sel;
    with fewer blocks than that, the result has one column per block).
    """
    Hkv, T, n1 = scores.shape
    bs, st = params.block_size, params.kernel_stride
    n_blocks = math.ceil(num_keys / bs)
    k_sel = params.num_selected(num_keys) if k_sel is None else k_sel
    r = bs // st
    left = (params.kernel_size - 1) // st  # windows starting before the block that still overlap it
    width = r + left
    need = n_blocks * r + left  # padded length so every block has a full pooling window
    dt = torch.promote_types(scores.dtype, torch.float32) if scores.dtype not in (torch.float16, torch.bfloat16) else scores.dtype
    padded = torch.zeros(Hkv, T, need + width, dtype=dt, device=scores.device)
    usable = min(n1, need - left)
    padded[..., left : left + usable] = scores[..., :usable].to(dt)
    pooled = padded.unfold(-1, width, r)[..., :n_blocks, :].amax(dim=-1)  # [Hkv, T, n_blocks]
    blk = torch.arange(n_blocks, device=scores.device)
    qb = (q_pos // bs)[:, None]  # [T, 1]
    forced = (blk[None, :] < params.init_blocks) | ((blk[None, :] >= qb - params.local_blocks) & (blk[None, :] <= qb))
    pooled = pooled.masked_fill(forced[None], float("inf"))
    order = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[..., :k_sel]
    idx = torch.sort(order, dim=-1).values
    idx = torch.where(idx > qb[None], torch.full_like(idx, -1), idx)
    return idx.to(torch.int32)


def naive_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_idx: torch.Tensor,
    q_pos: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Softmax attention over the tokens of each query's selected blocks, keys at positions <= p (spec §5.6).

    q: [T, H, D]; k, v: [L, Hkv, D]; topk_idx: [Hkv, T, K] int (-1 unused); q_pos: [T] -> o: [T, H, D] (q dtype).
    The H / Hkv query heads of a group share their KV head's block list.
    """
    dt = compute_dtype(q.dtype)
    T, H, D = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    G = H // Hkv
    n_blocks = math.ceil(L / block_size)
    kk = k.to(dt).repeat_interleave(G, dim=1)  # [L, H, D]
    vv = v.to(dt).repeat_interleave(G, dim=1)
    key_pos = torch.arange(L, device=q.device)
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    step = _query_chunk(H, L)
    for a in range(0, T, step):
        idx = topk_idx[:, a : a + step].long()  # [Hkv, Tc, K]
        Tc = idx.shape[1]
        sel = torch.zeros(Hkv, Tc, n_blocks + 1, dtype=torch.bool, device=q.device)
        sel.scatter_(-1, torch.where(idx < 0, n_blocks, idx), True)  # -1 lands in a spare slot
        tok = sel[..., :n_blocks].repeat_interleave(block_size, dim=-1)[..., :L]  # [Hkv, Tc, L]
        mask = tok.repeat_interleave(G, dim=0) & (key_pos[None, None, :] <= q_pos[a : a + step, None][None])
        s = scale * torch.einsum("thd,lhd->htl", q[a : a + step].to(dt), kk)  # [H, Tc, L]
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a query with nothing visible attends to nothing
        out[a : a + step] = torch.einsum("htl,lhd->thd", p, vv).to(q.dtype)
    return out


def naive_dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Causal GQA attention where the T queries are the last T of the L keys (cache + new tokens).

    q: [B, T, H, D]; k, v: [B, L, Hkv, D]; key_valid: [B, L] bool (False = left padding) or None
    -> o: [B, T, H, D] (q dtype). Query t sits at key index L - T + t and sees valid keys up to it.
    Padding queries (no valid key) return zeros.
    """
    dt = compute_dtype(q.dtype)
    B, T, H, D = q.shape
    L, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    kk = k.to(dt).repeat_interleave(G, dim=2)  # [B, L, H, D]
    vv = v.to(dt).repeat_interleave(G, dim=2)
    key_idx = torch.arange(L, device=q.device)
    out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    step = _query_chunk(B * H, L)
    for a in range(0, T, step):
        qi = L - T + torch.arange(a, min(a + step, T), device=q.device)  # key index of each query
        mask = (key_idx[None, :] <= qi[:, None])[None, None]  # [1, 1, Tc, L]
        if key_valid is not None:
            mask = mask & key_valid[:, None, None, :]
        s = scale * torch.einsum("bthd,blhd->bhtl", q[:, a : a + step].to(dt), kk)
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        out[:, a : a + step] = torch.einsum("bhtl,blhd->bthd", p, vv).to(q.dtype)
    return out
