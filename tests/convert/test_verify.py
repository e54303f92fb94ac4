"""Identity check: every layer softmax + RoPE, no gate, dense == transformers' implementation of the source."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

import sala  # noqa: F401  (registers minicpm_sala)
from sala.convert import IdentityCheckError, InitOptions, read_source, verify_identity, write_sala_checkpoint
from sala.convert.adapters import sala_config
from sala.convert.inherit import build_sala_model
from sala.convert.verify import identity_config, reference_model
from sala.utils.testing import rel_l2

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_tied", "minicpm", "minicpm_untied"]


@pytest.mark.parametrize("name", FAMILIES)
def test_identity_in_memory(sources, name):
    report = verify_identity(read_source(sources[name]), seq_len=48)
    assert report.passed and report.rel_l2 < 1e-5, report


@pytest.mark.parametrize("name", ["llama", "qwen3_tied", "minicpm"])
def test_identity_through_checkpoint(sources, name, tmp_path):
    """The identity conversion written to disk and loaded by AutoModelForCausalLM still matches the source."""
    spec = read_source(sources[name])
    write_sala_checkpoint(spec, identity_config(spec), tmp_path, InitOptions(), max_shard_bytes=30_000)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(model).__name__ == "SALAForCausalLM" and model.config.attn_use_rope
    ref, _ = reference_model(spec)
    ids = torch.randint(0, spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = rel_l2(model(input_ids=ids, use_cache=False).logits, ref(input_ids=ids).logits)
    assert err < 1e-5


def test_compensated_gate_preserves_function(sources):
    """o_gate = 0 with o_proj x2: gated softmax layers still compute the source exactly (with RoPE kept)."""
    spec = read_source(sources["qwen3"])
    cfg = sala_config(spec, ["minicpm4"] * 4, attn_use_rope=True, attn_use_output_gate=True, sparse_attention=False)
    model = build_sala_model(spec, cfg, InitOptions(o_gate_init="compensated"))
    ref, _ = reference_model(spec)
    ids = torch.randint(0, spec.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        assert rel_l2(model(input_ids=ids, use_cache=False).logits, expected) < 1e-5
        randomized = build_sala_model(spec, cfg, InitOptions(o_gate_init="random"))
        assert rel_l2(randomized(input_ids=ids, use_cache=False).logits, expected) > 1e-3


def test_identity_catches_a_wrong_key_map(sources, monkeypatch):
    from sala.convert import adapters

    qwen2 = adapters.FAMILIES["qwen2"]
    table = dict(qwen2.layer_keys)
    table["mlp.gate_proj.weight"], table["mlp.up_proj.weight"] = table["mlp.up_proj.weight"], table["mlp.gate_proj.weight"]
    monkeypatch.setitem(adapters.FAMILIES, "qwen2", dataclasses.replace(qwen2, layer_keys=table))
    with pytest.raises(IdentityCheckError, match=r"identity check failed .* relative L2 error .* family 'qwen2' is wrong"):
        verify_identity(read_source(sources["qwen2"]), seq_len=16)
