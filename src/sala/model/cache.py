"""The cache protocol: what a mixer may ask of its cache, and the HF implementation (spec §6).

A mixer sees one object per layer and asks it for one thing:

* a **Lightning** layer reads and writes ``state`` (:class:`LightningState`): the recurrent state ``[B, H, K, V]``
  (fp32), None before the first token; or, in a serving engine's decode step, a pool ``[S, H, K, V]`` with
  ``rows`` [B] naming each sequence's row, stepped in place;
* a **softmax** layer hands its new q/k/v to ``attend`` (:class:`SparseKV`), which stores k/v where the cache
  keeps them and returns the attention output ``[B, T, H, D]``: dense below ``dense_len`` and InfLLM-v2 at or
  above, decided per sequence by its own length.

Implementations: :class:`SparseLayerCache` / :class:`LightningLayerCache` here (HF ``generate``: padded batch,
growing buffers); :class:`NoCache` (training and cache-less calls: nothing stored, packed documents allowed);
the engine's slot views and batched decode view (``sala.engine.kv_cache``: preallocated slots). Every cache
that keeps K per sequence extends the compressed keys (``ck1``/``ck2``, spec §5.3) through
:class:`CompressedKeyTiers`, so after any sequence of calls they equal the compression of the sequence's whole
K cache (spec §6.2): chunked prefill and decode see the same compressed keys as a one-shot prefill.

:class:`HybridCache` is a ``transformers.Cache``: ``generate`` can take one (``past_key_values=``), reuse it
across calls, reorder it for beam search and expand it for ``num_return_sequences``. It cannot be cropped
(a Lightning state cannot forget tokens), so assisted decoding that rolls back is refused.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from sala.ops import compress_keys, dense_causal_attention, infllm_v2_attention, varlen_causal_attention
from sala.ops.infllm_v2 import InfLLMv2Params, num_windows

if TYPE_CHECKING:
    from sala.model.layout import BatchLayout


# ---------------------------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------------------------
@runtime_checkable
class LightningState(Protocol):
    """What a Lightning mixer asks of its cache: ``state`` [B, H, K, V] (None: no token yet) and optional ``rows``
    [B] int64 (state of sequence b is ``state[rows[b]]`` of a pool, stepped in place; one-token calls only)."""

    state: torch.Tensor | None
    rows: torch.Tensor | None


class SparseAttentionParams(Protocol):
    """What a softmax mixer tells its cache: softmax scale, the dense/sparse threshold and InfLLM-v2 geometry."""

    scale: float
    dense_len: int | None
    params: InfLLMv2Params

    def uses_sparse(self, num_keys: int) -> bool: ...


@runtime_checkable
class SparseKV(Protocol):
    """What a softmax mixer asks of its cache: store this call's k/v and attend over everything stored."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: "BatchLayout",
               mixer: SparseAttentionParams) -> torch.Tensor:
        """q: [B, T, H, D]; k, v: [B, T, Hkv, D] (this call's) -> o [B, T, H, D]."""
        ...


def compression_tiers(kernel_size: int, kernel_stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(kernel, stride) of ck1 and ck2: the second tier pools windows 4x as long (spec §5.3)."""
    return (kernel_size, kernel_stride), (4 * kernel_size, 4 * kernel_stride)


class CompressedKeyTiers(ABC):
    """Per-sequence compressed keys ``ck1``/``ck2``, extended window by window (O(new tokens) per call).

    Subclasses say how windows are stored (the HF cache grows tensors, the engine fills preallocated slots);
    :meth:`compressed` is the one place that decides which windows are missing and computes them.
    """

    @abstractmethod
    def stored_windows(self, seq: int, tier: int) -> int:
        """Complete windows of tier ``tier`` (0: ck1, 1: ck2) stored for sequence ``seq``."""

    @abstractmethod
    def store_windows(self, seq: int, tier: int, start: int, windows: torch.Tensor) -> None:
        """Store ``windows`` [n, Hkv, D] as windows ``start .. start + n`` of sequence ``seq``'s tier."""

    @abstractmethod
    def read_windows(self, seq: int, tier: int, like: torch.Tensor) -> torch.Tensor:
        """The stored windows of the tier [n, Hkv, D] (``like`` [L, Hkv, D] gives dtype/device when empty)."""

    def compressed(self, seq: int, keys: torch.Tensor, kernel_size: int, kernel_stride: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """ck1, ck2 of sequence ``seq`` whose valid keys are ``keys`` [L, Hkv, D], extended to cover them."""
        for tier, (ks, st) in enumerate(compression_tiers(kernel_size, kernel_stride)):
            have = self.stored_windows(seq, tier)
            if num_windows(keys.shape[0], ks, st) > have:
                self.store_windows(seq, tier, have, compress_keys(keys, ks, st, start=have))
        return self.read_windows(seq, 0, keys), self.read_windows(seq, 1, keys)


class PaddedKV(ABC):
    """A softmax layer's K/V as a padded batch: ``update`` appends this call's k/v and returns every key so far;
    :meth:`attend` runs dense attention for short rows and InfLLM-v2 for each row at or above ``dense_len``."""

    @abstractmethod
    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` [B, T, Hkv, D]; return keys, values [B, L, Hkv, D] (views: read, do not write)."""

    @abstractmethod
    def compressed(self, seq: int, keys: torch.Tensor, kernel_size: int, kernel_stride: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """ck1, ck2 of row ``seq`` whose valid keys are ``keys`` [L_b, Hkv, D]."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: "BatchLayout",
               mixer: SparseAttentionParams) -> torch.Tensor:
        keys, values = self.update(k, v)  # [B, L, Hkv, D]
        # the attention computes in its inputs' dtype (the mixer casts q, k, v to autocast's already; CPU autocast
        # would recast ops inside the InfLLM-v2 reference). A cache filled under autocast and read without it, or
        # the reverse, keeps its dtype: q joins it, and the output returns in q's.
        with torch.autocast(q.device.type, enabled=False):
            return self._attend(q.to(keys.dtype), keys, values, layout, mixer).to(q.dtype)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: "BatchLayout",
                mixer: SparseAttentionParams) -> torch.Tensor:
        B, T = q.shape[:2]
        sparse_rows = [b for b in range(B) if mixer.uses_sparse(layout.valid_keys(b))]
        o = dense_causal_attention(q, keys, values, layout.key_valid, mixer.scale) if len(sparse_rows) < B \
            else torch.zeros_like(q)
        p = mixer.params
        for b in sparse_rows:
            n, t = layout.valid_keys(b), layout.valid_new(b, T)
            kb, vb = keys[b, layout.pad[b]:], values[b, layout.pad[b]:]  # index = absolute position
            ck1, ck2 = self.compressed(b, kb, p.kernel_size, p.kernel_stride)
            q_pos = torch.arange(n - t, n, device=q.device)
            o[b, T - t:] = infllm_v2_attention(q[b, T - t:], kb, vb, ck1, ck2, q_pos, p, mixer.scale, first_pos=n - t)
        return o


class NoCache(PaddedKV):
    """No storage (training, ``use_cache=False``): attention over this call's tokens only. Handles packed
    documents (``layout.doc_bounds``): each attends causally to itself, dense or InfLLM-v2 by its own length."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v

    def compressed(self, seq: int, keys: torch.Tensor, kernel_size: int, kernel_stride: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        ck1, ck2 = (compress_keys(keys, ks, st) for ks, st in compression_tiers(kernel_size, kernel_stride))
        return ck1, ck2

    def attend(self, q, k, v, layout, mixer) -> torch.Tensor:
        if layout.doc_bounds is None:
            return super().attend(q, k, v, layout, mixer)
        # packed documents (training): q, k, v come from this call in one dtype, as the mixer cast them
        docs, p = layout.doc_bounds, mixer.params
        sparse = [mixer.uses_sparse(b - a) for a, b in docs]
        dense = None
        if not all(sparse):  # every short document at once; long ones are replaced below
            bounds = [a for a, _ in docs] + [docs[-1][1]]
            dense = varlen_causal_attention(q[0], k[0], v[0], layout.cu_seqlens, bounds, mixer.scale)[None]
            if not any(sparse):
                return dense
        outs = []
        for (a, b), long_doc in zip(docs, sparse):
            if not long_doc:
                outs.append(dense[:, a:b])
                continue
            kd, vd = k[0, a:b], v[0, a:b]
            ck1, ck2 = self.compressed(0, kd, p.kernel_size, p.kernel_stride)
            pos = torch.arange(b - a, device=q.device)
            outs.append(infllm_v2_attention(q[0, a:b], kd, vd, ck1, ck2, pos, p, mixer.scale, first_pos=0)[None])
        return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# the HF cache
# ---------------------------------------------------------------------------------------------------------------
class _HFLayer(CacheLayerMixin):
    """transformers' per-layer cache interface, shared by both kinds: length, batch reindexing, no cropping."""

    is_croppable = False
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0  # tokens seen (the padded length), kept by HybridCache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1  # grows without bound

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a SALA cache cannot be cropped: a Lightning layer's state cannot forget "
                                      "tokens (assisted or speculative decoding that rolls back is not supported)")

    @abstractmethod
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` [B'] (int64; repeats allowed) in this order."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.batch_rows()
        if rows:
            self.select_rows(torch.arange(rows).repeat_interleave(repeats))

    @abstractmethod
    def batch_rows(self) -> int:
        """Batch size held (0 before the first token)."""


class LightningLayerCache(_HFLayer):
    """Recurrent state of one Lightning layer (:class:`LightningState`); ``state`` is None until the first call."""

    def __init__(self, state: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.state: torch.Tensor | None = state  # [B, H, K, V] fp32 / fp64 ([S, H, K, V] with rows)
        self.rows: torch.Tensor | None = rows  # [B] int64

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a Lightning layer keeps a recurrent state, not K/V: its mixer writes ``state``")

    def batch_rows(self) -> int:
        return 0 if self.state is None else self.state.shape[0]

    def select_rows(self, index: torch.Tensor) -> None:
        if self.rows is not None:
            raise ValueError("a pooled Lightning state (with rows) is reindexed through its rows, not here")
        if self.state is not None:
            self.state = self.state.index_select(0, index.to(self.state.device))

    def reset(self) -> None:
        self.state, self.length = None, 0

    @property
    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.numel() * self.state.element_size()


class SparseLayerCache(CompressedKeyTiers, PaddedKV, _HFLayer):
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
        super().__init__()
        self.keys: torch.Tensor | None = None  # [B, L, Hkv, D], a view of _k_buf
        self.values: torch.Tensor | None = None
        self._k_buf: torch.Tensor | None = None  # [B, capacity, Hkv, D]
        self._v_buf: torch.Tensor | None = None
        self.ck: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] = ({}, {})  # tier -> {seq: [n, Hkv, D]}

    @property
    def ck1(self) -> dict[int, torch.Tensor]:
        return self.ck[0]

    @property
    def ck2(self) -> dict[int, torch.Tensor]:
        return self.ck[1]

    def update(self, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` [B, T, Hkv, D]; return the whole cache [B, L, Hkv, D] (views: read, do not write)."""
        self.is_initialized = True
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

    # compressed keys: one growing tensor per sequence and tier (appends concatenate; windows are few)
    def stored_windows(self, seq: int, tier: int) -> int:
        have = self.ck[tier].get(seq)
        return 0 if have is None else have.shape[0]

    def store_windows(self, seq: int, tier: int, start: int, windows: torch.Tensor) -> None:
        have = self.ck[tier].get(seq)
        self.ck[tier][seq] = windows if have is None else torch.cat([have[:start], windows], dim=0)

    def read_windows(self, seq: int, tier: int, like: torch.Tensor) -> torch.Tensor:
        have = self.ck[tier].get(seq)
        return have if have is not None else like.new_empty(0, *like.shape[1:])

    def batch_rows(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    def select_rows(self, index: torch.Tensor) -> None:
        if self.keys is None:
            return
        index = index.to(self.keys.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self._k_buf = self._v_buf = None  # the next append reallocates
        picks = index.tolist()
        self.ck = tuple({b: tier[src] for b, src in enumerate(picks) if src in tier} for tier in self.ck)

    def reset(self) -> None:
        self.__init__()

    @property
    def nbytes(self) -> int:
        """Bytes of the live K/V and compressed keys (spare buffer room excluded)."""
        tensors = [self.keys, self.values, *self.ck[0].values(), *self.ck[1].values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class HybridCache(Cache):
    """A SALA model's cache for HF ``forward``/``generate``: one :class:`LightningLayerCache` or
    :class:`SparseLayerCache` per layer (``cache[i]``), and the padded length every sequence has reached."""

    def __init__(self, mixer_is_sparse: list[bool] | None = None, *, layers: list | None = None) -> None:
        if (mixer_is_sparse is None) == (layers is None):
            raise ValueError("pass exactly one of mixer_is_sparse (a new HF cache) or layers")
        if layers is None:
            layers = [SparseLayerCache() if sparse else LightningLayerCache() for sparse in mixer_is_sparse]
        super().__init__(layers=layers)
        self._length = 0

    is_compileable = False  # shapes grow every step

    @property
    def seq_length(self) -> int:
        """Padded length L of every sequence (all sequences advance together); set by the model after a call."""
        return self._length

    @seq_length.setter
    def seq_length(self, value: int) -> None:
        self._length = value
        for layer in self.layers:
            if isinstance(layer, _HFLayer):
                layer.length = value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def reset(self) -> None:
        super().reset()
        self.seq_length = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, idx: int):
        return self.layers[idx]
