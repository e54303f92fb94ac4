"""``HybridCache``: per-layer decode state of a SALA model (spec §6).

* Lightning layers: one fp32 state ``[B, H, K, V]`` per layer (2 MiB per sequence per layer at released shapes).
* Sparse layers: raw K/V ``[B, L, Hkv, D]`` in the padded (left-padding) layout, appended into buffers with spare
  room (amortised O(1) per token), plus
  per-sequence compressed keys ``ck1``/``ck2`` (spec §5.3). The compressed tiers are extended lazily, window by
  window, from the full K cache the first time a sequence needs the sparse path and on every later sparse call.
  Invariant (spec §6.2): after any sequence of calls, ``ck1``/``ck2`` equal the compression of the sequence's
  whole K cache, so chunked prefill and decode see the same compressed keys as a one-shot prefill.

The total padded length is tracked explicitly (never inferred from data). Only left padding is supported;
the model validates attention masks before they reach the cache.
"""

from __future__ import annotations

import torch

from sala.ops import compress_keys
from sala.ops.infllm_v2 import num_windows


class LightningLayerCache:
    """Recurrent state of one Lightning layer; ``state`` is None until the first call.

    ``rows`` (an engine's decode step): sequence b's state is ``state[rows[b]]`` of a larger [S, H, K, V] pool,
    stepped in place without gathering; only one-token calls accept it.
    """

    def __init__(self, state: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        self.state: torch.Tensor | None = state  # [B, H, K, V] fp32 / fp64 ([S, H, K, V] with rows)
        self.rows: torch.Tensor | None = rows  # [B] int64


class SparseLayerCache:
    """K/V of one softmax layer plus per-sequence compressed keys.

    ``keys``/``values`` [B, L, Hkv, D] are views of buffers with spare room after the first append: a decode step
    writes one row instead of copying the whole cache (``torch.cat`` per token made decode O(L) in memory traffic).
    With autograd on (inputs that require grad) appends concatenate, as in-place writes would break backward.
    ``nbytes`` counts the live K/V, not the spare room.
    """

    GROWTH = 0.25
    """Spare room added when a buffer fills: a quarter of its length (at least 256 rows), so appends amortise to
    O(1) copies per row at <= 25% extra memory."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [B, L, Hkv, D], a view of _k_buf
        self.values: torch.Tensor | None = None
        self._k_buf: torch.Tensor | None = None  # [B, capacity, Hkv, D]
        self._v_buf: torch.Tensor | None = None
        self.ck1: dict[int, torch.Tensor] = {}  # sequence -> [n1, Hkv, D]
        self.ck2: dict[int, torch.Tensor] = {}  # sequence -> [n2, Hkv, D]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` [B, T, Hkv, D]; return the whole cache [B, L, Hkv, D] (views: read, do not write)."""
        if self.keys is None:  # the first call keeps the tensors (a one-shot prefill copies nothing)
            self.keys, self.values = k.contiguous(), v.contiguous()
            return self.keys, self.values
        if k.shape[0] != self.keys.shape[0]:
            raise ValueError(f"batch size changed from {self.keys.shape[0]} to {k.shape[0]} within one cache")
        if k.requires_grad or v.requires_grad or self.keys.requires_grad:
            # autograd: in-place writes would bump the version of tensors an earlier step saved for backward
            self.keys, self.values = torch.cat([self.keys, k], dim=1), torch.cat([self.values, v], dim=1)
            self._k_buf = self._v_buf = None
            return self.keys, self.values
        L, T = self.keys.shape[1], k.shape[1]
        if self._k_buf is None or L + T > self._k_buf.shape[1] or self.keys.data_ptr() != self._k_buf.data_ptr():
            # (re)allocate; also when someone replaced ``keys`` (reorder, crop): the buffer no longer holds them
            capacity = L + T + max(256, int(self.GROWTH * (L + T)))
            self._k_buf, self._v_buf = (x.new_empty(x.shape[0], capacity, *x.shape[2:]) for x in (self.keys, self.values))
            self._k_buf[:, :L], self._v_buf[:, :L] = self.keys, self.values
        self._k_buf[:, L : L + T], self._v_buf[:, L : L + T] = k, v
        self.keys, self.values = self._k_buf[:, : L + T], self._v_buf[:, : L + T]
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        """Bytes of the live K/V and compressed keys (spare buffer room excluded)."""
        tensors = [self.keys, self.values, *self.ck1.values(), *self.ck2.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def compressed(
        self, seq: int, keys: torch.Tensor, kernel_size: int, kernel_stride: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ck1, ck2 of sequence ``seq`` whose valid keys are ``keys`` [L_b, Hkv, D], extended to cover them."""
        out = []
        for store, ks, st in ((self.ck1, kernel_size, kernel_stride), (self.ck2, 4 * kernel_size, 4 * kernel_stride)):
            have = store.get(seq)
            n_have = 0 if have is None else have.shape[0]
            if num_windows(keys.shape[0], ks, st) > n_have:
                new = compress_keys(keys, ks, st, start=n_have)
                have = new if have is None else torch.cat([have, new], dim=0)
                store[seq] = have
            out.append(have if have is not None else keys.new_empty(0, *keys.shape[1:]))
        return out[0], out[1]


class HybridCache:
    """List of per-layer caches with the small interface ``generate()`` needs (``get_seq_length``)."""

    is_compileable = False

    def __init__(self, mixer_is_sparse: list[bool]) -> None:
        self.layers: list[LightningLayerCache | SparseLayerCache] = [
            SparseLayerCache() if sparse else LightningLayerCache() for sparse in mixer_is_sparse
        ]
        self.seq_length = 0  # padded length L of every sequence (all sequences advance together)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, idx: int) -> LightningLayerCache | SparseLayerCache:
        return self.layers[idx]
