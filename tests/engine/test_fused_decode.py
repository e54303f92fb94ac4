"""Fused decode (sparse-layer attention inside the step, the path CUDA graphs capture whole) == plain model.

Forced on here (``fused_attention=True``), so the Triton kernels run in the CPU interpreter: batched rows at
both sides of ``dense_len``, compressed keys appended on the device, padding rows, and the hand-over from a
prefill that never built compressed keys.
"""

from __future__ import annotations

import pytest
import torch

from sala.engine import Engine, EngineConfig, EngineError, SamplingParams
from sala.engine.kv_cache import LightningStore, SparseStore, StaticCache
from sala.engine.runner import ModelRunner
from sala.ops import compress_keys

from .conftest import make_model, random_prompt
from .test_engine import GREEDY, model_greedy

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

LENGTHS = (20, 50, 90)  # dense only, crossing dense_len = 64 during decode, sparse from the start
STEPS = 20


@pytest.fixture(scope="module")
def references(sparse_model):
    return {n: model_greedy(sparse_model, random_prompt(n, seed=n), STEPS) for n in LENGTHS}


@pytest.fixture(params=["naive", "triton"])
def ops_backend(request, monkeypatch):
    """Fused decode with the reference loop, then with the Triton kernels (the interpreter on CPU)."""
    monkeypatch.setenv("SALA_BACKEND", request.param)
    return request.param


def test_fused_decode_logits_match_model(sparse_model, references, ops_backend):
    """Three sequences decoding together through the fused step give the model's logits token by token, and
    the device-appended compressed keys equal compressing the whole K cache."""
    cache = StaticCache(sparse_model.config, 3, 128, torch.float32, "cpu")
    runner = ModelRunner(sparse_model, cache, fused_attention=True)
    assert runner.fused
    slots = [2, 0, 1]  # out of order on purpose
    for s, n in zip(slots, LENGTHS):
        runner.prefill(s, torch.tensor(random_prompt(n, seed=n)), want_logits=False)
    for i in range(STEPS - 1):
        tokens = torch.tensor([references[n][0][i] for n in LENGTHS])
        logits = runner.decode(slots, [n + i for n in LENGTHS], tokens)
        for r, n in enumerate(LENGTHS):
            torch.testing.assert_close(logits[r], references[n][1][i + 1], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"prompt {n}, step {i}: {m}")
    for store in cache.stores:
        if isinstance(store, SparseStore):
            for s, n in zip(slots, LENGTHS):
                L = n + STEPS - 1
                assert cache.lengths[s] == L
                ks, st = store.compression
                cache.sync_compressed(s)  # host counts are synced lazily
                want = compress_keys(store.keys[s, :L], ks, st)
                assert store.n1[s] == want.shape[0]
                torch.testing.assert_close(store.ck1[s, : store.n1[s]], want, rtol=0, atol=0)


def test_fused_engine_batched_greedy(references):
    model = make_model()
    eng = Engine(model, None, EngineConfig(max_batch=3, max_seq_len=160, prefill_chunk=40, fused_attention=True))
    out = eng.generate([random_prompt(n, seed=n) for n in LENGTHS], SamplingParams(max_tokens=STEPS, **GREEDY))
    assert [c.token_ids for c in out] == [references[n][0] for n in LENGTHS]


def test_fused_padding_rows_touch_nothing(sparse_model, ops_backend):
    """A batch padded to a larger bucket: same logits, and a bystander slot's K/V, compressed keys and states
    are untouched."""
    prompts = [random_prompt(n, seed=10 + n) for n in (30, 70)]
    results = []
    for bucket in (2, 4):
        cache = StaticCache(sparse_model.config, 3, 128, torch.float32, "cpu")
        runner = ModelRunner(sparse_model, cache, fused_attention=True)
        for slot, p in zip((1, 2), prompts):
            runner.prefill(slot, torch.tensor(p), want_logits=False)
            cache.ensure_compressed(slot)
        runner.prefill(0, torch.tensor(random_prompt(100, seed=5)), want_logits=False)  # bystander in slot 0
        before = [s.state[0].clone() if isinstance(s, LightningStore)
                  else (s.keys[0, :100].clone(), s.values[0, :100].clone(), s.ck1[0].clone(), s.ck2[0].clone())
                  for s in cache.stores]
        idx = torch.tensor(runner.index_rows([1, 2], [30, 70], bucket))
        ids = torch.tensor([7, 9] + [0] * (bucket - 2))
        with torch.no_grad():
            logits = runner.step(ids, idx, None)[:2]
        for b, s in zip(before, cache.stores):
            if isinstance(s, LightningStore):
                assert torch.equal(b, s.state[0])
            else:
                for x, y in zip(b, (s.keys[0, :100], s.values[0, :100], s.ck1[0], s.ck2[0])):
                    torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True)  # unwritten memory may be NaN
        results.append(logits)
    assert not results[0].isnan().any()
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


def test_fused_needs_compressed_caches():
    model = make_model()
    cache = StaticCache(model.config, 1, 64, torch.float32, "cpu")
    for store in cache.stores:
        if isinstance(store, SparseStore):
            store.compression = store.ck1 = store.ck2 = None
    with pytest.raises(EngineError, match="compressed-key caches"):
        ModelRunner(model, cache, fused_attention=True)
    assert not ModelRunner(model, cache).fused  # the default on CPU: eager attention between pieces


def test_prefill_after_fused_decode(sparse_model, ops_backend):
    """Prefill -> fused decode -> more prefill into the same slot (host takes the compressed keys back) ->
    fused decode: same logits as the eager runner doing the same, and a copied slot decodes the same."""
    prompt, extra = random_prompt(40, seed=1), random_prompt(30, seed=2)
    fed = random_prompt(12, seed=3)
    results = []
    for fused in (False, True):
        cache = StaticCache(sparse_model.config, 2, 160, torch.float32, "cpu")
        runner = ModelRunner(sparse_model, cache, fused_attention=fused)
        logits = [runner.prefill(0, torch.tensor(prompt), want_logits=True)]
        for i, tok in enumerate(fed[:6]):  # 40 -> 46
            logits.append(runner.decode([0], [40 + i], torch.tensor([tok]))[0])
        logits.append(runner.prefill(0, torch.tensor(extra), want_logits=True))  # 46 -> 76: crosses dense_len
        for i, tok in enumerate(fed[6:]):
            logits.append(runner.decode([0], [76 + i], torch.tensor([tok]))[0])
        cache.copy_slot(0, 1)
        logits.append(runner.decode([0, 1], [82, 82], torch.tensor([5, 5])))
        results.append(torch.stack(logits[:-1]))
        torch.testing.assert_close(logits[-1][0], logits[-1][1], rtol=0, atol=0)
        results.append(logits[-1][0])
    torch.testing.assert_close(results[2], results[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[3], results[1], rtol=1e-4, atol=1e-4)


def test_fused_step_glue_has_no_host_sync(sparse_model, monkeypatch):
    """The fused decode step is captured whole in a CUDA graph, so the model's forward and the engine's views must
    not read a tensor on the host (``.item()``, ``.tolist()``, ``bool``/``int``/``float`` of a tensor) on its way.
    CI has no GPU to capture with: here every such call made from ``sala/model`` or ``sala/engine`` code during a
    fused step raises (ops are exempt: their CPU twins may sync; the Triton kernels are checked on the GPU)."""
    import sys

    cache = StaticCache(sparse_model.config, 2, 128, torch.float32, "cpu")
    runner = ModelRunner(sparse_model, cache, fused_attention=True)
    runner.prefill(0, torch.tensor(random_prompt(70, seed=3)), want_logits=False)
    cache.ensure_compressed(0)
    idx = torch.tensor(runner.index_rows([0], [70], 2))
    ids = torch.tensor([5, 0])

    def guarded(name):
        original = getattr(torch.Tensor, name)

        def call(self, *args, **kwargs):
            where = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/sala/model/" in where or "/sala/engine/" in where:
                raise AssertionError(f"host sync: Tensor.{name} from {where}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return call

    buffers = [t for s in cache.stores for t in ((s.state,) if isinstance(s, LightningStore) else (s.keys, s.values, s.ck1, s.ck2))]
    saved = [t.clone() for t in buffers]
    with torch.no_grad():
        want = runner.step(ids, idx, None)  # unguarded, for the comparison below
        for t, before in zip(buffers, saved):  # undo the step's in-place writes: the guarded step redoes them
            t.copy_(before)
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, guarded(name))
        got = runner.step(ids, idx, None)
    monkeypatch.undo()
    torch.testing.assert_close(got[:1], want[:1], rtol=1e-5, atol=1e-5)
