"""Reading sources: normalised specs per family and one specific error per unsupported or broken checkpoint."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sala.convert import (
    ConversionError,
    ConvertConfig,
    SourceTensorError,
    UnsupportedArchitectureError,
    read_source,
    run_convert,
)
from sala.convert.adapters import check_source_tensors, sala_config


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "minicpm"])
def test_read_source_families(sources, family):
    spec = read_source(sources[family])
    assert spec.family == family and spec.num_layers == 4 and spec.num_kv_heads == 2
    check_source_tensors(spec)
    assert spec.qk_norm == (family == "qwen3")
    assert spec.qkv_bias == (family == "qwen2")
    assert spec.attention_bias == (family == "llama")
    assert spec.head_dim == (24 if family == "qwen3" else 16)


def test_mup_translation(sources):
    plain = sala_config(read_source(sources["qwen2"]), ["minicpm4"] * 4)
    assert plain.scale_emb == 1.0 and plain.residual_scale == 1.0 and plain.logit_divisor == 1.0
    mc = sala_config(read_source(sources["minicpm"]), ["minicpm4"] * 4)
    assert (mc.scale_emb, mc.scale_depth, mc.dim_model_base) == (12, 1.4, 16)
    assert mc.residual_scale == pytest.approx(1.4 / math.sqrt(4)) and mc.tie_word_embeddings


def test_sliding_window_and_rope_scaling_are_noted(sources, tmp_path):
    assert any("sliding_window=512" in n for n in read_source(sources["mistral"]).notes)
    src = tmp_path / "scaled"
    shutil.copytree(sources["qwen2"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 256}
    (src / "config.json").write_text(json.dumps(cfg))
    spec = read_source(src)
    assert spec.rope_scaling["rope_type"] == "yarn" and any("'yarn' dropped" in n for n in spec.notes)


def _edit_config(src, tmp_path, **changes):
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("model_type, match", [
    ("gemma", r"model_type 'gemma' .* not supported: no key map.*Supported model_type values: llama, mistral"),
    ("minicpm3", r"multi-head latent attention"),
    ("qwen3_moe", r"MoE MLPs have no SALA equivalent"),
])
def test_unsupported_architecture(sources, tmp_path, model_type, match):
    src = _edit_config(sources["llama"], tmp_path, model_type=model_type)
    with pytest.raises(UnsupportedArchitectureError, match=match):
        read_source(src)


@pytest.mark.parametrize("changes, match", [
    ({"hidden_act": "gelu"}, r"hidden_act is 'gelu'; SALA's MLP is SwiGLU"),
    ({"mlp_bias": True}, r"mlp_bias=true"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5"),
    ({"num_experts": 8}, r"MoE MLPs have no SALA equivalent"),
])
def test_unsupported_features(sources, tmp_path, changes, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        read_source(_edit_config(sources["llama"], tmp_path, **changes))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match=r"source .*nope does not exist"):
        read_source(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(ConversionError, match=r"holds no checkpoint: neither config.json .* nor a .gguf file"):
        read_source(tmp_path / "empty")
    tmp_path.joinpath("weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ConversionError, match=r"is a file but not a GGUF; pass a HF checkpoint directory"):
        read_source(tmp_path / "weights.safetensors")


def test_bin_only_checkpoint(sources, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(sources["qwen2"] / "config.json", src / "config.json")
    torch.save({}, src / "pytorch_model.bin")
    with pytest.raises(SourceTensorError, match=r"no safetensors files \(found \['pytorch_model.bin'\]: re-save"):
        check_source_tensors(read_source(src))


def _rewrite_single(src, tmp_path, edit):
    out = tmp_path / "broken"
    shutil.copytree(src, out)
    state = load_file(str(out / "model.safetensors"))
    edit(state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_missing_tensor(sources, tmp_path):
    src = _rewrite_single(sources["qwen2"], tmp_path, lambda s: s.pop("model.layers.2.self_attn.k_proj.bias"))
    with pytest.raises(SourceTensorError, match=r"missing 1 tensor\(s\).*model.layers.2.self_attn.k_proj.bias"):
        check_source_tensors(read_source(src))
    with pytest.raises(SourceTensorError, match=r"missing"):  # run_convert checks before writing anything
        run_convert(ConvertConfig(source=str(src), out=str(tmp_path / "out"), sparse_layers=(0, 3)))
    assert not (tmp_path / "out").exists()


def test_mismatched_shape(sources, tmp_path):
    def edit(state):
        state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    src = _rewrite_single(sources["qwen2"], tmp_path, edit)
    msg = r"model.layers.1.mlp.up_proj.weight has shape \[95, 64\], but config.json implies \[96, 64\]"
    with pytest.raises(SourceTensorError, match=msg):
        check_source_tensors(read_source(src))


def test_unexpected_tensor(sources, tmp_path):
    def edit(state):
        state["model.layers.0.self_attn.sinks"] = torch.zeros(4)
    src = _rewrite_single(sources["qwen2"], tmp_path, edit)
    with pytest.raises(SourceTensorError, match=r"1 tensor\(s\) no SALA weight takes, e.g. \['model.layers.0.self_attn.sinks'\]"):
        check_source_tensors(read_source(src))


def test_missing_shard(sources, tmp_path):
    src = tmp_path / "sharded"
    shutil.copytree(sources["llama"], src)
    next(iter(sorted(src.glob("model-*.safetensors")))).unlink()
    with pytest.raises(SourceTensorError, match=r"source checkpoint unreadable: shard model-00001-of-\d+.safetensors .* is missing"):
        check_source_tensors(read_source(src))


def test_config_validation():
    with pytest.raises(ValueError, match=r"exactly one of sparse_layers"):
        ConvertConfig(source="a", out="b")
    with pytest.raises(ValueError, match=r"exactly one of sparse_layers"):
        ConvertConfig(source="a", out="b", sparse_layers=(0,), select="auto")
    with pytest.raises(ValueError, match=r"select must be 'auto'"):
        ConvertConfig(source="a", out="b", select="halo")
    with pytest.raises(ValueError, match=r"o_gate_init must be one of"):
        ConvertConfig(source="a", out="b", sparse_layers=(0,), o_gate_init="ones")
    with pytest.raises(ValueError, match=r"max_shard_size must look like"):
        ConvertConfig(source="a", out="b", sparse_layers=(0,), max_shard_size="lots")


def test_sparse_layer_out_of_range(sources, tmp_path):
    with pytest.raises(ValueError, match=r"sparse layer indices \[7\] out of range for 4 layers"):
        run_convert(ConvertConfig(source=str(sources["qwen2"]), out=str(tmp_path / "o"), sparse_layers=(0, 7)))
