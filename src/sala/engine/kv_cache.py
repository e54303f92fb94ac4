"""Preallocated per-slot caches for the engine (spec §6), behind the model's small cache interface.

``StaticCache`` owns, for ``num_slots`` sequence slots of ``max_seq_len`` tokens each:

* Lightning layers: fp32 states ``[num_slots + 1, H, K, V]``; row ``num_slots`` is a scratch state for the
  padding rows of a CUDA-graph batch.
* Sparse layers: raw K/V ``[num_slots, max_seq_len + 1, Hkv, D]`` in model dtype, right-aligned by position
  (``keys[s, p]`` is slot s's key at position p); column ``max_seq_len`` is a scratch position padding rows
  write to and nobody reads. With ``sparse_attention`` on: compressed keys ``ck1 [num_slots, n1, Hkv, D]``
  and ``ck2 [num_slots, n2, Hkv, D]``, extended window by window from the K cache, so they always equal the
  compression of the slot's whole K cache (spec §6.2 invariant) whatever the chunking.

``view(slot)`` returns a :class:`~sala.model.cache.HybridCache` for one sequence whose layers write into the
slot's buffers and return views, so ``SALAModel.forward(..., past_key_values=cache.view(slot))`` runs prefill
chunks with no allocation beyond activations. Lengths are tracked explicitly on the host, never inferred.
"""

from __future__ import annotations

import torch

from sala.engine.types import EngineError
from sala.model import HybridCache, SALAConfig
from sala.ops import compress_keys
from sala.ops.infllm_v2 import num_windows


class LightningStore:
    """States of one Lightning layer for every slot: ``state [S + 1, H, K, V]`` (row S = scratch)."""

    def __init__(self, num_slots: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.state = torch.zeros(num_slots + 1, heads, head_dim, head_dim, dtype=dtype, device=device)


class SparseStore:
    """K/V (and compressed keys) of one softmax layer for every slot."""

    def __init__(self, num_slots: int, max_seq_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, compression: tuple[int, int] | None) -> None:
        shape = (num_slots, max_seq_len + 1, kv_heads, head_dim)  # +1: scratch column for padding rows
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.compression = compression
        self.ck1 = self.ck2 = None
        self.n1 = [0] * num_slots  # complete ck1 windows stored per slot
        self.n2 = [0] * num_slots
        if compression is not None:
            ks, st = compression
            n1, n2 = num_windows(max_seq_len, ks, st), num_windows(max_seq_len, 4 * ks, 4 * st)
            self.ck1 = torch.empty(num_slots, n1, kv_heads, head_dim, dtype=dtype, device=device)
            self.ck2 = torch.empty(num_slots, n2, kv_heads, head_dim, dtype=dtype, device=device)

    def compressed(self, slot: int, keys: torch.Tensor, kernel_size: int, kernel_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ck1, ck2 of ``slot`` whose valid keys are ``keys`` [L, Hkv, D], extended to cover them -> views."""
        if self.compression is None:
            raise EngineError("this layer has no compressed-key cache (config.sparse_attention is off)")
        if (kernel_size, kernel_stride) != self.compression:
            raise EngineError(f"compressed cache built for (kernel_size, stride) {self.compression}, asked for {(kernel_size, kernel_stride)}")
        out = []
        for buf, counts, ks, st in ((self.ck1, self.n1, kernel_size, kernel_stride),
                                    (self.ck2, self.n2, 4 * kernel_size, 4 * kernel_stride)):
            have, need = counts[slot], num_windows(keys.shape[0], ks, st)
            if need > have:  # only the new windows: O(new tokens) per call (spec §6.2)
                buf[slot, have:need] = compress_keys(keys, ks, st, start=have)
                counts[slot] = need
            out.append(buf[slot, : counts[slot]])
        return out[0], out[1]


class _LightningSlot:
    """Model-facing view of one slot of a :class:`LightningStore` (``state`` is None before the first token)."""

    rows = None  # the state is this slot's own [1, H, K, V] view, not a pool indexed by rows

    def __init__(self, store: LightningStore, cache: "StaticCache", slot: int) -> None:
        self._store, self._cache, self._slot = store, cache, slot

    @property
    def state(self) -> torch.Tensor | None:
        if self._cache.lengths[self._slot] == 0:
            return None
        return self._store.state[self._slot : self._slot + 1]  # [1, H, K, V] view: decode updates it in place

    @state.setter
    def state(self, value: torch.Tensor) -> None:
        self._store.state[self._slot : self._slot + 1].copy_(value)


class _SparseSlot:
    """Model-facing view of one slot of a :class:`SparseStore` (``update`` / ``compressed`` as SparseLayerCache)."""

    def __init__(self, store: SparseStore, cache: "StaticCache", slot: int) -> None:
        self._store, self._cache, self._slot = store, cache, slot

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` [1, T, Hkv, D] after the slot's tokens; return keys, values [1, L, Hkv, D] (views)."""
        if k.shape[0] != 1:
            raise EngineError(f"a slot view holds one sequence, got batch {k.shape[0]}")
        past, T = self._cache.lengths[self._slot], k.shape[1]
        if past + T > self._cache.max_seq_len:
            raise EngineError(f"slot {self._slot} overflow: {past} + {T} tokens > capacity {self._cache.max_seq_len}")
        s = self._slot
        self._store.keys[s, past : past + T] = k[0]
        self._store.values[s, past : past + T] = v[0]
        return self._store.keys[s : s + 1, : past + T], self._store.values[s : s + 1, : past + T]

    def compressed(self, seq: int, keys: torch.Tensor, kernel_size: int, kernel_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq != 0:
            raise EngineError(f"a slot view holds one sequence, asked for sequence {seq}")
        return self._store.compressed(self._slot, keys, kernel_size, kernel_stride)


class SlotCache(HybridCache):
    """One slot of a :class:`StaticCache` seen as the ``HybridCache`` of a batch-1 model call."""

    def __init__(self, cache: "StaticCache", slot: int) -> None:  # no super().__init__: nothing to allocate
        self._cache, self.slot = cache, slot
        self.layers = [
            _SparseSlot(store, cache, slot) if isinstance(store, SparseStore) else _LightningSlot(store, cache, slot)
            for store in cache.stores
        ]

    @property
    def seq_length(self) -> int:
        return self._cache.lengths[self.slot]

    @seq_length.setter
    def seq_length(self, value: int) -> None:  # the model sets this after each forward
        self._cache.lengths[self.slot] = value


class StaticCache:
    """All caches of an engine, allocated once. ``lengths[s]``: tokens in slot s."""

    def __init__(self, config: SALAConfig, num_slots: int, max_seq_len: int, dtype: torch.dtype, device: torch.device | str) -> None:
        device = torch.device(device)
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.lengths = [0] * num_slots
        # slots whose compressed keys the device keeps current (fused decode appends each completed window);
        # their host counts n1/n2 are synced lazily, so a decode step costs no per-layer host work
        self._device_compressed = [False] * num_slots
        sc = config.sparse_config
        compression = (sc["kernel_size"], sc["kernel_stride"]) if config.sparse_attention else None
        state_dtype = torch.promote_types(dtype, torch.float32)  # spec §7: fp32 Lightning state
        self.stores: list[LightningStore | SparseStore] = [
            SparseStore(num_slots, max_seq_len, config.num_key_value_heads, config.head_dim, dtype, device, compression)
            if config.is_sparse_layer(i)
            else LightningStore(num_slots, config.num_attention_heads, config.head_dim, state_dtype, device)
            for i in range(config.num_hidden_layers)
        ]

    @property
    def scratch_state(self) -> int:
        """Lightning state row used by padding rows."""
        return self.num_slots

    @property
    def scratch_position(self) -> int:
        """K/V column padding rows write to (never read)."""
        return self.max_seq_len

    def reset(self, slot: int) -> None:
        """Forget slot ``slot``'s sequence (buffers are overwritten, not cleared)."""
        self.lengths[slot] = 0
        self._device_compressed[slot] = False
        for store in self.stores:
            if isinstance(store, SparseStore):
                store.n1[slot] = store.n2[slot] = 0

    def ensure_compressed(self, slot: int) -> None:
        """Bring the compressed-key caches of ``slot`` up to its length (prefill below ``dense_len`` never
        needed them) and hand them to the device: from now on each fused decode step appends the window its
        token completes. O(1) while the device keeps them current."""
        if self._device_compressed[slot]:
            return
        n = self.lengths[slot]
        for store in self._compressed_stores():
            store.compressed(slot, store.keys[slot, :n], *store.compression)  # computes only missing windows
        self._device_compressed[slot] = True

    def sync_compressed(self, slot: int) -> None:
        """Before host code reads or extends ``slot``'s compressed keys again (prefill, copies): set the host
        counts to what the device appended, every window of the slot's current length."""
        if not self._device_compressed[slot]:
            return
        self._device_compressed[slot] = False
        for store in self._compressed_stores():
            ks, st = store.compression
            store.n1[slot] = num_windows(self.lengths[slot], ks, st)
            store.n2[slot] = num_windows(self.lengths[slot], 4 * ks, 4 * st)

    def _compressed_stores(self) -> list[SparseStore]:
        return [s for s in self.stores if isinstance(s, SparseStore) and s.compression is not None]

    def view(self, slot: int) -> SlotCache:
        if not 0 <= slot < self.num_slots:
            raise EngineError(f"slot {slot} out of range [0, {self.num_slots})")
        self.sync_compressed(slot)
        return SlotCache(self, slot)

    def copy_slot(self, src: int, dst: int) -> None:
        """Duplicate a sequence into another slot (benchmarks: one prefill, many decoding copies)."""
        if src == dst:
            return
        self.sync_compressed(src)
        self.reset(dst)
        n = self.lengths[src]
        for store in self.stores:
            if isinstance(store, LightningStore):
                store.state[dst].copy_(store.state[src])
            else:
                store.keys[dst, :n] = store.keys[src, :n]
                store.values[dst, :n] = store.values[src, :n]
                if store.ck1 is not None:
                    store.ck1[dst, : store.n1[src]] = store.ck1[src, : store.n1[src]]
                    store.ck2[dst, : store.n2[src]] = store.ck2[src, : store.n2[src]]
                store.n1[dst], store.n2[dst] = store.n1[src], store.n2[src]
        self.lengths[dst] = n

    def nbytes(self) -> int:
        total = 0
        for store in self.stores:
            tensors = [store.state] if isinstance(store, LightningStore) else [store.keys, store.values, store.ck1, store.ck2]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total
