"""CUDA-graph decode == eager decode == the plain model, on a small random model (GPU only)."""

from __future__ import annotations

import pytest
import torch

from sala.engine import Engine, EngineConfig, SamplingParams
from sala.engine.kv_cache import StaticCache
from sala.engine.loader import random_model
from sala.engine.runner import ModelRunner
from sala.model import HybridCache, preset
from sala.utils.testing import rel_l2

pytestmark = pytest.mark.gpu

LENGTHS = (100, 500, 700)  # small preset: dense_len 512 -> dense, crossing during decode, sparse
STEPS = 24


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def model(request):
    return random_model(preset("small", initializer_range=0.02), torch.device("cuda"), request.param, seed=0)


def prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, vocab, (n,), generator=g).cuda() for n in LENGTHS]


def decode_run(model, graphs: bool, tokens: list[list[int]] | None, fused: bool = False):
    """Prefill each prompt in its own slot, then decode STEPS tokens for all together (teacher-forced if given)."""
    cache = StaticCache(model.config, 4, 1024, next(model.parameters()).dtype, "cuda")
    runner = ModelRunner(model, cache, cuda_graphs=graphs, fused_attention=fused)
    slots = [0, 2, 3]  # non-contiguous slots, bucket 4 pads one row
    cur = []
    for s, p in zip(slots, prompts(model.config.vocab_size)):
        cur.append(int(runner.prefill(s, p, want_logits=True).argmax()))
    all_logits, chosen = [], [cur]
    for t in range(STEPS):
        feed = cur if tokens is None else tokens[t]
        logits = runner.decode(slots, [cache.lengths[s] for s in slots], torch.tensor(feed, device="cuda"))
        all_logits.append(logits)
        cur = logits.argmax(-1).tolist()
        chosen.append(cur)
    return torch.stack(all_logits), chosen, runner


def model_logits(model, prompt: torch.Tensor, feed: list[int]) -> torch.Tensor:
    cache = HybridCache([layer.is_sparse for layer in model.model.layers])
    with torch.no_grad():
        model(prompt[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
        out = []
        for tok in feed:
            out.append(model(torch.tensor([[tok]], device="cuda"), past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("graphs", [False, True], ids=["fused-eager", "fused-graph"])
def test_fused_decode_matches_row_by_row_and_model(model, graphs):
    """The fused step (eager, or captured as one CUDA graph per batch bucket) against the row-by-row eager step and
    the plain model, teacher-forced on the row-by-row run's tokens."""
    tol = 5e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
    eager_logits, eager_tokens, rows = decode_run(model, graphs=False, tokens=None, fused=False)
    assert not rows.fused and not rows.use_graphs
    fused_logits, _, runner = decode_run(model, graphs=graphs, tokens=eager_tokens, fused=True)
    assert runner.fused and runner.use_graphs == graphs
    if graphs:  # bucket 4 holds the 3 rows; one graph captures the whole step
        assert set(runner._graphs) == {4} and isinstance(runner._graphs[4].graph, torch.cuda.CUDAGraph)
    else:
        assert not runner._graphs
    err = rel_l2(fused_logits, eager_logits)
    print(f"fused ({'graph' if graphs else 'eager'}) vs row-by-row rel_l2 {err:.2e}")
    assert err < tol
    for i, p in enumerate(prompts(model.config.vocab_size)):
        ref = model_logits(model, p, [step[i] for step in eager_tokens[:STEPS]])
        err = rel_l2(fused_logits[:, i], ref)
        print(f"prompt {LENGTHS[i]}: fused vs model rel_l2 {err:.2e}")
        assert err < tol


def test_graphs_without_fused_attention_run_eagerly(model):
    """CUDA graphs need the fused decode attention: asking for graphs with row-by-row attention decodes eagerly."""
    cache = StaticCache(model.config, 2, 1024, next(model.parameters()).dtype, "cuda")
    runner = ModelRunner(model, cache, cuda_graphs=True, fused_attention=False)
    assert not runner.use_graphs and not runner.fused


def test_engine_with_graphs_batched_equals_unbatched(model):
    if next(model.parameters()).dtype != torch.float32:
        pytest.skip("token equality is checked in fp32")
    eng = Engine(model, None, EngineConfig(max_batch=4, max_seq_len=1024, prefill_chunk=256))
    ps = [p.tolist() for p in prompts(model.config.vocab_size)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    together = [c.token_ids for c in eng.generate(ps, params)]
    alone = [eng.generate([p], params)[0].token_ids for p in ps]
    assert together == alone
    assert 4 in eng.runner._graphs  # 3 rows padded to bucket 4 (smaller buckets appear while prompts finish prefill)


def test_graph_decode_speed(model):
    """Per-step time of graph vs eager decode at batch 1: the graph runner really replays a graph, and faster."""
    import time

    times = {}
    for graphs in (False, True):
        cache = StaticCache(model.config, 1, 2048, next(model.parameters()).dtype, "cuda")
        runner = ModelRunner(model, cache, cuda_graphs=graphs)
        runner.prefill(0, prompts(model.config.vocab_size)[2], want_logits=False)
        tok = torch.tensor([7], device="cuda")
        for i in range(40):
            if i == 10:
                torch.cuda.synchronize()
                t = time.perf_counter()
            tok = runner.decode([0], [cache.lengths[0]], tok).argmax(-1)
        torch.cuda.synchronize()
        times[graphs] = (time.perf_counter() - t) / 30 * 1000
        assert runner.use_graphs == graphs and (1 in runner._graphs) == graphs  # bucket 1 captured only with graphs
    print(f"decode step ms: eager {times[False]:.2f}, graphs {times[True]:.2f}")
    assert times[True] < times[False], times  # a small model at batch 1 is launch-bound: replay must win
