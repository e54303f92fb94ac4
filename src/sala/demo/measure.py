"""What the demo measures, with the eval room's own pieces: chat answers (greedy, chat template, streamed through
a callback), needle in a haystack (``sala.eval.niah`` samples), held-out perplexity (``sala.eval.ppl``), and
prefill / decode time and cache memory as the context grows.

Works on loaded models and token ids; knows nothing about the display or the report files.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from sala.eval.models import eos_ids, greedy_generate, model_device, new_cache, prefill_chunks
from sala.eval.niah import NiahSample, make_sample, words_per_token
from sala.eval.ppl import score_text
from sala.eval.prompts import Haystack, PromptFormat
from sala.eval.scoring import exact_match
from sala.model import SALAForCausalLM
from sala.model.cache import LightningLayerCache, SparseLayerCache

logger = logging.getLogger(__name__)

NIAH_ANSWER_TOKENS = 16  # as `sala eval niah`: the number is 7 digits, the rest is slack for the model's words


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA launches are asynchronous: time only finished work


# ---- chat ---------------------------------------------------------------------------------------------------------
def chat_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, *, chunk: int = 2048,
                on_text: Callable[[str], None] | None = None) -> dict:
    """Greedy answer to one user message rendered with the tokenizer's chat template; ``on_text(answer so far)``
    after every token (streaming). -> {answer, tokens, seconds, tokens_per_s}."""
    ids = PromptFormat(tokenizer).ids(prompt, "")
    dev = model_device(model)

    def stream(tokens: list[int]) -> bool:
        if on_text is not None:
            on_text(tokenizer.decode(tokens, skip_special_tokens=True))
        return False

    _sync(dev)
    t0 = time.perf_counter()
    out = greedy_generate(model, ids, max_new_tokens, chunk=chunk, stop_ids=eos_ids(model, tokenizer), should_stop=stream)
    _sync(dev)
    seconds = time.perf_counter() - t0
    answer = tokenizer.decode(out, skip_special_tokens=True).strip()
    return {"answer": answer, "prompt_tokens": len(ids), "tokens": len(out), "seconds": seconds,
            "tokens_per_s": len(out) / seconds if seconds > 0 else math.nan}


# ---- needle in a haystack -----------------------------------------------------------------------------------------
def niah_samples(hay: Haystack, tokenizer: Any, lengths: list[int], depths: list[float], samples: int,
                 seed: int) -> list[NiahSample]:
    """The prompts, built once for both models (they share the tokenizer), exactly as ``sala eval niah``."""
    fmt = PromptFormat(tokenizer)
    wpt = words_per_token(hay, tokenizer)
    return [make_sample(hay, fmt, L, d, i, seed=seed, answer_tokens=NIAH_ANSWER_TOKENS, wpt=wpt)
            for L in lengths for d in depths for i in range(samples)]


def niah_answer(model: Any, tokenizer: Any, sample: NiahSample, window: int | None, chunk: int) -> dict:
    """One needle. Past the model's window (``max_position_embeddings``) the model still runs when it can (RoPE
    positions are computed, not looked up; it never saw them in training); an error there is recorded, not
    raised."""
    past = window is not None and sample.length > window
    rec = {k: v for k, v in asdict(sample).items() if k != "prompt_ids"}
    rec.update(past_window=past, refused=None)
    t0 = time.perf_counter()
    try:
        done = lambda toks: sample.value in tokenizer.decode(toks)  # stop once the number is out
        ids = greedy_generate(model, sample.prompt_ids, NIAH_ANSWER_TOKENS, chunk=chunk,
                              stop_ids=eos_ids(model, tokenizer), should_stop=done)
    except (RuntimeError, IndexError, ValueError) as e:
        if not past:
            raise
        logger.warning("length %d past the %d-token window: %s", sample.length, window, e)
        rec.update(answer="", correct=None, refused=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
        return rec
    answer = tokenizer.decode(ids, skip_special_tokens=True)
    rec.update(answer=answer.strip(), correct=exact_match(answer, sample.value), seconds=time.perf_counter() - t0)
    return rec


def niah_grid(records: list[dict], lengths: list[int], depths: list[float]) -> dict:
    """Accuracy per (depth row, length column) of one model's records; None where every sample was refused."""
    acc = []
    for d in depths:
        row = []
        for L in lengths:
            cell = [r["correct"] for r in records if r["length"] == L and r["depth"] == d and r["correct"] is not None]
            row.append(sum(cell) / len(cell) if cell else None)
        acc.append(row)
    done = [v for row in acc for v in row if v is not None]
    return {"lengths": lengths, "depths": depths, "accuracy": acc, "mean": sum(done) / len(done) if done else math.nan}


# ---- perplexity ---------------------------------------------------------------------------------------------------
def heldout_ppl(model: Any, tokens: list[int], context: int, windows: int, chunk: int) -> dict:
    """``sala eval ppl``'s scoring of ``windows`` non-overlapping windows of ``context`` tokens."""
    t0 = time.perf_counter()
    row = score_text(model, tokens, context, batch=1, chunk=chunk, max_windows=windows)
    return {**row, "seconds": time.perf_counter() - t0}


# ---- speed and memory ---------------------------------------------------------------------------------------------
def cache_bytes(cache: Any) -> int:
    """Bytes of every tensor a cache holds (K/V, compressed keys, recurrent states), each storage once."""
    seen: dict[int, int] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    for layer in cache.layers:
        visit(vars(layer))
    return sum(seen.values())


def _head_dims(config: Any) -> tuple[int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


def random_cache(model: Any, length: int, seed: int) -> Any:
    """A cache holding ``length`` tokens of random K/V (and random Lightning states): decode timing without the
    prefill, as ``sala bench e2e --decode-only``. Values are scaled like real normalised keys."""
    dev, dt = model_device(model), next(model.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *shape, dtype=dt: (torch.randn(*shape, generator=g) * 0.5).to(dev, dtype)
    cache = new_cache(model)
    if isinstance(model, SALAForCausalLM):
        for layer, lc in zip(model.model.layers, cache.layers):
            attn = layer.self_attn
            d = attn.head_dim if hasattr(attn, "head_dim") else _head_dims(model.config)[1]
            if isinstance(lc, SparseLayerCache):
                hkv = attn.k_proj.out_features // d
                lc.update(rand(1, length, hkv, d), rand(1, length, hkv, d))  # [B, L, Hkv, D]
            else:
                assert isinstance(lc, LightningLayerCache)
                h = attn.q_proj.out_features // d
                lc.state = rand(1, h, d, d, dtype=torch.float32) * 0.05  # [B, H, K, V], fp32 as the model keeps it
        cache.seq_length = length
        return cache
    hkv, d = _head_dims(model.config)
    for i in range(model.config.num_hidden_layers):
        cache.update(rand(1, hkv, length, d), rand(1, hkv, length, d), i)  # transformers: [B, Hkv, L, D]
    return cache


@torch.no_grad()
def time_context(model: Any, tokens: list[int], context: int, *, prefill: bool, decode_steps: int, chunk: int,
                 seed: int) -> dict:
    """Prefill ``context`` real tokens (timed), or fill a random cache of ``context - decode_steps - 1`` tokens so
    the steps end at ``context`` (a model whose window is ``context`` can run them); then time ``decode_steps``
    one-token steps after one untimed step. -> prefill_s, decode_ms, cache_bytes (before the steps), cache kind."""
    dev = model_device(model)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    prefill_s = None
    if prefill:
        ids = torch.tensor([tokens[:context]], dtype=torch.long, device=dev)
        cache = new_cache(model)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in prefill_chunks(model, ids, chunk, cache, logits_to_keep=1):
            pass
        _sync(dev)
        prefill_s = time.perf_counter() - t0
    else:
        cache = random_cache(model, max(1, context - decode_steps - 1), seed)
    size = cache_bytes(cache)
    step = torch.tensor([[tokens[context % len(tokens)]]], dtype=torch.long, device=dev)
    model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1)  # untimed: lazy set-up
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(decode_steps):
        model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1)
    _sync(dev)
    decode_ms = (time.perf_counter() - t0) / decode_steps * 1e3
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    del cache
    return {"context": context, "cache": "prefilled" if prefill else "random", "prefill_s": prefill_s,
            "prefill_tok_s": context / prefill_s if prefill_s else None, "decode_ms": decode_ms,
            "cache_bytes": size, "peak_gpu_bytes": peak}
