"""SALAConfig: released keys and defaults, round trip, validation errors."""

from __future__ import annotations

import json

import pytest

from sala.model import SALAConfig, mixer_schedule, preset

RELEASED = {
    "architectures": ["MiniCPMSALAForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_minicpm_sala.MiniCPMSALAConfig",
        "AutoModel": "modeling_minicpm_sala.MiniCPMSALAModel",
        "AutoModelForCausalLM": "modeling_minicpm_sala.MiniCPMSALAForCausalLM",
    },
    "model_type": "minicpm_sala", "vocab_size": 73448, "hidden_size": 4096, "intermediate_size": 16384,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 524288, "rope_theta": 10000.0,
    "rope_scaling": None, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "mup_denominator": 32,
    "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.1,
    "pretraining_tp": 1, "bos_token_id": 1, "eos_token_id": [2, 73440], "pad_token_id": 2, "use_cache": True,
    "torch_dtype": "bfloat16", "mixer_types": mixer_schedule(32, (0, 9, 16, 17, 22, 29, 30, 31)),
    "attn_use_rope": False, "attn_use_output_gate": True, "lightning_use_rope": True, "lightning_nh": 32,
    "lightning_nkv": 32, "lightning_head_dim": 128, "lightning_scale": "1/sqrt(d)", "qk_norm": True,
    "use_output_gate": True, "use_output_norm": True,
    "sparse_config": {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                      "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192},
    "transformers_version": "4.56.1",
}


def test_released_config_loads_with_every_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED))
    cfg = SALAConfig.from_pretrained(tmp_path)
    assert cfg.sparse_layers == [0, 9, 16, 17, 22, 29, 30, 31]
    assert cfg.residual_scale == pytest.approx(0.2474873734)
    assert cfg.logit_divisor == 16
    assert cfg.lightning_scale_value() == pytest.approx(128**-0.5)
    assert cfg.eos_token_id == [2, 73440] and cfg.pad_token_id == 2
    assert cfg.auto_map["AutoModelForCausalLM"].endswith("MiniCPMSALAForCausalLM")
    # round trip keeps the on-disk keys
    cfg.save_pretrained(tmp_path / "out")
    again = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("mixer_types", "sparse_config", "lightning_scale", "scale_emb", "auto_map", "lightning_nkv"):
        assert again[key] == RELEASED[key], key


def test_defaults_are_released_values():
    cfg = SALAConfig()
    expected = preset("minicpm-sala-9b")
    assert cfg.to_dict()["mixer_types"] == expected.mixer_types
    assert cfg.sparse_config == RELEASED["sparse_config"]
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.scale_emb) == (4096, 2, 12)


def test_partial_sparse_config_falls_back_to_defaults():
    cfg = SALAConfig(sparse_config={"dense_len": 4096})
    assert cfg.sparse_config["topk"] == 64 and cfg.sparse_config["dense_len"] == 4096


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mixer_types=["minicpm4"] * 31 + ["mamba"]), r"mixer_types\[31\] = 'mamba' is unknown"),
        (dict(mixer_types=["minicpm4"] * 3), "mixer_types has 3 entries but num_hidden_layers is 32"),
        (dict(num_key_value_heads=3), r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(3\)"),
        (dict(lightning_nkv=2), "Lightning layers have no GQA"),
        (dict(sparse_config={"block_size": 60}), r"block_size \(60\) must be a multiple of kernel_stride \(16\)"),
        (dict(sparse_config={"topk": 1}), r"topk \(1\) must exceed init_blocks \(1\)"),
        (dict(sparse_config={"window_size": 100}), "window_size"),
        (dict(sparse_config={"dense_len": -1}), "dense_len must be a non-negative integer"),
        (dict(sparse_config={"kernel_sise": 32}), "unknown keys"),
        (dict(lightning_scale="1/d"), "lightning_scale must be"),
        (dict(hidden_act="gelu"), "hidden_act must be 'silu'"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(num_hidden_layers=4), "mixer_types is required"),
        # issue 17 item 5: these loaded and then produced NaN logits (or ZeroDivisionError)
        (dict(rms_norm_eps=-1e-6), r"rms_norm_eps must be a finite number > 0, got -1e-06"),
        (dict(rope_theta=0), "rope_theta must be a finite number > 0, got 0"),
        (dict(scale_emb=float("nan")), "scale_emb must be a finite number > 0, got nan"),
        (dict(scale_depth=float("inf")), "scale_depth must be a finite number > 0"),
        (dict(dim_model_base=0), "dim_model_base must be a finite number > 0, got 0"),
        (dict(lightning_scale=float("nan")), "lightning_scale must be"),
        # issue 14 item 5: keys the model does not read were accepted with any value and silently ignored
        (dict(lightning_nh=16), r"lightning_nh \(16\) must equal num_attention_heads \(32\)"),
        (dict(lightning_head_dim=64), r"lightning_head_dim \(64\) must equal head_dim \(128\)"),
        (dict(attn_use_rope=True, sparse_config={"use_nope": True}), "use_nope = true with attn_use_rope = true"),
        (dict(sparse_config={"use_nope": "no"}), "use_nope must be true or false, got 'no'"),
    ],
)
def test_invalid_configs_raise_specific_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        SALAConfig(**overrides)


def test_all_mixer_spellings_accepted():
    cfg = SALAConfig(num_hidden_layers=4, mixer_types=["minicpm4", "lightning", "lightning_attn", "lightning-attn"])
    assert cfg.sparse_layers == [0]


def test_presets():
    assert preset("tiny").num_hidden_layers == 4
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="out of range"):
        mixer_schedule(4, (0, 7))


def test_unread_keys_accepted_when_they_agree_with_the_model():
    """Converted checkpoints write lightning_nh = num_attention_heads, lightning_head_dim = head_dim, use_nope false;
    with NoPE softmax layers use_nope is moot, so true loads too."""
    cfg = SALAConfig(num_hidden_layers=4, mixer_types=["minicpm4"] + ["lightning-attn"] * 3, num_attention_heads=9,
                     num_key_value_heads=3, hidden_size=576, head_dim=64, lightning_nh=9, lightning_nkv=9,
                     lightning_head_dim=64, sparse_config={"use_nope": False})
    assert (cfg.lightning_nh, cfg.lightning_head_dim) == (9, 64)
    assert SALAConfig(sparse_config={"use_nope": True}).sparse_config["use_nope"] is True


def test_dense_checkpoint_config_says_convert_first(tmp_path):
    """Issue 14 item 6: a Llama config.json said "mixer_types is required"."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4,
                                                      "hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match=r"this is a llama checkpoint .* run sala convert --from DIR"):
        SALAConfig.from_pretrained(tmp_path)
