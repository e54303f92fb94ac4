"""Engine == plain model: greedy decode, batching, chunked prefill, padding rows, stopping, errors."""

from __future__ import annotations

import pytest
import torch

from sala.engine import Engine, EngineConfig, FinishReason, RequestError, SamplingParams
from sala.engine.kv_cache import LightningStore, StaticCache
from sala.engine.runner import ModelRunner
from sala.model import HybridCache

from .conftest import random_prompt

GREEDY = dict(temperature=0.0, ignore_eos=True)


def model_greedy(model, prompt: list[int], n: int, penalty: float = 1.0) -> tuple[list[int], list[torch.Tensor]]:
    """Reference: one model forward over the prompt, then one forward per token through HybridCache.
    ``penalty`` != 1: each seen token's logit (prompt + output) is divided by it where positive, else multiplied."""
    cache, tokens, logits = HybridCache([layer.is_sparse for layer in model.model.layers]), [], []
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits.append(out.logits[0, -1])
            step = out.logits[0, -1].clone()
            if penalty != 1.0:
                seen = torch.tensor(sorted(set(prompt) | set(tokens)))
                step[seen] = torch.where(step[seen] > 0, step[seen] / penalty, step[seen] * penalty)
            tokens.append(int(step.argmax()))
            ids = torch.tensor([[tokens[-1]]])
    return tokens, logits


def engine(model, **kw) -> Engine:
    return Engine(model, None, EngineConfig(**{"max_batch": 3, "max_seq_len": 192, "prefill_chunk": 64, **kw}))


# prompt lengths around dense_len = 64: dense only, crossing 64 during decode, sparse from the start
LENGTHS = (20, 50, 90)


@pytest.fixture(scope="module")
def references(sparse_model):
    return {n: model_greedy(sparse_model, random_prompt(n, seed=n), 24) for n in LENGTHS}


def test_engine_greedy_equals_model(sparse_model, references):
    eng = engine(sparse_model)
    for n in LENGTHS:
        [c] = eng.generate([random_prompt(n, seed=n)], SamplingParams(max_tokens=24, **GREEDY))
        assert c.token_ids == references[n][0], f"prompt {n}"
        assert c.finish_reason is FinishReason.LENGTH


def test_decode_logits_match_model(sparse_model, references):
    """The lean decode path gives the model's logits (not just the same argmax)."""
    n = 50  # crosses dense_len during decode
    prompt = random_prompt(n, seed=n)
    ref_tokens, ref_logits = references[n]
    cache = StaticCache(sparse_model.config, 2, 128, torch.float32, "cpu")
    runner = ModelRunner(sparse_model, cache)
    logits = runner.prefill(1, torch.tensor(prompt), want_logits=True)
    assert logits.shape == (sparse_model.config.vocab_size,)  # last position only
    torch.testing.assert_close(logits, ref_logits[0], rtol=1e-4, atol=1e-4)
    for i, tok in enumerate(ref_tokens[:-1]):
        out = runner.decode([1], [n + i], torch.tensor([tok]))
        torch.testing.assert_close(out[0], ref_logits[i + 1], rtol=1e-4, atol=1e-4)


def test_batched_equals_unbatched(sparse_model, references):
    eng = engine(sparse_model)
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    batched = eng.generate(prompts, SamplingParams(max_tokens=24, **GREEDY))
    assert [c.token_ids for c in batched] == [references[n][0] for n in LENGTHS]


def test_more_requests_than_slots(sparse_model, references):
    """Waiting requests take freed slots; a reused slot starts clean."""
    eng = engine(sparse_model, max_batch=2)
    prompts = [random_prompt(n, seed=n) for n in LENGTHS] * 2
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in (24, 5, 24, 24, 9, 24)]
    out = eng.generate(prompts, params)
    for c, p, n in zip(out, params, LENGTHS * 2):
        assert c.token_ids == references[n][0][: p.max_tokens]
    assert eng.stats()["free_slots"] == 2


@pytest.mark.parametrize("chunk", [1, 7, 33])
def test_chunked_prefill_equals_single(sparse_model, chunk):
    """Chunked prefill == one-shot prefill: caches (K/V, compressed keys, Lightning states) and logits."""
    prompt = torch.tensor(random_prompt(100, seed=3))
    caches = []
    for step in (100, chunk):
        cache = StaticCache(sparse_model.config, 1, 128, torch.float32, "cpu")
        runner = ModelRunner(sparse_model, cache)
        for a in range(0, 100, step):
            logits = runner.prefill(0, prompt[a : a + step], want_logits=a + step >= 100)
        caches.append((cache, logits))
    (one, l1), (many, l2) = caches
    torch.testing.assert_close(l2, l1, rtol=1e-4, atol=1e-4)
    for a, b in zip(one.stores, many.stores):
        if isinstance(a, LightningStore):
            torch.testing.assert_close(b.state[0], a.state[0], rtol=1e-4, atol=1e-5)
        else:
            assert (a.n1[0], a.n2[0]) == (b.n1[0], b.n2[0]) and a.n1[0] > 0
            torch.testing.assert_close(b.keys[0, :100], a.keys[0, :100], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.ck1[0, : a.n1[0]], a.ck1[0, : a.n1[0]], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.ck2[0, : a.n2[0]], a.ck2[0, : a.n2[0]], rtol=1e-5, atol=1e-6)


def test_engine_chunk_size_does_not_change_tokens(sparse_model, references):
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    out = engine(sparse_model, prefill_chunk=13).generate(prompts, SamplingParams(max_tokens=24, **GREEDY))
    assert [c.token_ids for c in out] == [references[n][0] for n in LENGTHS]


def test_padding_rows_do_not_touch_live_slots(sparse_model):
    """A batch padded to a CUDA-graph bucket (scratch rows) gives the same logits and leaves other slots alone."""
    prompts = [random_prompt(n, seed=10 + n) for n in (30, 70)]
    results = []
    for bucket in (2, 5):
        cache = StaticCache(sparse_model.config, 3, 128, torch.float32, "cpu")
        runner = ModelRunner(sparse_model, cache)
        for slot, p in zip((0, 2), prompts):
            runner.prefill(slot, torch.tensor(p), want_logits=False)
        runner.prefill(1, torch.tensor(prompts[0][:10]), want_logits=False)  # a bystander slot
        before = [s.state[1].clone() if isinstance(s, LightningStore) else s.keys[1, :10].clone() for s in cache.stores]
        idx = torch.tensor(runner.index_rows([0, 2], [30, 70], bucket))
        ids = torch.tensor([7, 9] + [0] * (bucket - 2))
        with torch.no_grad():
            logits = runner.step(ids, idx, ([0, 2], [31, 71]))[:2]
        after = [s.state[1] if isinstance(s, LightningStore) else s.keys[1, :10] for s in cache.stores]
        for x, y in zip(before, after):
            assert torch.equal(x, y)
        results.append(logits)
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_stop_tokens_and_per_sequence_stopping(sparse_model, references):
    ref = references[20][0]
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    eng = engine(sparse_model)
    out = eng.generate([random_prompt(20, seed=20), random_prompt(50, seed=50)],
                       [SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_tok], ignore_eos=True),
                        SamplingParams(max_tokens=24, **GREEDY)])
    assert out[0].token_ids == ref[: first + 1] and out[0].finish_reason is FinishReason.STOP
    assert out[1].token_ids == references[50][0]  # the other sequence kept going
    out = eng.generate([random_prompt(20, seed=20)], SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_tok],
                                                                     min_tokens=first + 1, ignore_eos=True))
    assert stop_tok not in out[0].token_ids[: first + 1]


def test_eos_stops_unless_ignored(sparse_model, references):
    ref = references[90][0]
    eng = engine(sparse_model)
    eng.eos_ids = [ref[3]]  # pretend this token is EOS
    [c] = eng.generate([random_prompt(90, seed=90)], SamplingParams(max_tokens=24, temperature=0.0))
    assert c.token_ids == ref[: ref.index(ref[3]) + 1] and c.finish_reason is FinishReason.STOP
    [c] = eng.generate([random_prompt(90, seed=90)], SamplingParams(max_tokens=24, **GREEDY))
    assert c.token_ids == ref


def test_streaming_callback(sparse_model, references):
    seen = []
    [c] = engine(sparse_model).generate([random_prompt(50, seed=50)], SamplingParams(max_tokens=24, **GREEDY), on_output=seen.append)
    assert [t for o in seen for t in o.token_ids] == c.token_ids
    assert [o.finished for o in seen] == [False] * 23 + [True]
    assert seen[-1].finish_reason is FinishReason.LENGTH and seen[-1].completion_tokens == 24


def test_seeded_sampling_reproducible(sparse_model):
    eng = engine(sparse_model)
    prompt = random_prompt(30, seed=1)
    p = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    a = eng.generate([prompt], SamplingParams(seed=123, **p))[0].token_ids
    b = eng.generate([prompt, random_prompt(70, seed=2)], [SamplingParams(seed=123, **p), SamplingParams(seed=5, **p)])[0].token_ids
    c = eng.generate([prompt], SamplingParams(seed=124, **p))[0].token_ids
    assert a == b
    assert a != c


def test_repetition_penalty_reduces_repeats(sparse_model):
    """The engine's penalised greedy decode == the model's greedy decode with the HF/CTRL rule applied by hand to
    every token seen (prompt + output); the penalty changes the tokens and cuts repeats of seen tokens."""
    eng = engine(sparse_model)
    prompt = random_prompt(20, seed=4)
    plain = eng.generate([prompt], SamplingParams(max_tokens=40, **GREEDY))[0].token_ids
    penal = eng.generate([prompt], SamplingParams(max_tokens=40, repetition_penalty=5.0, **GREEDY))[0].token_ids
    assert penal == model_greedy(sparse_model, prompt, 40, penalty=5.0)[0]
    assert plain == model_greedy(sparse_model, prompt, 40)[0] != penal
    repeats = lambda out: sum(t in prompt or t in out[:i] for i, t in enumerate(out))  # noqa: E731
    assert repeats(penal) < repeats(plain)


def test_request_errors(sparse_model):
    eng = engine(sparse_model)
    with pytest.raises(RequestError, match="exceeds the context capacity of 192") as e:
        eng.add_request(random_prompt(100, 0), SamplingParams(max_tokens=100))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestError, match="token id 512 is out of range"):
        eng.add_request([1, 512], SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(RequestError, match="need a tokenizer"):
        eng.add_request([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(RequestError, match="text prompt needs a tokenizer"):
        eng.add_request("hello", SamplingParams())
    with pytest.raises(RequestError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine(sparse_model, max_seq_len=5000)
    assert not eng.has_unfinished()


def test_refused_requests_leave_the_engine_usable(sparse_model):
    """A refusal must leave nothing behind in the scheduler, and no request may fail another's step."""
    eng = engine(sparse_model)
    with pytest.raises(RequestError, match="seed") as e:
        eng.add_request(random_prompt(10, 0), SamplingParams(max_tokens=4, seed=2**64))
    assert e.value.code == "invalid_seed"
    with pytest.raises(RequestError, match="stop token id 512 is out of range") as e:
        eng.add_request(random_prompt(10, 0), SamplingParams(max_tokens=4, stop_token_ids=[512], min_tokens=2))
    assert e.value.param == "stop_token_ids"
    assert not eng.has_unfinished() and eng.stats()["waiting"] == 0
    [c] = eng.generate([random_prompt(10, 1)], SamplingParams(max_tokens=3, **GREEDY))
    assert len(c.token_ids) == 3


def test_abort_frees_slot(sparse_model):
    eng = engine(sparse_model, max_batch=1)
    rid = eng.add_request(random_prompt(30, 0), SamplingParams(max_tokens=50, **GREEDY))
    eng.step()
    eng.step()
    out = eng.abort(rid)
    assert out.finish_reason is FinishReason.ABORT and out.finished
    assert eng.stats() == {"running": 0, "waiting": 0, "free_slots": 1, "max_batch": 1, "max_seq_len": 192}
    [c] = eng.generate([random_prompt(30, 0)], SamplingParams(max_tokens=3, **GREEDY))
    assert len(c.token_ids) == 3


def test_text_prompts_and_stop_strings(demo_model):
    model, tokenizer = demo_model
    eng = Engine(model, tokenizer, EngineConfig(max_batch=2, max_seq_len=256))
    [full] = eng.generate(["Hello world"], SamplingParams(max_tokens=30, **GREEDY))
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[8:11]
    assert stop
    [cut] = eng.generate(["Hello world"], SamplingParams(max_tokens=30, stop=[stop], **GREEDY))
    assert cut.finish_reason is FinishReason.STOP
    assert cut.text == full.text[: full.text.find(stop)]
