"""Plain data exchanged inside the engine: sampling parameters, engine sizing, requests, per-step outputs, errors.

No logic beyond validation lives here (SGLang ``io_struct`` style); no torch import, so the scheduler and the
server's protocol layer can use these types without touching tensors.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5
"""Temperatures under this pick the argmax (vLLM's ``_SAMPLING_EPS``): ``logits / 1e-300`` overflows fp32 to
inf/NaN, which the sampler then turned into the last vocabulary id (issue 17 item 5)."""


class EngineError(RuntimeError):
    """Base class of engine failures that are not the caller's fault."""


class NonFiniteLogitsError(EngineError):
    """A step produced NaN/inf logits for a request (non-finite weights, an overflow): that request ends with this
    error instead of streaming an arbitrary token; the engine keeps serving the others."""


class RequestError(ValueError):
    """A request the engine refuses (too long, bad parameters). ``code`` is a stable machine-readable tag."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


class MemoryPlanError(ValueError):
    """The engine's caches and weights would not fit the memory budget; raised before anything is allocated."""


@dataclass(kw_only=True)
class SamplingParams:
    """How to pick tokens and when to stop, for one request."""

    max_tokens: int = 256
    """Most new tokens to generate (>= 1)."""
    temperature: float = 1.0
    """Softmax temperature; 0 (or anything under ``GREEDY_BELOW``) means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables."""
    repetition_penalty: float = 1.0
    """HF/CTRL penalty on tokens already in prompt or output: logit / p if positive, logit * p otherwise (> 0)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the output text is cut before the first occurrence (needs a tokenizer)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop token ids, on top of the model's EOS ids (unless ``ignore_eos``)."""
    ignore_eos: bool = False
    """Keep generating past EOS tokens (benchmarks)."""
    seed: int | None = None
    """Seed of this request's private generator: same seed, same prompt, same tokens, whatever the batch."""
    min_tokens: int = 0
    """Suppress stop tokens until this many tokens have been generated."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "invalid_max_tokens", "max_tokens")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}", "invalid_temperature",
                               "temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "invalid_top_p", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}", "invalid_top_k", "top_k")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise RequestError(
                f"repetition_penalty must be a finite number > 0 (1 disables), got {self.repetition_penalty!r}", "invalid_repetition_penalty",
                "repetition_penalty",
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop strings must be non-empty strings, got {self.stop!r}", "invalid_stop", "stop")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise RequestError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}", "invalid_stop", "stop_token_ids")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64):
            raise RequestError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}", "invalid_seed", "seed")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}", "invalid_min_tokens", "min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(kw_only=True)
class EngineConfig:
    """Sizing of an engine; every cache is allocated once from these numbers (see :mod:`sala.engine.planner`)."""

    max_batch: int = 1
    """Sequence slots: how many requests decode together."""
    max_seq_len: int = 4096
    """Capacity of each slot in tokens (prompt + generated)."""
    prefill_chunk: int = 8192
    """Prompt tokens processed per step (bounds activation memory at any prompt length)."""
    memory_budget_gib: float | None = None
    """Memory the plan must fit in; None: the device's total memory on CUDA, unchecked on CPU."""
    memory_utilization: float = 0.95
    """Fraction of the budget the plan may use (the rest covers allocator fragmentation and the CUDA context)."""
    cuda_graphs: bool = True
    """Capture the decode step in CUDA graphs (CUDA only; ignored on CPU)."""
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    """Batch buckets for CUDA-graph decode; a step pads its batch up to the next bucket."""
    fused_attention: bool | None = None
    """Run the sparse layers' decode attention as one batched kernel, so one CUDA graph holds the whole step
    (True), or row by row with host lengths, eagerly (False; no CUDA graph). None: fused on CUDA, eager elsewhere
    (on CPU there is no launch overhead to save)."""

    def __post_init__(self) -> None:
        if self.fused_attention not in (None, True, False):
            raise ValueError(f"fused_attention must be True, False or None (auto), got {self.fused_attention!r}")
        for name in ("max_batch", "max_seq_len", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.memory_budget_gib is not None and not self.memory_budget_gib > 0:
            raise ValueError(f"EngineConfig.memory_budget_gib must be > 0, got {self.memory_budget_gib!r}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"EngineConfig.memory_utilization must be in (0, 1], got {self.memory_utilization!r}")
        if not self.graph_batch_sizes or any(b < 1 for b in self.graph_batch_sizes):
            raise ValueError(f"EngineConfig.graph_batch_sizes must be positive, got {self.graph_batch_sizes!r}")


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens reached (or the slot is full)
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the request failed (``RequestOutput.error`` says why); the engine runs on


@dataclass
class RequestOutput:
    """What one engine step produced for one request (also the streaming callback's argument).

    ``token_ids``/``text`` are this step's new pieces (text is empty without a tokenizer, and may lag a token
    while a multi-byte character or a possible stop string is pending); ``finished`` is set on the last one.
    ``error`` is set (with ``finish_reason`` ERROR and no token) when the request failed, e.g. non-finite logits.
    """

    request_id: str
    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


DECODE_ATTENTION_MODES = {"auto": None, "fused": True, "eager": False, "pieces": False}  # pieces: the old name


def fused_flag(mode: str) -> bool | None:
    """``--decode-attention`` value -> ``EngineConfig.fused_attention`` (None = auto)."""
    if mode not in DECODE_ATTENTION_MODES:
        raise ValueError(f"decode attention must be one of {sorted(DECODE_ATTENTION_MODES)}, got {mode!r}")
    return DECODE_ATTENTION_MODES[mode]
