"""InfLLM-v2 for CPUs: selection a query chunk at a time, attention over the gathered union of selected blocks.

Same contracts as the entries in :mod:`sala.ops.infllm_v2`; the reference (``naive.py``) is the oracle. The
reference materialises [H, T, L] scores against every key; here, per chunk of ``QUERY_CHUNK`` queries:

1. stage-1 scores and block selection with the reference functions on that chunk only ([Hkv, Tc, n1]);
2. per KV head, the union of the blocks any query of the chunk selected, gathered once: [Hkv, Lu, D];
3. one SDPA call over the gathered keys (KV heads as the batch, each with its G query heads) with a boolean
   mask [Hkv, Tc, Lu] (the query's own selection and causality).

Neighbouring queries share their sink and local blocks and, on real text, much of their top-k, so the union is
a fraction of the cache; where selections have no locality at all (random weights) the union is every block and a
chunk costs what masked dense attention costs: never more than dense, never O(T L) memory. A one-token decode
step is the same code with Tc = 1: it reads K_sel blocks per KV head, not the cache. Dense attention is torch SDPA (``dense.py``), which runs on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sala.ops.infllm_v2.naive import (
    InfLLMv2Params,
    naive_select_blocks,
    naive_stage1_block_scores,
)

QUERY_CHUNK = 64
"""Queries per selection/attention chunk: one block of consecutive queries shares its sink and local window."""


def _head_unions(topk_idx: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per KV head, the blocks any query of the chunk selected, padded to the longest head's count.

    topk_idx [Hkv, Tc, K] (-1 unused) -> blocks [Hkv, U] ascending (padding repeats a valid id), used [Hkv, U]
    bool (False on padding), picked [Hkv, Tc, U] bool (query t selected blocks[h, u]).
    """
    Hkv, Tc, _ = topk_idx.shape
    idx = topk_idx.long()
    sel = torch.zeros(Hkv, Tc, n_blocks + 1, dtype=torch.bool, device=topk_idx.device)
    sel.scatter_(-1, torch.where(idx < 0, n_blocks, idx), True)  # -1 lands in a spare column
    sel = sel[..., :n_blocks]
    any_q = sel.any(dim=1)  # [Hkv, n_blocks]
    counts = any_q.sum(dim=-1)  # [Hkv]
    U = max(1, int(counts.max()))
    # stable sort of "not selected" puts each head's selected blocks first, in ascending order
    blocks = torch.sort((~any_q).to(torch.uint8), dim=-1, stable=True).indices[:, :U]  # [Hkv, U]
    used = torch.arange(U, device=sel.device)[None, :] < counts[:, None]
    picked = sel.gather(-1, blocks[:, None, :].expand(Hkv, Tc, U)) & used[:, None, :]
    return blocks, used, picked


def gathered_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_idx: torch.Tensor,
    q_pos: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Stage 2 for one query chunk. q: [Tc, H, D]; k, v: [L, Hkv, D]; topk_idx: [Hkv, Tc, K]; q_pos: [Tc]
    -> o: [Tc, H, D] in q's dtype. A query attends to keys at positions <= its own inside its selected blocks; one
    with nothing visible gets zeros, as in the reference.

    Each KV head gathers its own union of blocks ([Hkv, Lu, D], Lu = U * bs), so a decode step reads K_sel blocks
    per head; one SDPA call then runs with the KV heads as the batch and their G query heads as heads.
    """
    Tc, H, D = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    G = H // Hkv
    blocks, used, picked = _head_unions(topk_idx, math.ceil(L / block_size))  # [Hkv, U], [Hkv, U], [Hkv, Tc, U]
    tok = (blocks[:, :, None] * block_size + torch.arange(block_size, device=q.device)).flatten(1)  # [Hkv, Lu]
    exists = (tok < L) & used.repeat_interleave(block_size, dim=-1)
    mask = picked.repeat_interleave(block_size, dim=-1) & exists[:, None, :]  # [Hkv, Tc, Lu]
    mask &= tok[:, None, :] <= q_pos[None, :, None]
    blind = ~mask.any(dim=-1)  # [Hkv, Tc]
    any_blind = bool(blind.any())
    if any_blind:
        mask[..., 0] |= blind  # SDPA would give NaN for an all-False row; those rows are zeroed below
    # row t * Hkv + h of k viewed as [L * Hkv, D] is k[t, h]: one index_select (row copies) per tensor
    rows = (tok.clamp(max=L - 1) * Hkv + torch.arange(Hkv, device=q.device)[:, None]).flatten()
    kg, vg = (x.reshape(L * Hkv, D).index_select(0, rows).view(Hkv, -1, D) for x in (k, v))  # [Hkv, Lu, D]
    qh = q.transpose(0, 1).reshape(Hkv, G, Tc, D)  # query heads h*G .. h*G+G-1 share KV head h
    # enable_gqa keeps SDPA on its flash CPU kernel (1 KV head vs G query heads would otherwise take the math path)
    o = F.scaled_dot_product_attention(qh, kg[:, None].to(q.dtype), vg[:, None].to(q.dtype), attn_mask=mask[:, None],
                                       scale=scale, enable_gqa=True)  # [Hkv, G, Tc, D]
    if any_blind:
        o = o.masked_fill(blind[:, None, :, None], 0.0)
    return o.reshape(H, Tc, D).transpose(0, 1)


def _attend_by_chunks(q, k, v, q_pos, block_size: int, scale: float, select) -> torch.Tensor:
    """Run :func:`gathered_block_attention` a chunk of ``QUERY_CHUNK`` queries at a time; ``select(a, b)`` gives
    the block lists [Hkv, b - a, K] of queries a..b-1."""
    k, v = k.contiguous(), v.contiguous()  # once, not per chunk (the gather views them as rows)
    out = torch.empty_like(q)
    for a in range(0, q.shape[0], QUERY_CHUNK):
        b = min(a + QUERY_CHUNK, q.shape[0])
        out[a:b] = gathered_block_attention(q[a:b], k, v, select(a, b), q_pos[a:b], block_size, scale)
    return out


def cpu_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_idx: torch.Tensor,
    q_pos: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Stage 2 over all queries, a chunk at a time. Shapes as :func:`gathered_block_attention` with T queries."""
    return _attend_by_chunks(q, k, v, q_pos, block_size, scale, lambda a, b: topk_idx[:, a:b])


def cpu_infllm_v2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ck1: torch.Tensor,
    ck2: torch.Tensor,
    q_pos: torch.Tensor,
    params: InfLLMv2Params,
    scale: float,
) -> torch.Tensor:
    """Score, select and attend, one query chunk at a time (nothing [T, L] is built).

    q: [T, H, D]; k, v: [L, Hkv, D]; ck1: [n1, Hkv, D]; ck2: [n2, Hkv, D]; q_pos: [T] -> o: [T, H, D] (q dtype).
    """
    def select(a: int, b: int) -> torch.Tensor:
        scores = naive_stage1_block_scores(q[a:b], ck1, ck2, q_pos[a:b], params, scale)
        return naive_select_blocks(scores, q_pos[a:b], k.shape[0], params)

    return _attend_by_chunks(q, k, v, q_pos, params.block_size, scale, select)
