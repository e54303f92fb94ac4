"""The engine: requests in, tokens out, one ``step()`` at a time (schedule -> run -> sample -> update).

``Engine`` owns the preallocated :class:`~sala.engine.kv_cache.StaticCache` (sized by the memory plan and
refused before allocation if it cannot fit), the :class:`~sala.engine.runner.ModelRunner` and the
:class:`~sala.engine.scheduler.Scheduler`. It works on token ids; with a tokenizer it also accepts text
prompts, streams text deltas and honours stop strings. It is single-threaded: the server drives it from one
thread (:mod:`sala.engine.server.async_engine`).

Example::

    engine = Engine(model, tokenizer, EngineConfig(max_batch=4, max_seq_len=8192))
    [c] = engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sala.engine.detok import TextStream
from sala.engine.kv_cache import StaticCache
from sala.engine.loader import dtype_name, stop_token_ids
from sala.engine.planner import MemoryPlan, plan_memory
from sala.engine.runner import ModelRunner
from sala.engine.sampling import make_generator, sample
from sala.engine.scheduler import Scheduler
from sala.engine.types import (EngineConfig, FinishReason, NonFiniteLogitsError, RequestError, RequestOutput,
                               SamplingParams)
from sala.model import SALAForCausalLM

logger = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]
ProgressCallback = Callable[[str, int, int], None]  # (request id, prompt tokens done, prompt tokens)


@dataclass
class Completion:
    """A finished request: ids, text and timings (seconds since it was added)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    ttft: float
    latency: float
    error: str | None = None
    """Why the request failed (finish_reason ERROR), e.g. non-finite logits."""

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / (self.latency - self.ttft) if n > 0 and self.latency > self.ttft else float("nan")


@dataclass
class _Live:
    """Engine-side state of a running request."""

    request_id: str
    prompt_ids: list[int]
    prompt: torch.Tensor  # [T] on the model device
    params: SamplingParams
    generator: torch.Generator
    stop_ids: set[int]
    stream: TextStream | None
    seen: torch.Tensor | None  # [V] bool, tokens seen (repetition penalty only)
    on_output: OutputCallback | None
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    error: str | None = None

    def completion(self, reason: FinishReason) -> Completion:
        return Completion(self.request_id, self.prompt_ids, self.output_ids, self.text, reason,
                          self.first_token if self.first_token is not None else float("nan"),
                          time.perf_counter() - self.arrival, self.error)


class Engine:
    """Continuous-batching generation over a SALA model (see module docstring)."""

    def __init__(self, model: SALAForCausalLM, tokenizer: Any | None = None, config: EngineConfig | None = None, *,
                 on_prefill_progress: ProgressCallback | None = None) -> None:
        self.config = config or EngineConfig()
        self.model, self.tokenizer = model.eval(), tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        mc = model.config
        if self.config.max_seq_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_seq_len {self.config.max_seq_len} exceeds the model's max_position_embeddings "
                f"{mc.max_position_embeddings}; load the model with a larger max_position_embeddings (RoPE is analytic)"
            )
        self.plan = self.memory_plan()
        logger.info("memory plan:\n%s", self.plan.format())
        self.plan.check()  # before any cache is allocated
        model.fuse_projections()  # before the cache: fusing copies one layer's projections at a time
        self.cache = StaticCache(mc, self.config.max_batch, self.config.max_seq_len, self.dtype, self.device)
        self.runner = ModelRunner(model, self.cache, cuda_graphs=self.config.cuda_graphs,
                                  graph_batch_sizes=self.config.graph_batch_sizes,
                                  fused_attention=self.config.fused_attention)
        self.scheduler = Scheduler(self.config.max_batch, self.config.max_seq_len, self.config.prefill_chunk)
        self.eos_ids = stop_token_ids(model, tokenizer)
        self.on_prefill_progress = on_prefill_progress
        self._live: dict[str, _Live] = {}
        self._collect: dict[str, Completion | None] = {}  # requests of generate() -> their result once finished
        self._ids = itertools.count()

    def memory_plan(self) -> MemoryPlan:
        budget = self.config.memory_budget_gib
        if budget is None and self.device.type == "cuda":
            budget = torch.cuda.get_device_properties(self.device).total_memory / 2**30
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return plan_memory(self.model.config, batch=self.config.max_batch, context=self.config.max_seq_len,
                           chunk=self.config.prefill_chunk, dtype=dtype_name(self.dtype), budget_gib=budget,
                           utilization=self.config.memory_utilization, weights_bytes=weights)

    # ---- requests ----------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("a text prompt needs a tokenizer; pass token ids instead", "no_tokenizer", "prompt")
        return list(self.tokenizer(text)["input_ids"])

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
                    on_output: OutputCallback | None = None) -> str:
        """Queue a request (text or token ids); returns its id. Raises :class:`RequestError` if it cannot run."""
        params = params or SamplingParams()
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is out of range for vocab_size {vocab}", "invalid_token_id", "prompt")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; use stop_token_ids", "no_tokenizer", "stop")
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:  # they index the logits when banned before min_tokens: out of range would fail the whole step
            raise RequestError(f"stop token id {bad[0]} is out of range for vocab_size {vocab}", "invalid_stop", "stop_token_ids")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        # everything that can fail comes before scheduler.add: a request known to the scheduler but not in
        # self._live would make every later step fail
        stream = TextStream(self.tokenizer, ids, params.stop) if self.tokenizer is not None else None
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            seen[torch.tensor(ids, device=self.device)] = True
        stops = set() if params.ignore_eos else set(self.eos_ids)
        live = _Live(rid, ids, torch.tensor(ids, dtype=torch.long, device=self.device), params,
                     make_generator(params.seed), stops | set(params.stop_token_ids), stream, seen, on_output)
        self.scheduler.add(rid, len(ids), params.max_tokens)  # validates the context limit
        self._live[rid] = live
        return rid

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request between steps and free its slot; returns its final output (None if unknown)."""
        live = self._live.pop(request_id, None)
        self.scheduler.abort(request_id)
        if live is None:
            return None
        out = RequestOutput(request_id, [], "", True, FinishReason.ABORT, len(live.prompt_ids), len(live.output_ids))
        if live.on_output is not None:
            live.on_output(out)
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict[str, int]:
        return {"running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting,
                "free_slots": len(self.scheduler.free_slots), "max_batch": self.config.max_batch,
                "max_seq_len": self.config.max_seq_len}

    # ---- one step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns one output per request that got a token (finished ones flagged)."""
        sched = self.scheduler.schedule()
        for _, slot in sched.admitted:
            self.cache.reset(slot)
        rows: list[tuple[_Live, torch.Tensor]] = []
        for chunk in sched.prefill:
            live = self._live[chunk.request_id]
            ids = live.prompt[chunk.start : chunk.start + chunk.num_tokens]
            logits = self.runner.prefill(chunk.slot, ids, want_logits=chunk.last)
            if self.on_prefill_progress is not None:
                self.on_prefill_progress(chunk.request_id, chunk.start + chunk.num_tokens, len(live.prompt_ids))
            if chunk.last:
                rows.append((live, logits[None]))
        if sched.decode:
            lives = [self._live[e.request_id] for e in sched.decode]
            tokens = torch.tensor([lv.output_ids[-1] for lv in lives], dtype=torch.long, device=self.device)
            logits = self.runner.decode([e.slot for e in sched.decode], [e.position for e in sched.decode], tokens)
            rows.extend((lv, logits[i : i + 1]) for i, lv in enumerate(lives))
        outputs, stopped = self._sample(rows)
        finished = dict(self.scheduler.update(sched, stopped))
        for out in outputs:
            live = self._live[out.request_id]
            reason = finished.get(out.request_id)
            if out.error is not None:
                reason = FinishReason.ERROR  # the scheduler freed it as stopped
            if reason is not None:
                if live.stream is not None and out.error is None:
                    tail = live.stream.flush()
                    out.text += tail
                    live.text += tail
                out.finished, out.finish_reason = True, reason
                if out.request_id in self._collect:
                    self._collect[out.request_id] = live.completion(reason)
                del self._live[out.request_id]
            if live.on_output is not None:
                live.on_output(out)
        return outputs

    def _sample(self, rows: list[tuple[_Live, torch.Tensor]]) -> tuple[list[RequestOutput], set[str]]:
        if not rows:
            return [], set()
        logits = torch.cat([lg for _, lg in rows])  # [N, V]
        # NaN/inf logits (non-finite weights, an overflow) would be sampled as an arbitrary id and stream garbage with
        # success; such a row ends its request with an error instead, the others go on (issue 17 item 5)
        finite = torch.isfinite(logits).all(dim=-1).tolist()  # [N]; a host sync, like the tokens' below
        outputs, stopped = [], set()
        for (live, _), ok in zip(rows, finite):
            if not ok:
                live.error = (f"the model produced non-finite logits (NaN/inf) for request {live.request_id} at output "
                              f"token {len(live.output_ids)}; check the checkpoint's weights (sala convert/train "
                              "--check-weights) and its config's scales")
                logger.error("%s", live.error)
                stopped.add(live.request_id)
                outputs.append(RequestOutput(live.request_id, [], "", prompt_tokens=len(live.prompt_ids),
                                             completion_tokens=len(live.output_ids), error=live.error))
        if stopped:
            keep = [i for i, ok in enumerate(finite) if ok]
            rows, logits = [rows[i] for i in keep], logits[keep]
        if not rows:
            return outputs, stopped
        lives = [lv for lv, _ in rows]
        banned = [sorted(lv.stop_ids) if len(lv.output_ids) < lv.params.min_tokens else [] for lv in lives]
        tokens = sample(logits, [lv.params for lv in lives], [lv.generator for lv in lives], [lv.seen for lv in lives],
                        banned)
        now = time.perf_counter()
        for live, tok in zip(lives, tokens):
            live.output_ids.append(tok)
            if live.first_token is None:
                live.first_token = now - live.arrival
            if live.seen is not None:
                live.seen[tok] = True
            text = ""
            if tok in live.stop_ids:
                stopped.add(live.request_id)  # the stop token is kept in token_ids, not in the text
            elif live.stream is not None:
                text = live.stream.push(tok)
                if live.stream.stopped:
                    stopped.add(live.request_id)
            live.text += text
            outputs.append(RequestOutput(live.request_id, [tok], text, prompt_tokens=len(live.prompt_ids),
                                         completion_tokens=len(live.output_ids)))
        return outputs, stopped

    # ---- convenience ---------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 on_output: OutputCallback | None = None) -> list[Completion]:
        """Run ``prompts`` together to completion (continuous batching over ``max_batch`` slots); results in order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        rids: list[str] = []
        try:
            for prompt, p in zip(prompts, plist):
                rids.append(self.add_request(prompt, p, on_output=on_output))
                self._collect[rids[-1]] = None
            while any(r in self._live for r in rids):
                self.step()
        except BaseException:
            for r in rids:
                if r in self._live:
                    self.abort(r)
            raise
        finally:
            results = [self._collect.pop(r, None) for r in rids]
        failed = [c for c in results if c is not None and c.error is not None]
        if failed:
            raise NonFiniteLogitsError(failed[0].error)
        return results
