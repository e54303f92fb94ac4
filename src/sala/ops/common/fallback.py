"""Where a Triton op hands its inputs to the PyTorch reference: a once-per-op log line for fp64 inputs, and the loop
over the sequences of packed (varlen) inputs for references that take one sequence (or batch) at a time."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger("sala.ops")


@functools.cache
def log_fp64_fallback(op: str, reason: str) -> None:
    """Say once per process, at INFO, that ``op`` runs the PyTorch reference for fp64 inputs, and why."""
    logger.info("%s: fp64 inputs run the PyTorch reference (%s)", op, reason)


def map_sequences(
    fn: Callable[..., tuple],
    cu_seqlens: torch.Tensor,
    packed: Sequence[torch.Tensor],
    per_seq: Sequence[torch.Tensor | None] = (),
    cat_dims: Sequence[int] = (1, 0),
) -> tuple:
    """Run ``fn`` on each sequence of a packed batch and concatenate what it returns.

    packed: tensors [1, sum T, ...], cut along dim 1 at ``cu_seqlens`` [N+1]; per_seq: tensors [N, ...] (or None),
    of which sequence n gets row n as [1, ...]. ``fn(*packed pieces, *per_seq rows)`` returns a tuple; its i-th
    entries are concatenated along ``cat_dims[i]`` (all None stays None).
    """
    bounds = cu_seqlens.tolist()
    results = []
    for n, (s, e) in enumerate(zip(bounds, bounds[1:])):
        pieces = [x[:, s:e] for x in packed]
        rows = [None if x is None else x[n : n + 1] for x in per_seq]
        results.append(fn(*pieces, *rows))
    return tuple(
        None if parts[0] is None else torch.cat(parts, dim) for parts, dim in zip(zip(*results), cat_dims)
    )
