"""Continuous-batching scheduler: pure bookkeeping over integers, no torch (vLLM's scheduler split).

Each step the scheduler hands out

* one **decode** token to every running sequence whose prompt is done, and
* **prefill** chunks, first come first served, from a budget of ``prefill_chunk`` prompt tokens per step,

so a long prompt is consumed a chunk at a time while other streams keep decoding. Waiting requests get the
lowest free slot; a slot holds ``max_seq_len`` tokens, so admission never runs out of cache. ``update``
advances the counters once the runner and sampler have done the step's work; ``abort`` is applied between
steps, never during one.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from sala.engine.types import FinishReason, RequestError


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class SeqState:
    """The scheduler's view of one request."""

    request_id: str
    prompt_len: int
    max_tokens: int
    phase: Phase = Phase.WAITING
    slot: int | None = None
    num_computed: int = 0  # tokens already in the cache
    num_generated: int = 0  # tokens sampled so far (the last one is not yet in the cache)


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens ``[start, start + num_tokens)`` of a request go into ``slot``; ``last``: the prompt ends here."""

    request_id: str
    slot: int
    start: int
    num_tokens: int
    last: bool


@dataclass(frozen=True)
class DecodeEntry:
    """The request's latest token is written at ``position`` of ``slot`` and the next one sampled."""

    request_id: str
    slot: int
    position: int


@dataclass
class SchedulerOutput:
    admitted: list[tuple[str, int]] = field(default_factory=list)  # (request id, slot) newly given a slot
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[DecodeEntry] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode)


class Scheduler:
    """FCFS admission into ``max_batch`` slots, chunked prefill under a per-step token budget, batched decode."""

    def __init__(self, max_batch: int, max_seq_len: int, prefill_chunk: int) -> None:
        if min(max_batch, max_seq_len, prefill_chunk) < 1:
            raise ValueError(f"max_batch, max_seq_len and prefill_chunk must be >= 1, got {max_batch}, {max_seq_len}, {prefill_chunk}")
        self.max_batch, self.max_seq_len, self.prefill_chunk = max_batch, max_seq_len, prefill_chunk
        self.waiting: deque[SeqState] = deque()
        self.running: dict[str, SeqState] = {}  # insertion order = admission order
        self.free_slots: list[int] = list(range(max_batch))

    # ---- requests ----------------------------------------------------------------------------------------------
    def add(self, request_id: str, prompt_len: int, max_tokens: int) -> None:
        """Queue a request; raises :class:`RequestError` when it can never fit a slot."""
        if request_id in self.running or any(s.request_id == request_id for s in self.waiting):
            raise RequestError(f"request id {request_id!r} is already in use", "duplicate_request_id")
        if prompt_len < 1:
            raise RequestError("the prompt is empty: at least one token is needed", "empty_prompt", "prompt")
        if prompt_len + max_tokens > self.max_seq_len:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} tokens exceeds "
                f"the context capacity of {self.max_seq_len} tokens per sequence; shorten the prompt, lower max_tokens, "
                "or start the engine with a larger context",
                "context_length_exceeded", "max_tokens" if prompt_len < self.max_seq_len else "prompt",
            )
        self.waiting.append(SeqState(request_id, prompt_len, max_tokens))

    def abort(self, request_id: str) -> int | None:
        """Drop a request; returns the slot it freed (None if it was waiting or unknown)."""
        for s in self.waiting:
            if s.request_id == request_id:
                self.waiting.remove(s)
                return None
        state = self.running.pop(request_id, None)
        if state is None:
            return None
        self._release(state)
        return state.slot

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        while self.waiting and self.free_slots:
            state = self.waiting.popleft()
            state.slot = self.free_slots.pop(0)
            state.phase = Phase.PREFILL
            self.running[state.request_id] = state
            out.admitted.append((state.request_id, state.slot))
        budget = self.prefill_chunk
        for state in self.running.values():
            if state.phase is Phase.DECODE:
                out.decode.append(DecodeEntry(state.request_id, state.slot, state.num_computed))
            elif budget > 0:
                n = min(budget, state.prompt_len - state.num_computed)
                out.prefill.append(PrefillChunk(state.request_id, state.slot, state.num_computed, n,
                                                state.num_computed + n == state.prompt_len))
                budget -= n
        return out

    def update(self, out: SchedulerOutput, stopped: Iterable[str] = ()) -> list[tuple[str, FinishReason]]:
        """Advance counters after ``out`` ran; ``stopped`` hit a stop token/string. Returns finished requests."""
        for chunk in out.prefill:
            state = self.running.get(chunk.request_id)
            if state is None:  # aborted while the step ran
                continue
            state.num_computed += chunk.num_tokens
            if chunk.last:
                state.phase, state.num_generated = Phase.DECODE, 1
        for entry in out.decode:
            state = self.running.get(entry.request_id)
            if state is not None:
                state.num_computed += 1
                state.num_generated += 1
        stopped = set(stopped)
        finished: list[tuple[str, FinishReason]] = []
        for rid, state in list(self.running.items()):
            if rid in stopped:
                finished.append((rid, FinishReason.STOP))
            elif state.phase is Phase.DECODE and state.num_generated >= state.max_tokens:
                finished.append((rid, FinishReason.LENGTH))
            else:
                continue
            del self.running[rid]
            self._release(state)
        return finished

    def _release(self, state: SeqState) -> None:
        if state.slot is not None:
            self.free_slots.append(state.slot)
            self.free_slots.sort()
