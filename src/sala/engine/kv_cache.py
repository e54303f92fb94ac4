"""Preallocated per-slot caches for the engine (spec §6), behind the model's small cache interface.

``StaticCache`` owns, for ``num_slots`` sequence slots of ``max_seq_len`` tokens each:

* Lightning layers: fp32 states ``[num_slots + 1, H, K, V]``; row ``num_slots`` is a scratch state for the
  padding rows of a CUDA-graph batch.
* Sparse layers: raw K/V ``[num_slots, max_seq_len + 1, Hkv, D]`` in model dtype, right-aligned by position
  (``keys[s, p]`` is slot s's key at position p); column ``max_seq_len`` is a scratch position padding rows
  write to and nobody reads. With ``sparse_attention`` on: compressed keys ``ck1 [num_slots, n1, Hkv, D]``
  and ``ck2 [num_slots, n2, Hkv, D]``, extended window by window from the K cache, so they always equal the
  compression of the slot's whole K cache (spec §6.2 invariant) whatever the chunking.

Both views implement the model's cache protocol (:mod:`sala.model.cache`), so prefill and decode run the model's
one forward:

* ``view(slot)``: one sequence as a batch-1 :class:`~sala.model.cache.HybridCache` whose layers write into the
  slot's buffers and return views; ``SALAModel.forward(..., past_key_values=cache.view(slot))`` runs a prefill
  chunk with no allocation beyond activations.
* ``decode_view(idx, rows, fused)``: N sequences, one new token each, at their own slots and lengths. Lightning
  layers step their pool rows in place; softmax layers write K/V at (slot, position) and attend either fused
  (one batched kernel, shapes fixed by the batch: capturable in a CUDA graph) or eagerly row by row.

Lengths are tracked explicitly on the host, never inferred.
"""

from __future__ import annotations

import torch

from sala.engine.types import EngineError
from sala.model import HybridCache, SALAConfig
from sala.model.cache import CompressedKeyTiers, LightningLayerCache, PaddedKV, SparseAttentionParams, compression_tiers
from sala.model.layout import BatchLayout
from sala.ops import append_compressed_keys, decode_attention_batch, dense_causal_attention, infllm_v2_attention
from sala.ops.infllm_v2 import num_windows


class LightningStore:
    """States of one Lightning layer for every slot: ``state [S + 1, H, K, V]`` (row S = scratch)."""

    def __init__(self, num_slots: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.state = torch.zeros(num_slots + 1, heads, head_dim, head_dim, dtype=dtype, device=device)


class SparseStore(CompressedKeyTiers):
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
        return super().compressed(slot, keys, kernel_size, kernel_stride)

    def _tier(self, tier: int) -> tuple[torch.Tensor, list[int]]:
        return (self.ck1, self.n1) if tier == 0 else (self.ck2, self.n2)

    def stored_windows(self, seq: int, tier: int) -> int:
        return self._tier(tier)[1][seq]

    def store_windows(self, seq: int, tier: int, start: int, windows: torch.Tensor) -> None:
        buf, counts = self._tier(tier)
        buf[seq, start : start + windows.shape[0]] = windows
        counts[seq] = start + windows.shape[0]

    def read_windows(self, seq: int, tier: int, like: torch.Tensor) -> torch.Tensor:
        buf, counts = self._tier(tier)
        return buf[seq, : counts[seq]]


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


class _SparseSlot(PaddedKV):
    """Model-facing view of one slot of a :class:`SparseStore`: a batch-1 padded K/V (``update`` / ``compressed``)."""

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

    def __init__(self, cache: "StaticCache", slot: int) -> None:
        self._cache, self.slot = cache, slot
        super().__init__(layers=[
            _SparseSlot(store, cache, slot) if isinstance(store, SparseStore) else _LightningSlot(store, cache, slot)
            for store in cache.stores
        ])

    @property
    def seq_length(self) -> int:
        return self._cache.lengths[self.slot]

    @seq_length.setter
    def seq_length(self, value: int) -> None:  # the model sets this after each forward
        self._cache.lengths[self.slot] = value


class _DecodeKV:
    """One softmax layer's K/V for a decode step over N slots (:class:`~sala.model.cache.SparseKV`).

    ``idx`` [4, N] (device): RoPE position, K/V slot, K/V position, Lightning row of each row (padding rows of a
    CUDA-graph batch: slot 0, the scratch column, the scratch state). ``rows`` (host): the real rows' slots and
    lengths, which the eager path needs; the fused path reads only ``idx``, so it has no host work.
    """

    def __init__(self, store: SparseStore, cache: "StaticCache", idx: torch.Tensor,
                 rows: tuple[list[int], list[int]] | None, fused: bool) -> None:
        self.store, self.cache, self.idx, self.rows, self.fused = store, cache, idx, rows, fused

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BatchLayout,
               mixer: SparseAttentionParams) -> torch.Tensor:
        """q: [N, 1, H, D]; k, v: [N, 1, Hkv, D] -> o [N, 1, H, D]."""
        store, (pos, kv_slot, kv_pos) = self.store, self.idx[:3]
        store.keys[kv_slot, kv_pos] = k[:, 0]
        store.values[kv_slot, kv_pos] = v[:, 0]
        if self.fused:  # padding rows: position 0 of slot 0 completes no window and is only read
            p, cap = mixer.params, self.cache.max_seq_len  # views without the scratch column
            keys, values = store.keys[:, :cap], store.values[:, :cap]
            if mixer.dense_len is not None:
                append_compressed_keys(keys, store.ck1, store.ck2, kv_slot, pos, p.kernel_size, p.kernel_stride)
            o = decode_attention_batch(q[:, 0], keys, values, store.ck1, store.ck2, kv_slot, pos, p, mixer.scale,
                                       mixer.dense_len)
            return o.reshape(q.shape)
        if self.rows is None:
            raise EngineError("eager decode attention needs the rows' slots and lengths")
        return self._attend_eager(q, mixer, *self.rows)

    def _attend_eager(self, q: torch.Tensor, mixer: SparseAttentionParams, slots: list[int], lengths: list[int]
                      ) -> torch.Tensor:
        """Row by row: InfLLM-v2 for rows at/above ``dense_len``; dense rows with equal length in consecutive
        slots share one call."""
        store, o = self.store, torch.zeros_like(q)  # rows past the real ones (a padded bucket) stay zero
        n, i = len(slots), 0
        while i < n:
            L = lengths[i]
            if mixer.uses_sparse(L):  # spec §5.2: the call's total length decides, per sequence
                s, p = slots[i], mixer.params
                kb, vb = store.keys[s, :L], store.values[s, :L]
                ck1, ck2 = store.compressed(s, kb, p.kernel_size, p.kernel_stride)
                o[i] = infllm_v2_attention(q[i], kb, vb, ck1, ck2, self.idx[0, i : i + 1], p, mixer.scale,
                                           first_pos=L - 1)  # [1, H, D]
                i += 1
                continue
            j = i + 1
            while j < n and lengths[j] == L and slots[j] == slots[j - 1] + 1:
                j += 1
            s0 = slots[i]
            o[i:j] = dense_causal_attention(q[i:j], store.keys[s0 : s0 + j - i, :L], store.values[s0 : s0 + j - i, :L],
                                            None, mixer.scale)
            i = j
        return o


class DecodeView(HybridCache):
    """N sequences of a :class:`StaticCache`, one new token each, as the cache of one model call (see the module
    docstring). The runner advances ``StaticCache.lengths`` after the step."""

    def __init__(self, cache: "StaticCache", idx: torch.Tensor, rows: tuple[list[int], list[int]] | None,
                 fused: bool) -> None:
        super().__init__(layers=[
            _DecodeKV(store, cache, idx, rows, fused) if isinstance(store, SparseStore)
            else LightningLayerCache(store.state, idx[3])  # the pool, stepped in place at each row's state row
            for store in cache.stores
        ])

    @property
    def seq_length(self) -> int:
        raise EngineError("a decode view holds sequences of different lengths: read StaticCache.lengths")

    @seq_length.setter
    def seq_length(self, value: int) -> None:  # the model sets it after a call; rows' lengths are the runner's
        pass


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

    def decode_view(self, idx: torch.Tensor, rows: tuple[list[int], list[int]] | None, fused: bool) -> DecodeView:
        """The cache of one decode step: ``idx`` [4, N] as :meth:`ModelRunner.index_rows` builds it; ``rows`` the
        real rows' (slots, lengths after this token), needed by eager attention only; ``fused``: attention in one
        batched kernel (compressed keys appended on the device; call :meth:`ensure_compressed` first)."""
        return DecodeView(self, idx, rows, fused)

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
