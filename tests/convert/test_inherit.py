"""Weight inheritance: K/V expansion, new-tensor inits, streamed sharded output, hybrid loads and runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import sala  # noqa: F401
from sala.convert import ConversionError, ConvertConfig, InitOptions, read_source, run_convert
from sala.convert.adapters import sala_config
from sala.convert.inherit import expand_kv_heads, iter_sala_tensors, write_sala_checkpoint
from sala.model.checkpoint_io import checkpoint_tensors, expected_shapes
from sala.model.configuration_sala import mixer_schedule


def test_expand_kv_heads():
    w = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2 * 3, 5)  # Hkv=2, D=3, hidden=5
    out = expand_kv_heads(w, 2, 8).reshape(8, 3, 5)
    for i in range(8):
        assert torch.equal(out[i], w.reshape(2, 3, 5)[i // 4])  # head i <- KV head i // g
    b = torch.arange(6.0)
    assert torch.equal(expand_kv_heads(b, 2, 4).reshape(4, 3)[3], b.reshape(2, 3)[1])


def _tensors(spec, sparse, opts=InitOptions()):
    cfg = sala_config(spec, mixer_schedule(spec.num_layers, sparse))
    return cfg, dict(iter_sala_tensors(spec, cfg, opts))


def test_layer_tensors(sources):
    spec = read_source(sources["qwen3"])
    cfg, t = _tensors(spec, (0, 3))
    assert set(t) == set(expected_shapes(cfg))
    src = {k: f.get_tensor(k) for f in [safe_open(str(p), "pt") for p in sources["qwen3"].glob("*.safetensors")] for k in f.keys()}
    lin, sp = "model.layers.1.self_attn.", "model.layers.0.self_attn."
    assert torch.equal(t[lin + "q_proj.weight"], src[lin + "q_proj.weight"])
    assert torch.equal(t[lin + "o_proj.weight"], src[lin + "o_proj.weight"])
    assert torch.equal(t[lin + "k_proj.weight"], expand_kv_heads(src[lin + "k_proj.weight"], 2, 4))
    assert torch.equal(t[lin + "q_norm.weight"], src[lin + "q_norm.weight"])  # Qwen3 has q/k norms: inherited
    assert torch.equal(t[lin + "o_norm.weight"], torch.ones(96))
    assert t[lin + "z_proj.weight"].abs().max() <= 1 / 8 and t[lin + "z_proj.weight"].std() > 0  # U(+-1/sqrt(64))
    assert torch.equal(t[sp + "k_proj.weight"], src[sp + "k_proj.weight"])  # sparse: GQA kept
    assert torch.equal(t[sp + "o_gate.weight"], torch.zeros(96, 64))  # compensated gate
    assert torch.equal(t[sp + "o_proj.weight"], 2 * src[sp + "o_proj.weight"])
    assert torch.equal(t[sp + "q_norm.weight"], src[sp + "q_norm.weight"])


def test_norms_default_to_ones_without_source_norms(sources):
    _, t = _tensors(read_source(sources["llama"]), (0, 3))
    assert torch.equal(t["model.layers.2.self_attn.k_norm.weight"], torch.ones(16))
    assert t["model.layers.2.self_attn.k_proj.bias"].shape == (64,)  # Llama biases expanded too
    assert "model.layers.0.self_attn.q_norm.weight" not in t  # sparse layers of non-Qwen3 sources: no qk-norm


def test_inits_are_seeded(sources):
    spec = read_source(sources["llama"])
    z = "model.layers.1.self_attn.z_proj.weight"
    a, b = _tensors(spec, (0, 3), InitOptions(seed=5))[1][z], _tensors(spec, (0, 3), InitOptions(seed=5))[1][z]
    c = _tensors(spec, (0, 3), InitOptions(seed=6))[1][z]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(_tensors(spec, (0, 3), InitOptions(z_proj_init="zeros"))[1][z], torch.zeros_like(a))


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "minicpm"])
def test_hybrid_loads_and_runs(sources, name, tmp_path):
    res = run_convert(ConvertConfig(source=str(sources[name]), out=str(tmp_path), sparse_layers=(0, 3),
                                    max_shard_size="40KB"))
    assert len(res.files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert (tmp_path / "tokenizer.json").exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["MiniCPMSALAForCausalLM"] and cfg["model_type"] == "minicpm_sala"
    assert cfg["mixer_types"] == ["minicpm4", "lightning-attn", "lightning-attn", "minicpm4"]
    assert cfg["attn_use_rope"] is False and cfg["lightning_use_rope"] is True  # HyPE
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        logits = model(input_ids=ids).logits
    assert out.shape == (2, 28) and torch.isfinite(logits).all()
    report = json.loads((tmp_path / "conversion.json").read_text())
    assert report["sparse_layers"] == [0, 3] and report["lightning_weights"] == "inherited"


def test_convert_verify_flag(sources, tmp_path):
    res = run_convert(ConvertConfig(source=str(sources["minicpm"]), out=str(tmp_path), sparse_layers=(0, 2, 3),
                                    verify=True, untie_embeddings=True, dtype="bfloat16"))
    assert res.identity.passed and res.identity.rel_l2 < 1e-5 and res.hybrid_logits_finite
    tensors = checkpoint_tensors(tmp_path)
    assert tensors["lm_head.weight"][0] == "BF16" and tensors["model.layers.1.self_attn.k_proj.weight"][1] == (64, 64)
    assert json.loads((tmp_path / "conversion.json").read_text())["identity_check"]["passed"]


def test_streaming_shard_bound(sources, tmp_path):
    """No output shard exceeds the bound unless a single tensor does (one shard in memory at a time)."""
    spec = read_source(sources["qwen3"])
    cfg = sala_config(spec, mixer_schedule(4, (0, 3)))
    files = write_sala_checkpoint(spec, cfg, tmp_path, InitOptions(), max_shard_bytes=50_000)
    biggest = max(v.numel() * 4 for v in dict(iter_sala_tensors(spec, cfg, InitOptions())).values())
    assert all(f.stat().st_size <= max(50_000, biggest) + 4096 for f in files)


def test_override_errors(sources):
    spec = read_source(sources["llama"])
    cfg = sala_config(spec, mixer_schedule(4, (0, 3)))
    with pytest.raises(ConversionError, match=r"override model.layers.1.self_attn.z_proj.weight has shape \[3, 3\]"):
        list(iter_sala_tensors(spec, cfg, InitOptions(), overrides={"model.layers.1.self_attn.z_proj.weight": torch.zeros(3, 3)}))
    with pytest.raises(ConversionError, match=r"override model.layers.0.self_attn.z_proj.weight is not a tensor"):
        list(iter_sala_tensors(spec, cfg, InitOptions(), overrides={"model.layers.0.self_attn.z_proj.weight": torch.zeros(3, 3)}))
