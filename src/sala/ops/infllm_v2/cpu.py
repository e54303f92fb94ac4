"""InfLLM-v2 for CPUs: selection a query chunk at a time, attention over the gathered union of selected blocks.

Same contracts as the entries in :mod:`sala.ops.infllm_v2`; the reference (``naive.py``) is the oracle. The
reference materialises [H, T, L] scores against every key; here, per chunk of ``QUERY_CHUNK`` queries:

1. stage-1 scores and block selection on that chunk only ([Hkv, Tc, n1]), with the reference's arithmetic (the
   same bits) but no repeated keys and only the windows and blocks the chunk can see;
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
    num_windows,
    stage1_output,
)

QUERY_CHUNK = 64
"""Queries per selection/attention chunk: one block of consecutive queries shares its sink and local window."""


def cpu_stage1_block_scores(
    q: torch.Tensor,
    ck1: torch.Tensor,
    ck2: torch.Tensor,
    q_pos: torch.Tensor,
    params: InfLLMv2Params,
    scale: float,
) -> torch.Tensor:
    """The reference's stage-1 scores (same contract and, in tests, the same bits), computed leaner: one GEMM per
    KV head with its G query heads as rows (the reference repeats every compressed key G times per call), over
    only the windows some query of the call can see (a chunk early in a long sequence sees few of them).

    q: [T, H, D]; ck1: [n1, Hkv, D]; ck2: [n2, Hkv, D]; q_pos: [T] -> [Hkv, T, n1].
    """
    dt, out = stage1_output(q, ck1)
    (T, H, D), (n1, Hkv) = q.shape, ck1.shape[:2]
    G = H // Hkv
    if n1 == 0 or T == 0:
        return out
    last = int(q_pos.max()) + 1  # windows ending past every query are invisible to all: not computed
    v1 = min(n1, num_windows(last, params.kernel_size, params.kernel_stride))
    if v1 == 0 or num_windows(last, params.coarse_kernel_size, params.coarse_kernel_stride) == 0:
        return out  # no fine window, or no coarse window to normalise by: every score is 0
    # the normaliser runs over every coarse window, masked, as in the reference: a shorter logsumexp rounds
    # differently (n2 = n1 / 4, so this is the cheap quarter)
    n2 = ck2.shape[0]
    end1 = torch.arange(v1, device=q.device) * params.kernel_stride + params.kernel_size - 1
    end2 = torch.arange(n2, device=q.device) * params.coarse_kernel_stride + params.coarse_kernel_size - 1
    qg = q.to(dt).view(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(Hkv, G * T, D)  # rows (g, t) of each KV head
    s2 = torch.bmm(qg, ck2.to(dt).permute(1, 2, 0)).mul_(scale).view(Hkv, G, T, n2)
    s2.masked_fill_(~(end2[None, :] <= q_pos[:, None]), float("-inf"))
    lse = torch.logsumexp(s2, dim=-1, keepdim=True)  # [Hkv, G, T, 1], -inf if nothing visible
    s1 = torch.bmm(qg, ck1[:v1].to(dt).permute(1, 2, 0)).mul_(scale).view(Hkv, G, T, v1)
    s1.sub_(lse).exp_()
    s1.masked_fill_(~(end1[None, :] <= q_pos[:, None]) | ~torch.isfinite(lse), 0.0)
    out[..., :v1] = s1.sum(dim=1).to(out.dtype)
    return out


def cpu_select_blocks(scores: torch.Tensor, q_pos: torch.Tensor, num_keys: int, params: InfLLMv2Params) -> torch.Tensor:
    """The reference's selection (identical result) ranking only the blocks some query of the call can see.

    Blocks past the last query's block score 0 and, having the highest indices, lose every tie to the blocks
    before them; any of them the reference picks is future for every query and becomes -1. So ranking the
    visible blocks and padding with -1 gives the same [Hkv, T, K_sel] table, for a fraction of the sort when the
    call's queries sit early in a long sequence.
    """
    bs = params.block_size
    k_sel = params.num_selected(num_keys)
    visible = min(math.ceil(num_keys / bs), int(q_pos.max()) // bs + 1) if q_pos.numel() else 0
    windows = min(scores.shape[-1], visible * (bs // params.kernel_stride))  # what pooling those blocks reads
    idx = naive_select_blocks(scores[..., :windows], q_pos, visible * bs, params, k_sel=k_sel)
    if idx.shape[-1] < k_sel:
        idx = F.pad(idx, (0, k_sel - idx.shape[-1]), value=-1)
    return idx


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


def _block_rows(blocks: torch.Tensor, block_size: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions and K/V rows of each KV head's blocks. blocks: [Hkv, n] (values >= 0) -> tok [Hkv, n * bs]
    (may run past L in a partial last block) and rows [Hkv * n * bs]: row t * Hkv + h of k viewed as [L * Hkv, D]
    is k[t, h], so one index_select per tensor gathers every head's blocks (positions past L read row L - 1)."""
    Hkv = blocks.shape[0]
    tok = (blocks[:, :, None] * block_size + torch.arange(block_size, device=blocks.device)).flatten(1)
    rows = (tok.clamp(max=L - 1) * Hkv + torch.arange(Hkv, device=blocks.device)[:, None]).flatten()
    return tok, rows


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
    if q.shape[0] == 1:
        return _one_query_attention(q, k, v, topk_idx, q_pos, block_size, scale)
    Tc, H, D = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    G = H // Hkv
    blocks, used, picked = _head_unions(topk_idx, math.ceil(L / block_size))  # [Hkv, U], [Hkv, U], [Hkv, Tc, U]
    U = blocks.shape[1]
    tok, rows = _block_rows(blocks, block_size, L)  # [Hkv, Lu], [Hkv * Lu]
    # The additive mask is built per block and only the blocks that end after the chunk's first query (its own
    # block, a partial last block) get token-level causality: a token-level build of the whole [Hkv, Tc, Lu]
    # mask cost ~3 ms a chunk at 32K. A float mask, because SDPA converts a boolean one on every call (~40% more).
    allowed = picked & used[:, None, :]  # [Hkv, Tc, U]
    neg = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    bias = torch.where(allowed, torch.zeros((), dtype=q.dtype, device=q.device), neg)
    bias = bias[..., None].expand(Hkv, Tc, U, block_size).contiguous()  # [Hkv, Tc, U, bs]
    edge = blocks * block_size + block_size - 1 > q_pos.min()  # [Hkv, U]: some token may lie after some query
    seen = (allowed & ~edge[:, None, :]).any(dim=-1)  # [Hkv, Tc] a whole visible block selected
    if bool(edge.any()):
        eh, eu = edge.nonzero(as_tuple=True)  # a few (head, union slot) pairs
        visible = tok.view(Hkv, U, block_size)[eh, eu][:, None, :] <= q_pos[None, :, None]  # [E, Tc, bs]
        visible &= allowed[eh, :, eu][..., None]
        bias[eh, :, eu] = bias[eh, :, eu].masked_fill(~visible, float("-inf"))
        seen.index_put_((eh,), visible.any(dim=-1), accumulate=True)  # any visible edge token counts
    bias = bias.view(Hkv, Tc, U * block_size)
    blind = ~seen  # [Hkv, Tc]
    any_blind = bool(blind.any())
    if any_blind:
        bias[..., 0] = bias[..., 0].masked_fill(blind, 0.0)  # SDPA would give NaN for an all -inf row; zeroed below
    kg, vg = (x.reshape(L * Hkv, D).index_select(0, rows).view(Hkv, -1, D) for x in (k, v))  # [Hkv, Lu, D]
    qh = q.transpose(0, 1).reshape(Hkv, G, Tc, D)  # query heads h*G .. h*G+G-1 share KV head h
    # enable_gqa keeps SDPA on its flash CPU kernel (1 KV head vs G query heads would otherwise take the math path)
    o = F.scaled_dot_product_attention(qh, kg[:, None].to(q.dtype), vg[:, None].to(q.dtype), attn_mask=bias[:, None],
                                       scale=scale, enable_gqa=True)  # [Hkv, G, Tc, D]
    if any_blind:
        o = o.masked_fill(blind[:, None, :, None], 0.0)
    return o.reshape(H, Tc, D).transpose(0, 1)


def _one_query_attention(q, k, v, topk_idx, q_pos, block_size: int, scale: float) -> torch.Tensor:
    """A decode step: one query reads its own selected blocks per KV head. No union and no mask tensor to build,
    a batched GEMV for the scores and ``embedding_bag`` for the V sums instead of SDPA's set-up (a sparse layer's
    decode attention at 32K, SmolLM2 geometry: 1.78 -> 1.43 ms).
    q: [1, H, D]; k, v: [L, Hkv, D]; topk_idx: [Hkv, 1, K]; q_pos: [1] -> o: [1, H, D]."""
    _, H, D = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    idx = torch.sort(topk_idx[:, 0].long(), dim=-1).values  # [Hkv, K], -1 = unused
    use = idx >= 0
    use[:, 1:] &= idx[:, 1:] != idx[:, :-1]  # a block listed twice is still attended once
    tok, rows = _block_rows(idx.clamp(min=0), block_size, L)
    valid = use.repeat_interleave(block_size, dim=-1) & (tok <= q_pos[0])  # [Hkv, K * bs]; pos < L
    dt = torch.promote_types(q.dtype, torch.float32)  # scores and softmax in fp32 (fp64 for fp64), as SDPA does
    G = H // Hkv
    kg = k.reshape(L * Hkv, D).index_select(0, rows).view(Hkv, -1, D).to(dt)
    s = torch.bmm(q[0].view(Hkv, G, D).to(dt), kg.transpose(1, 2)).mul_(scale)  # [Hkv, G, K * bs]
    s.masked_fill_(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a head with nothing visible: zeros, as in the reference
    if v.dtype == dt:  # p-weighted sums of V rows without gathering them first (half the time of gather + bmm)
        bags = rows.view(Hkv, 1, -1).expand(Hkv, G, -1).reshape(-1)
        offsets = torch.arange(0, bags.numel(), rows.numel() // Hkv, device=q.device)
        o = F.embedding_bag(bags, v.reshape(L * Hkv, D), offsets, mode="sum", per_sample_weights=p.reshape(-1))
    else:
        o = torch.bmm(p, v.reshape(L * Hkv, D).index_select(0, rows).view(Hkv, -1, D).to(dt))
    return o.reshape(1, H, D).to(q.dtype)


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
        scores = cpu_stage1_block_scores(q[a:b], ck1, ck2, q_pos[a:b], params, scale)
        return cpu_select_blocks(scores, q_pos[a:b], k.shape[0], params)

    return _attend_by_chunks(q, k, v, q_pos, params.block_size, scale, select)
