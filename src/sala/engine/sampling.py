"""Token selection for a batch of rows with per-row parameters (greedy, temperature, top-k, top-p,
repetition penalty), each sampled row drawing from its request's own seeded generator.

Sampling is inverse-CDF with one uniform number per row drawn on the host from the request's
``torch.Generator``: the same seed gives the same tokens whatever else is in the batch, and only one tiny
host-to-device copy happens per step. Filtering runs on the logits' device.
"""

from __future__ import annotations

import os

import torch

from sala.engine.types import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A private CPU generator: seeded when ``seed`` is given, else from OS entropy."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """In place on one row. logits: [V]; seen: [V] bool (token in prompt or output).
    Seen tokens get logit / p where positive, logit * p otherwise (HF/CTRL rule)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits.copy_(torch.where(seen, penalised, logits))


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k / top-p remove. logits: [N, V]; top_k: [N] (0 = off); top_p: [N] (1 = off).
    The most likely token always survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    remove = rank >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly ahead of each token
    remove |= before >= top_p[:, None]
    remove[:, 0] = False
    mask = torch.zeros_like(remove).scatter_(-1, order, remove)
    return logits.masked_fill(mask, float("-inf"))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           seen: list[torch.Tensor | None], banned: list[list[int]]) -> list[int]:
    """Pick one token per row.

    logits: [N, V] fp32 (modified in place); params/generators: per row; seen: per row a [V] bool mask of the
    tokens already in prompt + output (None without a repetition penalty); banned: per row token ids that may not
    be picked now (stop tokens before ``min_tokens``). Returns N token ids.
    """
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0 and seen[i] is not None:
            apply_repetition_penalty(logits[i], seen[i], p.repetition_penalty)
        if banned[i]:
            logits[i, banned[i]] = float("-inf")
    out = logits.argmax(dim=-1)  # greedy rows keep this
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = logits[rows] / torch.tensor([params[i].temperature for i in rows], device=logits.device)[:, None]
        top_k = torch.tensor([params[i].top_k for i in rows], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device, dtype=sub.dtype)
        if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):
            sub = filter_top_k_top_p(sub, top_k, top_p)
        cdf = torch.softmax(sub, dim=-1, dtype=torch.float64).cumsum(dim=-1)  # [R, V]
        u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64) for i in rows]).to(logits.device)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)
        out[rows] = picked
    return out.tolist()
