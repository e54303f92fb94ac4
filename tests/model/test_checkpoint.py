"""Official checkpoint format: save -> load bit-exact, sharded index, Auto classes, strict errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from sala.model import CheckpointError, SALAConfig, SALAForCausalLM, expected_shapes, preset
from tests.conftest import randomize_


@pytest.fixture
def saved(tmp_path, tiny_sparse_config):
    model = randomize_(SALAForCausalLM(tiny_sparse_config)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_official_names_and_param_count():
    cfg = SALAConfig()
    shapes = expected_shapes(cfg)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert total == 9_477_203_968  # spec §2
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (256, 4096)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (4096, 4096)
    assert "model.layers.0.self_attn.o_gate.weight" in shapes and "model.layers.0.self_attn.q_norm.weight" not in shapes
    assert shapes["model.layers.1.self_attn.o_norm.weight"] == (4096,)
    tiny = SALAForCausalLM(preset("tiny"))
    assert {k: tuple(v.shape) for k, v in tiny.state_dict().items()} == expected_shapes(tiny.config)


def test_save_load_round_trip_bit_exact(saved):
    model, path = saved
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["MiniCPMSALAForCausalLM"] and cfg["model_type"] == "minicpm_sala"
    assert cfg["rope_scaling"] is None and cfg["sparse_config"]["dense_len"] == 64
    loaded = SALAForCausalLM.from_pretrained(path).eval()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = torch.randint(3, 512, (1, 100))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_auto_classes_load_without_remote_code(saved):
    model, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_minicpm_sala.MiniCPMSALAConfig",
                       "AutoModelForCausalLM": "modeling_minicpm_sala.MiniCPMSALAForCausalLM"}
    (path / "config.json").write_text(json.dumps(cfg))
    assert isinstance(AutoConfig.from_pretrained(path), SALAConfig)
    auto = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(auto, SALAForCausalLM)
    assert torch.equal(auto.lm_head.weight, model.lm_head.weight)


def test_sharded_checkpoint_with_index(tmp_path, tiny_sparse_config):
    model = randomize_(SALAForCausalLM(tiny_sparse_config)).eval()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_bf16_dtype_preserved(tmp_path):
    model = randomize_(SALAForCausalLM(preset("tiny"))).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    loaded = SALAForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def _rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_an_error(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.z_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensors, e.g. \['model.layers.1.self_attn.z_proj.weight'\]"):
        SALAForCausalLM.from_pretrained(path)


def test_unexpected_tensor_is_an_error(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(16)))
    with pytest.raises(CheckpointError, match="1 unexpected tensors, e.g. \\['model.layers.0.self_attn.q_norm.weight'\\]"):
        AutoModelForCausalLM.from_pretrained(path)


def test_wrong_shape_is_an_error(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(64, 64)))
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \[64, 64\], config expects \[32, 64\]"):
        SALAForCausalLM.from_pretrained(path)


def test_corrupt_and_truncated_safetensors(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        SALAForCausalLM.from_pretrained(path)
    f.write_bytes(b"\xff" * 8 + b"garbage")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        SALAForCausalLM.from_pretrained(path)
    f.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SALAForCausalLM.from_pretrained(path)


def test_missing_shard_and_empty_dir(tmp_path, tiny_sparse_config):
    model = SALAForCausalLM(tiny_sparse_config)
    model.save_pretrained(tmp_path / "s", max_shard_size="100KB")
    shards = sorted((tmp_path / "s").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"shard {shards[-1].name} listed in model.safetensors.index.json is missing"):
        SALAForCausalLM.from_pretrained(tmp_path / "s")
    (tmp_path / "e").mkdir()
    tiny_sparse_config.save_pretrained(tmp_path / "e")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        SALAForCausalLM.from_pretrained(tmp_path / "e")


def test_config_mismatch_with_weights(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["mixer_types"] = ["lightning-attn"] + cfg["mixer_types"][1:]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        SALAForCausalLM.from_pretrained(path)
