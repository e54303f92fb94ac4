"""Perplexity equals a direct cross-entropy over the scored positions; chunked prefill equals one shot
(SALA HybridCache, through the sparse path, and transformers DynamicCache)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sala.eval.models import load_eval_model
from sala.eval.ppl import plan_windows, score_text
from sala.model import SALAForCausalLM, preset

# spec §5.5: dense == sparse below K_sel blocks; this config takes the InfLLM-v2 path from 64 tokens on
SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3, dense_len=64)


@pytest.fixture(scope="module")
def sala_model():
    torch.manual_seed(0)
    model = SALAForCausalLM(preset("tiny-sparse", sparse_config=SPARSE)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def llama_model(llama_dir):
    return load_eval_model(str(llama_dir), "cpu", "float32")[0]


def tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(5, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def direct_ppl(model, toks: list[int], context: int, stride: int | None) -> tuple[float, int]:
    """Independent reference: one full forward per window, no cache, CE over the scored targets."""
    stride = stride or context
    nll, n = 0.0, 0
    for i, start in enumerate(range(0, len(toks) - context + 1, stride)):
        ids = torch.tensor([toks[start : start + context]])
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
        first = 1 if i == 0 else context - min(stride, context - 1)  # first scored position
        ce = F.cross_entropy(logits[first - 1 : -1], ids[0, first:], reduction="sum")
        nll, n = nll + float(ce), n + context - first
    return math.exp(nll / n), n


@pytest.mark.parametrize("stride", [None, 24])
@pytest.mark.parametrize("which", ["sala", "llama"])
def test_ppl_equals_direct_cross_entropy(which, stride, sala_model, llama_model):
    model = sala_model if which == "sala" else llama_model
    toks = tokens(300)
    row = score_text(model, toks, 80, stride=stride, batch=3, chunk=10**6)
    ref, n = direct_ppl(model, toks, 80, stride)
    assert row["tokens_scored"] == n
    assert row["windows"] == (3 if stride is None else 10)
    assert row["ppl"] == pytest.approx(ref, rel=1e-5)
    assert row["mean_nll"] == pytest.approx(math.log(ref), rel=1e-5)


@pytest.mark.parametrize("which", ["sala", "llama"])
def test_chunked_prefill_equals_one_shot(which, sala_model, llama_model):
    model = sala_model if which == "sala" else llama_model
    toks = tokens(400, seed=1)
    one = score_text(model, toks, 128, batch=2, chunk=10**6)
    for chunk in (17, 64):
        chunked = score_text(model, toks, 128, batch=2, chunk=chunk)
        assert chunked["tokens_scored"] == one["tokens_scored"]
        assert chunked["mean_nll"] == pytest.approx(one["mean_nll"], rel=1e-5, abs=1e-6)


def test_plan_windows():
    ws = plan_windows(100, 32)
    assert [(w.start, w.score_from) for w in ws] == [(0, 1), (32, 1), (64, 1)]
    ws = plan_windows(100, 32, stride=8, max_windows=3)
    assert [(w.start, w.score_from) for w in ws] == [(0, 1), (8, 24), (16, 24)]
    with pytest.raises(ValueError, match="fewer than the context 128: no full window"):
        plan_windows(100, 128)
