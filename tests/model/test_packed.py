"""Packed (varlen) training input and gradient checkpointing: a row of documents bounded by ``cu_seqlens`` computes
each document as if it were alone (positions from 0, a fresh Lightning state, no attention across a boundary)."""

from __future__ import annotations

import pytest
import torch

from sala.model import SALAForCausalLM, preset
from sala.utils.testing import assert_close
from tests.conftest import randomize_

LENS = [37, 100, 5, 130]  # tiny-sparse dense_len is 64: 100 and 130 take the InfLLM-v2 path, 37 and 5 the dense one


def _docs(vocab: int, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, n), generator=g) for n in LENS]


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("cfg_name", ["tiny", "tiny-sparse"])
def test_packed_documents_equal_separate_forwards(cfg_name, tiny_sparse_config):
    cfg = tiny_sparse_config if cfg_name == "tiny-sparse" else preset("tiny")
    model = randomize_(SALAForCausalLM(cfg)).float().eval()
    docs = _docs(cfg.vocab_size)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=d, use_cache=False).logits for d in docs], dim=1)
        packed = model(input_ids=torch.cat(docs, 1), cu_seqlens=_cu(LENS), use_cache=False).logits
        unpacked = model(input_ids=torch.cat(docs, 1), use_cache=False).logits
    assert_close(packed, alone, 1e-5, "packed vs separate documents")
    # the guard has teeth: without boundaries every document after the first sees its predecessors
    assert (unpacked[:, LENS[0]:] - alone[:, LENS[0]:]).abs().max() > 1e-2


def test_lightning_state_and_attention_see_nothing_of_the_previous_document(tiny_sparse_config):
    """Changing document 0 changes nothing in documents 1..3 (Lightning state and sparse/dense attention reset)."""
    model = randomize_(SALAForCausalLM(tiny_sparse_config)).float().eval()
    docs = _docs(tiny_sparse_config.vocab_size)
    other = [torch.randint(3, tiny_sparse_config.vocab_size, docs[0].shape, generator=torch.Generator().manual_seed(9)),
             *docs[1:]]
    with torch.no_grad():
        a = model(input_ids=torch.cat(docs, 1), cu_seqlens=_cu(LENS), use_cache=False).logits
        b = model(input_ids=torch.cat(other, 1), cu_seqlens=_cu(LENS), use_cache=False).logits
    assert torch.equal(a[:, LENS[0]:], b[:, LENS[0]:])
    assert not torch.equal(a[:, :LENS[0]], b[:, :LENS[0]])


def test_packed_gradients_equal_separate_gradients(tiny_sparse_config):
    model = randomize_(SALAForCausalLM(tiny_sparse_config)).float().train()
    docs = _docs(tiny_sparse_config.vocab_size)
    sum(model(input_ids=d, use_cache=False).logits.sum() for d in docs).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(input_ids=torch.cat(docs, 1), cu_seqlens=_cu(LENS), use_cache=False).logits.sum().backward()
    for n, p in model.named_parameters():
        assert_close(p.grad, ref[n], 1e-4, n)


def test_gradient_checkpointing_matches_plain_backward():
    model = randomize_(SALAForCausalLM(preset("tiny"))).float().train()
    ids = torch.randint(3, 512, (2, 50), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    layer, calls = model.model.layers[1], []
    forward = layer.forward
    layer.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    loss2 = model(input_ids=ids, labels=ids).loss  # use_cache defaults on; checkpointing turns it off
    loss2.backward()
    assert len(calls) == 2  # forward + recompute in the backward: checkpointing really ran
    assert torch.equal(loss, loss2)
    for n, p in model.named_parameters():
        assert_close(p.grad, ref[n], 1e-6, n)


@pytest.mark.parametrize("cu, msg", [
    ([0, 40, 30, 272], "rise strictly"),
    ([0, 100], "sequence length"),
    ([5, 272], "from 0"),
])
def test_bad_cu_seqlens(cu, msg):
    model = SALAForCausalLM(preset("tiny")).eval()
    ids = torch.randint(3, 512, (1, 272))
    with pytest.raises(ValueError, match=msg):
        model(input_ids=ids, cu_seqlens=torch.tensor(cu), use_cache=False)


def test_packed_input_refuses_batch_and_cache():
    model = SALAForCausalLM(preset("tiny")).eval()
    with pytest.raises(ValueError, match="batch 1"):
        model(input_ids=torch.randint(3, 512, (2, 10)), cu_seqlens=torch.tensor([0, 10]), use_cache=False)
    cache = model.model.new_cache()
    with pytest.raises(ValueError, match="without a cache"):
        model(input_ids=torch.randint(3, 512, (1, 10)), cu_seqlens=torch.tensor([0, 4, 10]), past_key_values=cache)
