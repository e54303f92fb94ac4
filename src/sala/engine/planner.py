"""Memory plan: bytes of weights, caches and activations for a config, batch and context, before anything is
allocated (spec §6.3). Pure arithmetic on the config; no torch.

Per sequence slot the engine allocates (see :mod:`sala.engine.kv_cache`):

* softmax-layer K/V: ``2 * Hkv * D * dtype`` bytes per token per layer (1 KiB at released shapes), for
  ``context + 1`` tokens (one scratch column);
* compressed keys (``sparse_attention`` on): ``(n1 + n2) * Hkv * D * dtype`` per layer, about 40 B per token;
* Lightning states: ``H * D * D * 4`` bytes per layer (2 MiB at released shapes), for ``batch + 1`` rows
  (one scratch row).

Activations are estimated for one prefill chunk (largest live set of one layer) plus a fixed attention
workspace and the decode logits/sampling buffers; ``overhead`` covers the CUDA context and allocator slack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sala.engine.types import MemoryPlanError
from sala.model import SALAConfig, expected_shapes
from sala.ops.infllm_v2 import num_windows

GiB = 2**30
MiB = 2**20
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
ATTENTION_WORKSPACE = 512 * MiB  # query-chunked attention scratch (reference ops use <= 256 MiB chunks)
RUNTIME_OVERHEAD = 1 * GiB  # CUDA context, cuBLAS workspaces, allocator fragmentation


def parse_tokens(text: str | int) -> int:
    """``"1M"`` -> 1048576, ``"256K"`` / ``"256k"`` -> 262144, ``"4096"`` -> 4096 (K and M are binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise ValueError(f"cannot read a token count from {text!r}; use e.g. 4096, 256K or 1M")
    value = float(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20}[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise ValueError(f"token count must be a positive whole number, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def num_parameters(config: SALAConfig) -> int:
    """Parameter count from the config's tensor table (9,477,203,968 at released shapes)."""
    total = 0
    for shape in expected_shapes(config).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Bytes the engine will need; ``fits`` is None when no budget was given."""

    batch: int
    context: int
    chunk: int
    dtype: str
    num_params: int
    weights_bytes: int
    kv_bytes: int
    compressed_bytes: int
    state_bytes: int
    activation_bytes: int
    overhead_bytes: int
    kv_bytes_per_token: int  # all softmax layers, one sequence
    state_bytes_per_seq: int  # all Lightning layers, one sequence
    budget_bytes: int | None = None
    utilization: float = 0.95

    @property
    def cache_bytes(self) -> int:
        return self.kv_bytes + self.compressed_bytes + self.state_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.cache_bytes + self.activation_bytes + self.overhead_bytes

    @property
    def usable_bytes(self) -> int | None:
        return None if self.budget_bytes is None else int(self.budget_bytes * self.utilization)

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_bytes <= self.usable_bytes

    def format(self) -> str:
        rows = [
            ("weights", self.weights_bytes, f"{self.num_params:,} params in {self.dtype}"),
            ("KV cache", self.kv_bytes, f"{format_bytes(self.kv_bytes_per_token)}/token/seq x {self.context:,} tokens x {self.batch} seq"),
            ("compressed keys", self.compressed_bytes, "ck1 + ck2 of the sparse layers"),
            ("Lightning state", self.state_bytes, f"{format_bytes(self.state_bytes_per_seq)}/seq x ({self.batch} + 1 scratch)"),
            ("activations", self.activation_bytes, f"prefill chunk {self.chunk:,} tokens + attention workspace + logits"),
            ("runtime overhead", self.overhead_bytes, "CUDA context, workspaces, fragmentation"),
            ("total", self.total_bytes, ""),
        ]
        lines = [f"{name:<17} {format_bytes(n):>12}  {note}" for name, n, note in rows]
        if self.budget_bytes is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"{'budget':<17} {format_bytes(self.usable_bytes):>12}  "
                         f"{self.utilization:.0%} of {format_bytes(self.budget_bytes)} -> {verdict}")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise :class:`MemoryPlanError` with the whole table when the plan does not fit its budget."""
        if self.fits is False:
            raise MemoryPlanError(
                f"batch {self.batch} x context {self.context:,} needs {format_bytes(self.total_bytes)} but the budget is "
                f"{format_bytes(self.usable_bytes)}; lower --batch/--context or the prefill chunk, or give more memory.\n"
                + self.format()
            )


def plan_memory(config: SALAConfig, *, batch: int, context: int, chunk: int = 8192, dtype: str = "bfloat16",
                budget_gib: float | None = None, utilization: float = 0.95, weights_bytes: int | None = None) -> MemoryPlan:
    """The engine's memory for ``batch`` sequences of ``context`` tokens each (see module docstring).

    ``weights_bytes`` overrides the parameter-count estimate (an engine passes the loaded model's size).
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if min(batch, context, chunk) < 1:
        raise ValueError(f"batch, context and chunk must be >= 1, got {batch}, {context}, {chunk}")
    c, elt = config, DTYPE_BYTES[dtype]
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    sparse, lightning = len(c.sparse_layers), c.num_hidden_layers - len(c.sparse_layers)
    params = num_parameters(c)
    kv_token = sparse * 2 * Hkv * D * elt
    kv = batch * (context + 1) * kv_token
    compressed = 0
    if c.sparse_attention:
        ks, st = c.sparse_config["kernel_size"], c.sparse_config["kernel_stride"]
        windows = num_windows(context, ks, st) + num_windows(context, 4 * ks, 4 * st)
        compressed = batch * sparse * windows * Hkv * D * elt
    state_seq = lightning * H * D * D * max(4, elt)  # fp32 state (fp64 for fp64 models)
    state = (batch + 1) * state_seq
    t = min(chunk, context)
    width = H * D
    per_token = elt * (4 * c.hidden_size + 3 * c.intermediate_size + 6 * width) + 4 * max(4, elt) * width
    activations = (t + batch) * per_token + ATTENTION_WORKSPACE + batch * c.vocab_size * 24
    return MemoryPlan(
        batch=batch, context=context, chunk=t, dtype=dtype, num_params=params,
        weights_bytes=weights_bytes if weights_bytes is not None else params * elt,
        kv_bytes=kv, compressed_bytes=compressed, state_bytes=state, activation_bytes=activations,
        overhead_bytes=RUNTIME_OVERHEAD, kv_bytes_per_token=kv_token, state_bytes_per_seq=state_seq,
        budget_bytes=None if budget_gib is None else int(budget_gib * GiB), utilization=utilization,
    )


def max_context(config: SALAConfig, *, batch: int, budget_gib: float, chunk: int = 8192, dtype: str = "bfloat16",
                utilization: float = 0.95) -> int:
    """Largest context (tokens per sequence) whose plan fits ``budget_gib`` at ``batch``; 0 if none does."""
    lo, hi = 0, 1
    fits = lambda n: plan_memory(config, batch=batch, context=n, chunk=chunk, dtype=dtype, budget_gib=budget_gib,
                                 utilization=utilization).fits
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 2**34:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
