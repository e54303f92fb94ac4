"""Dense causal GQA attention on GPU through torch SDPA (cuDNN / flash backends pick themselves).

Same contract as :func:`sala.ops.infllm_v2.naive.naive_dense_causal_attention` (the twin tests compare
against). Four cases, cheapest first:

* no padding, T == L (one-shot prefill): ``is_causal=True``, GQA inside SDPA;
* no padding, T == 1 (decode): no mask at all, the query sees every key;
* no padding, 1 < T < L (chunked prefill): on CUDA two cuDNN calls merged by their log-sum-exp (below); else
  the lower-right causal bias (flash attention, GQA inside it);
* left padding: an explicit boolean mask, built per query chunk so memory stays bounded.

Why the split for chunked prefill: SDPA sends a lower-right causal bias straight to FlashAttention-2, while a
one-shot ``is_causal=True`` call takes cuDNN's faster Hopper kernel (torch >= 2.10 prefers it on sm90). cuDNN knows
only top-left causal alignment, so a chunk of T queries against L = P + T keys is attended in two parts: all P
earlier keys without a mask, and the chunk's own T keys with square (top-left) causal masking; the two partial
outputs are merged exactly with their log-sum-exps (:func:`merge_attention`). Same FLOPs, faster kernel: this is
what made the engine's dense baseline slower than transformers (70.7 vs 48.6 s at 256K on an H200). The first
call on a device and dtype is checked against the flash path and the split is dropped, with a warning, if the two
disagree or cuDNN refuses (per head layout; a later refusal also falls back); ``SALA_CUDNN_SPLIT=0`` turns it off.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from sala.utils.env import cudnn_split

logger = logging.getLogger(__name__)

_MASK_ELEMS = 64 * 2**20  # bool mask elements per query chunk
_SPLIT_OK: dict[tuple, bool] = {}  # (device, dtype, head_dim, heads, kv heads) -> passed its first-use check


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Softmax attention over the union of two disjoint key sets from the attention over each:
    o = (o1 e^lse1 + o2 e^lse2) / (e^lse1 + e^lse2). o1, o2: [B, H, T, D]; lse1, lse2: [B, H, T] fp32 (natural
    log-sum-exp of each part's scaled scores) -> [B, H, T, D] in o1's dtype."""
    acc = torch.promote_types(o1.dtype, torch.float32)  # fp32 for 16-bit outputs, fp64 stays fp64
    m = torch.maximum(lse1, lse2).to(acc)
    w1 = torch.exp(lse1.to(acc) - m).unsqueeze(-1)
    w2 = torch.exp(lse2.to(acc) - m).unsqueeze(-1)
    return ((o1.to(acc) * w1 + o2.to(acc) * w2) / (w1 + w2)).to(o1.dtype)


def _flash_lower_right(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, scale: float) -> torch.Tensor:
    """Lower-right causal attention through SDPA. GQA stays inside the kernel only where flash takes the call
    (CUDA, 16-bit, head_dim <= 256): elsewhere SDPA's fallback for a causal bias with GQA is the math kernel with
    a full [T, L] score matrix, so the KV heads are expanded for the memory-efficient kernel instead."""
    T, L = qh.shape[2], kh.shape[2]
    G = qh.shape[1] // kh.shape[1]
    if G > 1 and qh.is_cuda and qh.dtype in (torch.float16, torch.bfloat16) and qh.shape[-1] <= 256:
        try:
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(T, L), scale=scale,
                                                  enable_gqa=True)
        except TypeError:  # a torch whose CausalBias dispatch takes no enable_gqa
            pass
    ke, ve = (x.repeat_interleave(G, dim=1) if G > 1 else x for x in (kh, vh))
    return F.scaled_dot_product_attention(qh, ke, ve, attn_mask=causal_lower_right(T, L), scale=scale)


def _cudnn_split(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, scale: float, att=None) -> torch.Tensor:
    """qh [B, H, T, D], kh/vh [B, Hkv, L, D] (CUDA, 16-bit, T < L) -> [B, H, T, D]: earlier keys unmasked, the
    chunk's own keys square-causal, each one cuDNN call returning its log-sum-exp, merged. ``att``: the attention
    op (default cuDNN's; the CPU tests pass a reference with its signature)."""
    P = kh.shape[2] - qh.shape[2]
    att = att or torch.ops.aten._scaled_dot_product_cudnn_attention
    # (query, key, value, attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask, *, scale)
    o1, lse1 = att(qh, kh[:, :, :P], vh[:, :, :P], None, True, 0.0, False, False, scale=scale)[:2]
    o2, lse2 = att(qh, kh[:, :, P:], vh[:, :, P:], None, True, 0.0, True, False, scale=scale)[:2]
    shape = qh.shape[:3]
    return merge_attention(o1, lse1.reshape(shape).float(), o2, lse2.reshape(shape).float())


def _split_wanted(qh: torch.Tensor) -> bool:
    """CUDA, 16-bit, cuDNN SDPA enabled and SALA_CUDNN_SPLIT not 0."""
    return (qh.device.type == "cuda" and qh.dtype in (torch.float16, torch.bfloat16) and cudnn_split()
            and torch.backends.cuda.cudnn_sdp_enabled())


def _chunk_attention(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, scale: float) -> torch.Tensor:
    """Chunked-prefill attention (1 < T < L, no padding): the cuDNN split where it is checked and allowed, else
    flash with a lower-right causal bias."""
    key = (qh.device, qh.dtype, qh.shape[-1], qh.shape[1], kh.shape[1])
    if not _split_wanted(qh) or _SPLIT_OK.get(key) is False:
        return _flash_lower_right(qh, kh, vh, scale)
    checked = key in _SPLIT_OK
    try:
        got = _cudnn_split(qh, kh, vh, scale)
    except RuntimeError as e:  # cuDNN refuses this layout (or, once trusted, a length or stride): flash from now on
        _SPLIT_OK[key] = False
        logger.warning("dense chunked prefill: cuDNN attention %s (%s); using flash",
                       "failed" if checked else "unavailable", str(e).splitlines()[0])
        return _flash_lower_right(qh, kh, vh, scale)
    if checked:
        return got
    want = _flash_lower_right(qh, kh, vh, scale)  # first use: the split must agree with flash before it is trusted
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
    _SPLIT_OK[key] = err < 2e-2
    if not _SPLIT_OK[key]:
        logger.warning("dense chunked prefill: the cuDNN split disagrees with flash attention (rel. error %.3g); "
                       "using flash", err)
    return want


def sdpa_dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """q: [B, T, H, D]; k, v: [B, L, Hkv, D]; key_valid: [B, L] bool or None -> o: [B, T, H, D]."""
    B, T, H, D = q.shape
    L, Hkv = k.shape[1], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|Hkv, T|L, D]
    if key_valid is None:
        if T == L:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        elif T == 1:
            o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=True)
        else:
            o = _chunk_attention(qh, kh, vh, scale)
        return o.transpose(1, 2)
    out = torch.empty_like(q)
    step = max(1, _MASK_ELEMS // max(1, B * L))
    key_idx = torch.arange(L, device=q.device)
    for a in range(0, T, step):
        b = min(a + step, T)
        qi = L - T + torch.arange(a, b, device=q.device)
        causal = key_idx[None, :] <= qi[:, None]  # [Tc, L]
        # a padding query sees nothing; let it see its own slot so softmax stays finite (its output is unused)
        mask = (causal[None, None] & key_valid[:, None, None, :]) | (key_idx[None, :] == qi[:, None])[None, None]
        o = F.scaled_dot_product_attention(qh[:, :, a:b], kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
        out[:, a:b] = o.transpose(1, 2)
    return out


@functools.cache
def _varlen_signature() -> frozenset[str]:
    """Keyword names of torch's ``varlen_attn`` (causality is ``is_causal`` in torch 2.10, ``window_size`` after)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def flash_varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, bounds: list[int], scale: float
) -> torch.Tensor:
    """Packed documents in one flash-attention launch (torch's ``varlen_attn``, forward and backward).

    q: [N, H, D]; k, v: [N, Hkv, D] (16-bit, CUDA); cu_seqlens: [S+1] int on q's device; bounds: the same on the
    host -> o: [N, H, D]. One launch instead of one SDPA call per document: per-document calls of new lengths cost
    milliseconds of host time each (cuDNN builds a graph per shape), which starved the GPU in packed training.
    """
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_signature()
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    kwargs: dict = {}
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale * D**0.5 - 1.0) > 1e-6:  # its fixed 1/sqrt(D): fold the rest into q
        q = q * (scale * D**0.5)
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    if H != Hkv:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older torch: one K/V head per query head
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest, **kwargs)
