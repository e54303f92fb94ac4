"""Projections that read the same input, computed by one GEMM (inference): q/k/v(/gate) of a mixer, gate/up of
an MLP.

:class:`FusedRows` holds the mechanism: each module's row-indexed tensors (weight, bias, fp8 scales) are
concatenated once and each module is re-pointed at a row-block *view* of the result, so memory is not doubled and
``load_state_dict`` or in-place updates stay visible to both paths; one call computes every module's output as a
slice of one wide result. A block that no longer serves its modules (a module swapped, a tensor replaced by
``model.to(...)``) is dropped and the caller runs the modules one by one. Subclasses say which module type they
fuse, which tensors, how a module is re-pointed and what the one call is; :func:`fuse` picks the subclass.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

_KINDS: list[type["FusedRows"]] = []


class FusedRows:
    MODULE: ClassVar[type[nn.Module]]
    """The exact module type this fusion serves (subclasses, e.g. adapters, add terms of their own)."""
    TENSORS: ClassVar[tuple[str, ...]]
    """Row-indexed tensors concatenated per module; an absent one (a missing bias) is zeros when others have it."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        _KINDS.append(cls)

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = list(modules)
        self.sizes = [m.out_features for m in modules]
        blocks: dict[str, torch.Tensor | None] = {}
        # plain tensors even under inference_mode: the modules' tensors become views of them and stay usable
        # (training, load_state_dict) outside it
        with torch.inference_mode(False), torch.no_grad():
            for name in self.TENSORS:
                parts = [getattr(m, name) for m in modules]
                present = next((t for t in parts if t is not None), None)
                blocks[name] = None if present is None else torch.cat(
                    [t if t is not None else present.new_zeros(m.out_features, *present.shape[1:])
                     for t, m in zip(parts, modules)])
        start = 0
        for m in modules:
            rows = slice(start, start + m.out_features)
            for name, block in blocks.items():
                if block is not None and getattr(m, name) is not None:
                    self._point(m, name, block[rows])
            start += m.out_features
        self.blocks: dict[str, torch.Tensor | None] | None = blocks
        self._ptrs = self._pointers()

    @property
    def weight(self) -> torch.Tensor | None:
        """The concatenated weight block, None once dropped."""
        return None if self.blocks is None else self.blocks["weight"]

    def _point(self, module: nn.Module, name: str, view: torch.Tensor) -> None:
        raise NotImplementedError

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., sum of out_features] from ``self.blocks``."""
        raise NotImplementedError

    def _usable(self) -> bool:
        """Whether the fused call may run now (the bf16 one steps aside under autograd)."""
        return True

    @classmethod
    def fusable(cls, modules: list[nn.Module]) -> bool:
        """Exactly ``MODULE`` each, one dtype and device per tensor name (``torch.cat`` would silently promote)."""
        if not modules or any(type(m) is not cls.MODULE for m in modules):
            return False
        for name in cls.TENSORS:
            tensors = [getattr(m, name) for m in modules if getattr(m, name) is not None]
            if len({(t.dtype, t.device) for t in tensors}) > 1:
                return False
        return len({t.device for m in modules for n in cls.TENSORS if (t := getattr(m, n)) is not None}) == 1

    def _pointers(self) -> list[tuple]:
        return [tuple(None if (t := getattr(m, n)) is None else t.data_ptr() for n in self.TENSORS)
                for m in self.modules]

    def serves(self, modules: list[nn.Module]) -> bool:
        """Still the block of exactly these modules' current tensors."""
        return (self.blocks is not None and len(modules) == len(self.modules)
                and all(a is b for a, b in zip(modules, self.modules)) and self._pointers() == self._ptrs)

    def __call__(self, x: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor] | None:
        """x: [..., in] -> one [..., out_i] view per module (slices of one result), or None (run them one by one)."""
        if self.blocks is None or not self._usable():
            return None
        if not self.serves(modules):
            self.blocks = None  # replaced: free the stale block, stay unfused until fused again
            return None
        return list(self._compute(x).split(self.sizes, dim=-1))


def fuse(current: FusedRows | None, modules: list[nn.Module]) -> FusedRows | None:
    """The fusion to keep for ``modules``: ``current`` if it still serves them, else a new one of the kind whose
    ``MODULE`` they all are (None when there is none, or their dtypes or devices differ)."""
    if current is not None and current.serves(modules):
        return current
    for kind in _KINDS:
        if kind.fusable(modules):
            return kind(modules)
    return None
