"""The cache protocol (issue 14 item 2): every cache implements what a mixer asks, compressed keys are extended in
one place, and the HF cache is a ``transformers.Cache`` that ``generate`` can reuse, reorder and expand.

Oracles: ``generate(use_cache=False)`` (a full forward over the whole sequence every step) for the cached
generate paths; the cache's batch-1 rows for its reindexed rows; ``compress_keys`` over the whole K for the
incremental compressed keys."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import Cache

from sala.engine.kv_cache import SparseStore, StaticCache
from sala.model import HybridCache, SALAForCausalLM
from sala.model.cache import LightningLayerCache, LightningState, NoCache, SparseKV, SparseLayerCache
from sala.ops import compress_keys
from tests.conftest import randomize_

LONG = 90  # past tiny_sparse_config's dense_len (64): the InfLLM-v2 path and compressed keys are exercised


@pytest.fixture
def model(tiny_sparse_config):
    return randomize_(SALAForCausalLM(tiny_sparse_config), std=0.1).float().eval()


def _ids(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def test_every_cache_implements_the_protocol(model):
    static = StaticCache(model.config, 2, 128, torch.float32, "cpu")
    idx = torch.zeros(4, 1, dtype=torch.long)
    views = [model.model.new_cache(), static.view(0), static.decode_view(idx, ([0], [1]), fused=False)]
    for view in views:
        assert isinstance(view, HybridCache) and isinstance(view, Cache)
        for layer, cache in zip(model.model.layers, view.layers):
            assert isinstance(cache, SparseKV if layer.is_sparse else LightningState), (type(view), type(cache))
    assert isinstance(NoCache(), SparseKV)


def test_compressed_keys_extend_in_one_place_for_hf_and_engine():
    """Both stores, extended over random chunkings, hold the compression of the whole K (spec §6.2)."""
    ks, st, Hkv, D = 8, 4, 2, 16
    keys = torch.randn(300, Hkv, D, generator=torch.Generator().manual_seed(1))
    want = [compress_keys(keys, ks, st), compress_keys(keys, 4 * ks, 4 * st)]
    hf = SparseLayerCache()
    engine = SparseStore(2, 300, Hkv, D, torch.float32, torch.device("cpu"), (ks, st))
    n = 0
    for step in (5, 40, 1, 1, 90, 3, 160):
        n += step
        got_hf = hf.compressed(1, keys[:n], ks, st)
        got_engine = engine.compressed(1, keys[:n], ks, st)
        for tier in range(2):
            m = got_hf[tier].shape[0]
            assert m == (0 if n < (4 ** tier) * ks else (n - (4 ** tier) * ks) // ((4 ** tier) * st) + 1)
            torch.testing.assert_close(got_hf[tier], want[tier][:m], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_engine[tier], want[tier][:m], rtol=1e-6, atol=1e-6)
    assert engine.n1[0] == 0 and 0 not in hf.ck1  # the other sequence was never touched


def test_generate_reuses_a_cache_across_calls(model):
    ids = _ids(1, LONG, seed=2)
    full = model.generate(ids, max_new_tokens=10, do_sample=False)
    first = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = first.past_key_values
    assert isinstance(cache, HybridCache) and cache.get_seq_length() == LONG + 3  # the last token is not fed yet
    cont = model.generate(first.sequences, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(cont, full)


def test_generate_fills_a_cache_passed_in(model):
    ids = _ids(1, LONG, seed=3)
    cache = model.model.new_cache()
    out = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))
    assert cache.get_seq_length() == LONG + 4 and cache[0].keys.shape[1] == LONG + 4


def test_beam_search_reorders_the_cache(model):
    """Before the Cache subclass, beam search raised 'the cache cannot be reordered'. Cached beams equal the
    cache-less beams (a full forward per step), also with several returned sequences and left padding."""
    ids = _ids(2, LONG, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # the second prompt is 7 tokens shorter (left padding)
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False,
              pad_token_id=0)
    cached = model.generate(ids, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (4, LONG + 6) and torch.equal(cached, uncached)


def test_reindexed_rows_decode_like_the_rows_they_copy(model):
    """reorder / select / repeat_interleave move K/V, compressed keys and Lightning states together: after them,
    row b decodes exactly like the original row it copies."""
    ids = _ids(2, LONG, seed=5)
    with torch.no_grad():
        cache = model.model.new_cache()
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        assert cache[0].ck1  # the sparse path ran, so compressed keys are part of what must move
        nxt = torch.tensor([[11], [12]])
        want = model(input_ids=nxt, past_key_values=_copy(cache), use_cache=True).logits[:, -1]

        reordered = _copy(cache)
        reordered.reorder_cache(torch.tensor([1, 0]))
        got = model(input_ids=nxt.flip(0), past_key_values=reordered, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, want.flip(0), rtol=1e-5, atol=1e-5)

        repeated = _copy(cache)
        repeated.batch_repeat_interleave(2)
        got = model(input_ids=nxt.repeat_interleave(2, 0), past_key_values=repeated, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, want.repeat_interleave(2, 0), rtol=1e-5, atol=1e-5)

        selected = _copy(cache)
        selected.batch_select_indices(torch.tensor([1]))
        got = model(input_ids=nxt[1:], past_key_values=selected, use_cache=True).logits[:, -1]
        torch.testing.assert_close(got, want[1:], rtol=1e-5, atol=1e-5)


def _copy(cache: HybridCache) -> HybridCache:
    """An independent copy (selecting every row in order copies every tensor)."""
    import copy

    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        if isinstance(layer, SparseLayerCache):
            layer.ck = tuple(dict(t) for t in layer.ck)
    out.batch_select_indices(torch.arange(cache[0].batch_rows()))
    return out


def test_crop_is_refused_and_reset_empties(model):
    cache = model.model.new_cache()
    with torch.no_grad():
        model(input_ids=_ids(1, 20, seed=6), past_key_values=cache, use_cache=True)
    cache.crop(0)  # nothing to remove: allowed
    with pytest.raises(NotImplementedError, match="Lightning layer's state cannot forget"):
        cache.crop(3)
    assert not cache.is_croppable
    cache.reset()
    assert cache.get_seq_length() == 0 and cache[0].keys is None
    assert isinstance(cache[1], LightningLayerCache) and cache[1].state is None


def test_misuse_of_the_caches_is_a_clear_error(model):
    """A cache built from nothing (or from both), an eager decode view without its rows' lengths, and asking a
    decode view (rows of different lengths) for one sequence length: each names what was wrong."""
    from sala.engine.types import EngineError
    from sala.model.layout import BatchLayout

    with pytest.raises(ValueError, match="exactly one of mixer_is_sparse"):
        HybridCache()
    with pytest.raises(ValueError, match="exactly one of mixer_is_sparse"):
        HybridCache([True], layers=[SparseLayerCache()])
    static = StaticCache(model.config, 2, 128, torch.float32, "cpu")
    view = static.decode_view(torch.zeros(4, 1, dtype=torch.long), None, fused=False)
    with pytest.raises(EngineError, match="different lengths"):
        view.get_seq_length()
    q = torch.randn(1, 1, model.config.num_attention_heads, model.config.head_dim)
    k = torch.randn(1, 1, model.config.num_key_value_heads, model.config.head_dim)
    with pytest.raises(EngineError, match="eager decode attention needs the rows' slots and lengths"):
        view[0].attend(q, k, k, BatchLayout.decode(torch.zeros(1, dtype=torch.long)), model.model.layers[0].self_attn)


@pytest.mark.parametrize("length", [40, LONG + 12], ids=["dense", "infllm-v2"])
@pytest.mark.parametrize("prefill_autocast", [True, False], ids=["bf16-prefill", "fp32-prefill"])
def test_a_cache_outlives_switching_autocast(model, prefill_autocast, length):
    """Prefill under CPU autocast (bf16 K/V stored) and decode without it, or the reverse: the cache keeps the dtype
    it was filled in, the query joins it and the output returns in the caller's dtype (before, dense attention
    refused the mixed dtypes, and CPU autocast recast ops inside the InfLLM-v2 reference). Oracle: the fp32 forward over the whole sequence, no cache, within what
    bf16 K/V (or bf16 decode projections) cost."""
    from sala.utils.testing import rel_l2

    ids = _ids(1, length, seed=91)
    with torch.no_grad():
        want = model(ids).logits[0, -4:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prefill_autocast):
            pkv = model(ids[:, :-4], use_cache=True).past_key_values
        got = []
        for t in range(ids.shape[1] - 4, ids.shape[1]):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not prefill_autocast):
                got.append(model(ids[:, t : t + 1], past_key_values=pkv, use_cache=True).logits[0, -1].float())
    assert any(layer.keys is not None and layer.keys.dtype == (torch.bfloat16 if prefill_autocast else torch.float32)
               for layer in pkv.layers if isinstance(layer, SparseLayerCache))
    err = rel_l2(torch.stack(got), want)
    assert err < 1e-2, err
