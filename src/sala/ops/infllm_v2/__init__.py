"""InfLLM-v2 entries (spec §5): key compression, stage-1 scoring, block selection, block-sparse attention,
plus the dense causal GQA attention the sparse layers use below ``dense_len``.

Sparse entries take one sequence (no batch axis): q [T, H, D], k/v [L, Hkv, D] with k[j] at position j, and
``q_pos`` [T] the absolute positions of the queries. ``infllm_v2_attention`` chains the stages.
"""

from __future__ import annotations

import torch

from sala.ops.common.dispatch import call, register
from sala.utils.env import flash_varlen
from sala.ops.infllm_v2.naive import (
    InfLLMv2Params,
    naive_block_sparse_attention,
    naive_compress_keys,
    naive_dense_causal_attention,
    naive_select_blocks,
    naive_stage1_block_scores,
    num_windows,
)

__all__ = [
    "InfLLMv2Params",
    "append_compressed_keys",
    "decode_attention_batch",
    "block_sparse_attention",
    "compress_keys",
    "dense_causal_attention",
    "infllm_v2_attention",
    "num_windows",
    "precompile_selection",
    "select_blocks",
    "stage1_block_scores",
    "varlen_causal_attention",
]


def _check_seq(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, first_pos: int | None = None
) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"sparse ops take one sequence: q [T, H, D], k/v [L, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"k and v must both be [L, Hkv, D] with q's D; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if q_pos.shape != (q.shape[0],):
        raise ValueError(f"q_pos must be [T={q.shape[0]}], got {tuple(q_pos.shape)}")
    # with the caller's ``first_pos`` (positions first_pos .. first_pos + T - 1) the check needs no host sync
    last = (first_pos + q.shape[0] - 1) if first_pos is not None else (int(q_pos.max()) if q.shape[0] else -1)
    if last >= k.shape[0]:
        raise ValueError(f"query position {last} has no key: only {k.shape[0]} keys given")


def compress_keys(
    k: torch.Tensor, kernel_size: int, kernel_stride: int, start: int = 0, backend: str = "auto"
) -> torch.Tensor:
    """Mean-pooled complete windows of k, from window index ``start`` on. k: [L, Hkv, D] -> [n - start, Hkv, D]."""
    if k.dim() != 3:
        raise ValueError(f"compress_keys takes k [L, Hkv, D], got {tuple(k.shape)}")
    return call("compress_keys", backend, k.device, k, kernel_size, kernel_stride, start)


register("compress_keys", "naive", naive_compress_keys)


@register("compress_keys", "triton")
def _triton_compress_keys(k, kernel_size, kernel_stride, start):
    from sala.ops.infllm_v2.compress import triton_compress_keys

    return triton_compress_keys(k, kernel_size, kernel_stride, start)


def stage1_block_scores(
    q: torch.Tensor,
    ck1: torch.Tensor,
    ck2: torch.Tensor,
    q_pos: torch.Tensor,
    params: InfLLMv2Params,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Stage-1 scores. q: [T, H, D]; ck1: [n1, Hkv, D]; ck2: [n2, Hkv, D]; q_pos: [T] -> [Hkv, T, n1]."""
    return call("stage1_block_scores", backend, q.device, q, ck1, ck2, q_pos, params, scale)


register("stage1_block_scores", "naive", naive_stage1_block_scores)


@register("stage1_block_scores", "cpu")
def _cpu_stage1_block_scores(q, ck1, ck2, q_pos, params, scale):
    from sala.ops.infllm_v2.cpu import cpu_stage1_block_scores

    return cpu_stage1_block_scores(q, ck1, ck2, q_pos, params, scale)


@register("stage1_block_scores", "triton")
def _triton_stage1_block_scores(q, ck1, ck2, q_pos, params, scale):
    from sala.ops.infllm_v2.topk import triton_stage1_block_scores

    return triton_stage1_block_scores(q, ck1, ck2, q_pos, params, scale)


def select_blocks(
    scores: torch.Tensor, q_pos: torch.Tensor, num_keys: int, params: InfLLMv2Params, backend: str = "auto"
) -> torch.Tensor:
    """Pool, force and top-k. scores: [Hkv, T, n1]; q_pos: [T] -> topk_idx [Hkv, T, K_sel] int32 (-1 unused)."""
    return call("select_blocks", backend, scores.device, scores, q_pos, num_keys, params)


register("select_blocks", "naive", naive_select_blocks)


@register("select_blocks", "cpu")
def _cpu_select_blocks(scores, q_pos, num_keys, params):
    from sala.ops.infllm_v2.cpu import cpu_select_blocks

    return cpu_select_blocks(scores, q_pos, num_keys, params)


@register("select_blocks", "triton")
def _triton_select_blocks(scores, q_pos, num_keys, params):
    from sala.ops.infllm_v2.topk import triton_select_blocks

    return triton_select_blocks(scores, q_pos, num_keys, params)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk_idx: torch.Tensor,
    q_pos: torch.Tensor,
    block_size: int,
    scale: float,
    backend: str = "auto",
    first_pos: int | None = None,
) -> torch.Tensor:
    """Stage 2. q: [T, H, D]; k, v: [L, Hkv, D]; topk_idx: [Hkv, T, K] -> o: [T, H, D] (q dtype).
    ``first_pos``: optional promise that q_pos = first_pos + arange(T) (skips a host sync)."""
    _check_seq(q, k, v, q_pos, first_pos)
    return call("block_sparse_attention", backend, q.device, q, k, v, topk_idx, q_pos, block_size, scale)


register("block_sparse_attention", "naive", naive_block_sparse_attention)


@register("block_sparse_attention", "cpu")
def _cpu_block_sparse_attention(q, k, v, topk_idx, q_pos, block_size, scale):
    from sala.ops.infllm_v2.cpu import cpu_block_sparse_attention

    return cpu_block_sparse_attention(q, k, v, topk_idx, q_pos, block_size, scale)


@register("block_sparse_attention", "triton")
def _triton_block_sparse_attention(q, k, v, topk_idx, q_pos, block_size, scale):
    from sala.ops.infllm_v2.sparse_attn import triton_block_sparse_attention

    return triton_block_sparse_attention(q, k, v, topk_idx, q_pos, block_size, scale)


def infllm_v2_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ck1: torch.Tensor,
    ck2: torch.Tensor,
    q_pos: torch.Tensor,
    params: InfLLMv2Params,
    scale: float,
    backend: str = "auto",
    first_pos: int | None = None,
) -> torch.Tensor:
    """Full InfLLM-v2 path for one sequence: score, select, attend.

    q: [T, H, D]; k, v: [L, Hkv, D] (all keys so far); ck1/ck2: compressions of k (see ``compress_keys``);
    q_pos: [T] -> o: [T, H, D] in q's dtype. ``first_pos``: optional promise that q_pos = first_pos + arange(T),
    which lets the call run without any host sync (decode under an eager loop).
    """
    _check_seq(q, k, v, q_pos, first_pos)
    T = q.shape[0]
    if T == 0:
        return torch.empty_like(q)
    if first_pos is None:
        first, last = q_pos[[0, -1]].tolist()
        consecutive = last - first == T - 1
    else:
        first, consecutive = first_pos, True
    # A query whose own block index is below topk + local_blocks selects every past block (spec §5.5.5), so
    # plain causal attention gives the same result for that prefix of the (consecutive) query positions.
    easy = min(max(0, (params.topk + params.local_blocks) * params.block_size - first), T)
    if easy and consecutive:
        head = dense_causal_attention(q[None, :easy], k[None, : first + easy], v[None, : first + easy], None, scale,
                                      backend)[0]
        if easy == T:
            return head
        tail = infllm_v2_attention(q[easy:], k, v, ck1, ck2, q_pos[easy:], params, scale, backend, first + easy)
        return torch.cat([head, tail], dim=0)
    # the sparse part: op "infllm_v2_attention" covers selection and attention, past the dense prefix
    return call("infllm_v2_attention", backend, q.device, q, k, v, ck1, ck2, q_pos, params, scale,
                first if consecutive else None)


@register("infllm_v2_attention", "naive", takes_backend=True)
def _select_then_attend(q, k, v, ck1, ck2, q_pos, params, scale, first_pos, backend):
    """Stage-1 scores, block selection, block-sparse attention: each entry on ``backend``."""
    topk_idx = select_blocks(stage1_block_scores(q, ck1, ck2, q_pos, params, scale, backend), q_pos, k.shape[0],
                             params, backend)
    return block_sparse_attention(q, k, v, topk_idx, q_pos, params.block_size, scale, backend, first_pos)


@register("infllm_v2_attention", "cpu")
def _cpu_infllm_v2_attention(q, k, v, ck1, ck2, q_pos, params, scale, first_pos):
    """Selection and attention a query chunk at a time."""
    from sala.ops.infllm_v2.cpu import cpu_infllm_v2_attention

    return cpu_infllm_v2_attention(q, k, v, ck1, ck2, q_pos, params, scale)


@register("infllm_v2_attention", "triton", takes_backend=True)
def _triton_infllm_v2_attention(q, k, v, ck1, ck2, q_pos, params, scale, first_pos, backend):
    """Scores and top-k in one kernel (no [Hkv, T, n1] score tensor), then the block-sparse entry."""
    from sala.ops.infllm_v2.topk import triton_select_from_queries

    topk_idx = triton_select_from_queries(q, ck1, ck2, q_pos, k.shape[0], params, scale)
    return block_sparse_attention(q, k, v, topk_idx, q_pos, params.block_size, scale, backend, first_pos)


def precompile_selection(max_keys: int, params: InfLLMv2Params, kv_heads: int, dtype: torch.dtype,
                         device: torch.device, backend: str = "auto") -> list[int]:
    """Compile, ahead of the first long request, the kernel variants a prefill up to ``max_keys`` keys needs
    (Triton: one per power-of-two class of key blocks, see ``topk.triton_precompile_selection``); -> the classes
    compiled, [] where nothing is compiled (the naive and cpu backends)."""
    if max_keys < 1 or kv_heads < 1:
        raise ValueError(f"precompile_selection wants max_keys >= 1 and kv_heads >= 1; got {max_keys}, {kv_heads}")
    return call("precompile_selection", backend, device, max_keys, params, kv_heads, dtype, device)


register("precompile_selection", "naive", lambda *args: [])


@register("precompile_selection", "triton")
def _triton_precompile_selection(max_keys, params, kv_heads, dtype, device):
    from sala.ops.infllm_v2.topk import triton_precompile_selection

    return triton_precompile_selection(max_keys, params, kv_heads, dtype, device)


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal GQA attention of the last T positions over L keys.

    q: [B, T, H, D]; k, v: [B, L, Hkv, D]; key_valid: [B, L] bool or None -> o: [B, T, H, D] (q dtype).
    ``triton`` (CUDA) and ``cpu`` run torch SDPA (cuDNN/flash on GPUs, the flash CPU kernel on CPUs); ``naive`` the
    chunked reference.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"dense attention wants q [B, T, H, D], k/v [B, L, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"need at least as many keys ({k.shape[1]}) as queries ({q.shape[1]})")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    return call("dense_causal_attention", backend, q.device, q, k, v, key_valid, scale)


def _sdpa_dense_causal_attention(q, k, v, key_valid, scale):
    from sala.ops.infllm_v2.dense import sdpa_dense_causal_attention

    return sdpa_dense_causal_attention(q, k, v, key_valid, scale)


register("dense_causal_attention", "naive", naive_dense_causal_attention)
register("dense_causal_attention", "cpu", _sdpa_dense_causal_attention)
register("dense_causal_attention", "triton", _sdpa_dense_causal_attention)


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    bounds: list[int],
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal GQA attention inside each of S packed documents (none attends across a boundary).

    q: [N, H, D]; k, v: [N, Hkv, D]; cu_seqlens: [S+1] int (0 .. N) on q's device; ``bounds``: the same values as
    a host list (the caller has them; no host sync here) -> o: [N, H, D] (q dtype). ``triton`` (CUDA, 16-bit) runs
    one flash varlen launch; the others attend document by document (``naive``: the reference).
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"varlen attention wants q [N, H, D], k/v [N, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"bounds must rise strictly from 0 to N={q.shape[0]}, got {bounds[:8]}")
    if cu_seqlens.shape != (len(bounds),):
        raise ValueError(f"cu_seqlens {tuple(cu_seqlens.shape)} and bounds ({len(bounds)} values) disagree")
    return call("varlen_causal_attention", backend, q.device, q, k, v, cu_seqlens, bounds, scale)


def _by_document(dense):
    def attend(q, k, v, cu_seqlens, bounds, scale):
        return torch.cat([dense(q[None, a:b], k[None, a:b], v[None, a:b], None, scale)[0]
                          for a, b in zip(bounds, bounds[1:])])
    return attend


def _flash_varlen(q, k, v, cu_seqlens, bounds, scale):
    """One flash launch for 16-bit CUDA tensors of one dtype; other inputs attend document by document (SDPA)."""
    from sala.ops.infllm_v2.dense import flash_varlen_causal_attention

    if flash_varlen() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype == v.dtype:
        return flash_varlen_causal_attention(q, k, v, cu_seqlens, bounds, scale)
    return _sdpa_by_document(q, k, v, cu_seqlens, bounds, scale)


_sdpa_by_document = _by_document(_sdpa_dense_causal_attention)
register("varlen_causal_attention", "naive", _by_document(naive_dense_causal_attention))
register("varlen_causal_attention", "cpu", _sdpa_by_document)
register("varlen_causal_attention", "triton", _flash_varlen)


def append_compressed_keys(
    keys: torch.Tensor,
    ck1: torch.Tensor,
    ck2: torch.Tensor,
    slot: torch.Tensor,
    pos: torch.Tensor,
    kernel_size: int,
    kernel_stride: int,
    backend: str = "auto",
) -> None:
    """Decode-time compressed-key maintenance, in place: after row t's key was written at keys[slot[t], pos[t]],
    store the fine (ks, st) and coarse (4 ks, 4 st) windows that token completed, if any.

    keys: [S, C, Hkv, D]; ck1: [S, n1, Hkv, D]; ck2: [S, n2, Hkv, D]; slot, pos: [N] int. The Triton path is
    graph-safe (no host sync); the reference loops over rows on the host.
    """
    _check_slot_caches(keys, None, ck1, ck2, slot, pos)
    return call("append_compressed_keys", backend, keys.device, keys, ck1, ck2, slot, pos, kernel_size, kernel_stride)


@register("append_compressed_keys", "triton")
def _triton_append_compressed_keys(keys, ck1, ck2, slot, pos, kernel_size, kernel_stride):
    from sala.ops.infllm_v2.compress import triton_append_compressed_keys

    return triton_append_compressed_keys(keys, ck1, ck2, slot, pos, kernel_size, kernel_stride)


@register("append_compressed_keys", "naive")
def _naive_append_compressed_keys(keys, ck1, ck2, slot, pos, kernel_size, kernel_stride) -> None:
    """Row by row on the host: each window a row's token completed, pooled from its slot's keys."""
    for s, p in zip(slot.tolist(), pos.tolist()):
        for buf, ks, st in ((ck1, kernel_size, kernel_stride), (ck2, 4 * kernel_size, 4 * kernel_stride)):
            n = num_windows(p + 1, ks, st)
            if n > num_windows(p, ks, st) and n <= buf.shape[1]:
                buf[s, n - 1] = naive_compress_keys(keys[s, : p + 1], ks, st, start=n - 1)[0]


def decode_attention_batch(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    ck1: torch.Tensor | None,
    ck2: torch.Tensor | None,
    slot: torch.Tensor,
    pos: torch.Tensor,
    params: InfLLMv2Params,
    scale: float,
    dense_len: int | None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of one decode token per row over its own cache slot: dense causal below ``dense_len`` (or
    always, when ``dense_len`` is None), InfLLM-v2 at or above it, decided per row (spec §5.2).

    q: [N, H, D]; keys, values: [S, C, Hkv, D] (row t's keys at positions <= pos[t] of slot[t]); ck1/ck2:
    [S, n1|n2, Hkv, D] compressed-key caches holding every window complete by pos[t] (None when
    ``dense_len`` is None); slot, pos: [N] -> o: [N, H, D] in q's dtype.

    The Triton path's shapes depend only on N and the cache shapes and it never syncs with the host, so a
    whole decode step can be captured in one CUDA graph; rows below ``dense_len`` run through the same
    block-sparse kernel with every block selected. ``naive`` and ``cpu`` loop over rows.
    """
    if q.dim() != 3 or slot.shape != (q.shape[0],):
        raise ValueError(f"decode batch wants q [N, H, D] and slot/pos [N]; got q {tuple(q.shape)}, slot {tuple(slot.shape)}")
    if dense_len is not None and (ck1 is None or ck2 is None):
        raise ValueError("sparse decode (dense_len set) needs the compressed-key caches ck1 and ck2")
    _check_slot_caches(keys, values, ck1, ck2, slot, pos)
    if q.shape[2] != keys.shape[3] or q.shape[1] % keys.shape[2]:
        raise ValueError(f"q [N, H, D] must share D with the keys and H must be a multiple of their {keys.shape[2]} "
                         f"KV heads; got q {tuple(q.shape)}, keys {tuple(keys.shape)}")
    return call("decode_attention_batch", backend, q.device, q, keys, values, ck1, ck2, slot, pos, params, scale,
                dense_len)


@register("decode_attention_batch", "naive", takes_backend=True)
def _decode_by_rows(q, keys, values, ck1, ck2, slot, pos, params, scale, dense_len, backend):
    """Row by row (a CPU has no host sync to avoid), each row through the dense or InfLLM-v2 entry on ``backend``
    (so ``cpu``, which has no batch implementation of its own, reads only the selected blocks)."""
    out = torch.empty_like(q)
    for t, (s, p) in enumerate(zip(slot.tolist(), pos.tolist())):
        kb, vb, L = keys[s, : p + 1], values[s, : p + 1], p + 1
        if dense_len is None or L < dense_len:
            out[t] = dense_causal_attention(q[None, t : t + 1], kb[None], vb[None], None, scale, backend)[0, 0]
        else:
            c1 = ck1[s, : num_windows(L, params.kernel_size, params.kernel_stride)]
            c2 = ck2[s, : num_windows(L, params.coarse_kernel_size, params.coarse_kernel_stride)]
            out[t] = infllm_v2_attention(q[t : t + 1], kb, vb, c1, c2, pos[t : t + 1], params, scale, backend,
                                         first_pos=p)[0]
    return out


def _check_slot_caches(keys, values, ck1, ck2, slot, pos) -> None:
    """Shapes and index dtypes of slot caches (no host sync)."""
    if keys.dim() != 4 or (values is not None and values.shape != keys.shape):
        raise ValueError(f"keys/values must be [S, C, Hkv, D] slot caches; got {tuple(keys.shape)}"
                         + ("" if values is None else f", {tuple(values.shape)}"))
    S, _, Hkv, D = keys.shape
    for name, ck in (("ck1", ck1), ("ck2", ck2)):
        if ck is not None and (ck.dim() != 4 or ck.shape[0] != S or ck.shape[2:] != (Hkv, D)):
            raise ValueError(f"{name} must be [S={S}, n, Hkv={Hkv}, D={D}]; got {tuple(ck.shape)}")
    if slot.dim() != 1 or pos.shape != slot.shape:
        raise ValueError(f"slot and pos must both be [N]; got {tuple(slot.shape)}, {tuple(pos.shape)}")
    if slot.dtype.is_floating_point or pos.dtype.is_floating_point or slot.dtype == torch.bool or pos.dtype == torch.bool:
        raise TypeError(f"slot and pos must be integer tensors; got {slot.dtype}, {pos.dtype}")


@register("decode_attention_batch", "triton")
def _triton_decode_batch(q, keys, values, ck1, ck2, slot, pos, params, scale, dense_len):
    from sala.ops.infllm_v2.sparse_attn import triton_sparse_decode_batch
    from sala.ops.infllm_v2.topk import triton_select_decode_batch

    N, Hkv, capacity, bs = q.shape[0], keys.shape[2], keys.shape[1], params.block_size
    if dense_len is None:  # every block up to the row's own: a flash-decoding pass over the whole cache
        n_blk = -(-capacity // bs)
        topk_idx = torch.arange(n_blk, dtype=torch.int32, device=q.device).expand(Hkv, N, n_blk)
        counts = (pos // bs + 1).to(torch.int32).expand(Hkv, N)
    else:
        topk_idx, counts = triton_select_decode_batch(q, ck1, ck2, slot, pos, capacity, params, scale, dense_len)
    return triton_sparse_decode_batch(q, keys, values, topk_idx, counts, slot, pos, bs, scale)
