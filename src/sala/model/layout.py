"""``BatchLayout``: the attention metadata of one forward call, computed once and shared by every layer.

HF ``forward``/``generate`` derive it from ``attention_mask`` (left padding) or ``cu_seqlens`` (packed documents);
the engine builds it itself (one token per sequence at per-row positions) and hands it to the same forward.
Which K/V a softmax layer reads and where it writes is the cache's business (:mod:`sala.model.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchLayout:
    """Where each sequence's tokens sit in a call.

    positions [B, T] absolute positions (pads clamped to 0); ``new_valid`` [B, T] bool (None: no padding);
    ``key_valid`` [B, total] bool over the whole padded key range (None: no padding);
    ``pad`` left-pad count of each row; ``total`` the padded length L after this call.
    Packed (varlen) input: B = 1 and ``cu_seqlens`` [D+1] marks D independent documents of the one row; positions
    restart at 0 in each, Lightning states start at zero in each and attention never crosses a boundary.
    """

    positions: torch.Tensor
    new_valid: torch.Tensor | None
    key_valid: torch.Tensor | None
    pad: list[int]
    total: int
    cu_seqlens: torch.Tensor | None = None
    doc_bounds: list[tuple[int, int]] | None = None  # [(start, end)] of each document, from cu_seqlens

    def valid_keys(self, b: int) -> int:
        return self.total - self.pad[b]

    def valid_new(self, b: int, num_new: int) -> int:
        return min(num_new, self.valid_keys(b))

    @classmethod
    def decode(cls, positions: torch.Tensor) -> "BatchLayout":
        """One new token per row at ``positions`` [N] (a serving engine's decode step): no padding, no host data
        (the cache knows each row's length), so the call needs no host sync."""
        return cls(positions[:, None], None, None, [0] * positions.shape[0], 0)
