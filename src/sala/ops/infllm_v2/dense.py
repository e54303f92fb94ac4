"""Dense causal GQA attention on GPU through torch SDPA (cuDNN / flash backends pick themselves).

Same contract as :func:`sala.ops.infllm_v2.naive.naive_dense_causal_attention` (the twin tests compare
against). Four cases, cheapest first:

* no padding, T == L (one-shot prefill): ``is_causal=True``, GQA inside SDPA;
* no padding, T == 1 (decode): no mask at all, the query sees every key;
* no padding, 1 < T < L (chunked prefill): lower-right causal bias, KV heads expanded (flash needs equal heads);
* left padding: an explicit boolean mask, built per query chunk so memory stays bounded.
"""

from __future__ import annotations

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
