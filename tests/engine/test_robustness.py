"""Issue 17 (hardening): non-finite logits end one request with an error, the engine serves the others; checkpoint
weights checked for non-finite tensors; sampling edge cases that used to return garbage."""

from __future__ import annotations

import copy

import pytest
import torch

from sala.engine import Engine, EngineConfig, SamplingParams
from sala.engine.types import FinishReason, NonFiniteLogitsError

from .conftest import make_model, random_prompt

POISON = 7  # token id whose embedding row is NaN: only prompts holding it produce NaN logits


@pytest.fixture(scope="module")
def poisoned():
    model = make_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[POISON] = float("nan")
    return model


def _engine(model, batch=2) -> Engine:
    return Engine(model, None, EngineConfig(max_batch=batch, max_seq_len=128, prefill_chunk=64))


def test_non_finite_logits_fail_only_their_request(poisoned):
    """Before the guard NaN logits were sampled as some id and generate() returned normally (exit 0)."""
    engine = _engine(poisoned)
    good, bad = random_prompt(12, 1), random_prompt(12, 2) + [POISON]
    outs: dict[str, list] = {}
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    r_good = engine.add_request(good, params, on_output=lambda o: outs.setdefault(o.request_id, []).append(o))
    r_bad = engine.add_request(bad, params, on_output=lambda o: outs.setdefault(o.request_id, []).append(o))
    while engine.has_unfinished():
        engine.step()
    [last_bad] = outs[r_bad]
    assert last_bad.finished and last_bad.finish_reason is FinishReason.ERROR and last_bad.token_ids == []
    assert "non-finite logits" in last_bad.error and r_bad in last_bad.error
    assert [o.finish_reason for o in outs[r_good]][-1] is FinishReason.LENGTH
    assert sum(len(o.token_ids) for o in outs[r_good]) == 6
    # the failed request's slot serves the next request normally, same tokens as a fresh engine
    [again] = engine.generate([good], params)
    [fresh] = _engine(poisoned).generate([good], params)
    assert again.token_ids == fresh.token_ids and again.error is None


def test_generate_raises_on_non_finite_logits(poisoned):
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits"):
        _engine(poisoned, batch=1).generate([[POISON] * 4], SamplingParams(max_tokens=3, temperature=0.0))


def test_nan_weights_everywhere_fail_every_request():
    model = copy.deepcopy(make_model())
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # every row of logits NaN
    with pytest.raises(NonFiniteLogitsError):
        _engine(model).generate([random_prompt(8, 3)], SamplingParams(max_tokens=3, temperature=0.7, seed=0))
