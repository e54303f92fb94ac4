"""Dense causal GQA attention on GPU through torch SDPA (cuDNN / flash backends pick themselves).

Same contract as :func:`sala.ops.infllm_v2.naive.naive_dense_causal_attention` (the twin tests compare
against). Four cases, cheapest first:

* no padding, T == L (one-shot prefill): ``is_causal=True``, GQA inside SDPA;
* no padding, T == 1 (decode): no mask at all, the query sees every key;
* no padding, 1 < T < L (chunked prefill): lower-right causal bias, KV heads expanded (flash needs equal heads);
* left padding: an explicit boolean mask, built per query chunk so memory stays bounded.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

_MASK_ELEMS = 64 * 2**20  # bool mask elements per query chunk


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
            G = H // Hkv
            ke, ve = (x.repeat_interleave(G, dim=1) if G > 1 else x for x in (kh, vh))
            o = F.scaled_dot_product_attention(qh, ke, ve, attn_mask=causal_lower_right(T, L), scale=scale)
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
