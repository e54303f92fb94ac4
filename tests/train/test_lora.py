"""LoRA adapters on a tiny random SALA model: wrap, train, save/load the delta, merge, fingerprint, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from sala.model import SALAForCausalLM, preset
from sala.train.lora import (
    LoRALinear,
    apply_lora,
    load_delta,
    lora_state_dict,
    merge_lora,
    model_fingerprint,
    save_delta,
)
from sala.utils.testing import assert_close
from tests.conftest import randomize_

EXTRAS = ["model.norm.weight", "model.layers.1.self_attn.o_norm.weight"]


@pytest.fixture(scope="module")
def base():
    return randomize_(SALAForCausalLM(preset("tiny")), seed=3).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))


def _out(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _randomize_adapters(model, seed=5):
    """Nonzero B, so outputs actually depend on the adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in lora_state_dict(model).items():
            t.copy_(0.05 * torch.randn(t.shape, generator=g))


def _trained(base, ids, steps=3):
    """A copy of ``base`` with adapters + EXTRAS trained for a few AdamW steps; -> (model, before-state)."""
    model = copy.deepcopy(base).train()
    apply_lora(model, rank=4, alpha=8.0, rank_overrides={"z_proj": 6})
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")) or name in EXTRAS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), before


def test_apply_wraps_targets_and_keeps_output(base, ids):
    model = copy.deepcopy(base)
    y0 = _out(model, ids)
    weight = model.model.layers[0].self_attn.q_proj.weight
    names = apply_lora(model, rank=4, alpha=8.0)
    # every layer's q/k/v/o + its gate (o_gate on sparse layers 0 and 3, z_proj on lightning 1 and 2) + MLP
    assert len(names) == 4 * 8
    assert "model.layers.1.self_attn.z_proj" in names and "model.layers.0.self_attn.o_gate" in names
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.weight is weight and not weight.requires_grad
    assert q.lora_A.shape == (4, 64) and q.lora_B.shape == (64, 4) and q.lora_A.abs().max() > 0
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    torch.testing.assert_close(_out(model, ids), y0, rtol=0, atol=0)  # B = 0: unchanged at init
    assert model_fingerprint(model) == model_fingerprint(base)  # adapters do not change the base's identity


def test_forward_formula():
    lin = nn.Linear(6, 5, bias=True)
    wrapped = LoRALinear(lin, rank=3, alpha=6.0)
    with torch.no_grad():
        wrapped.lora_B.normal_()
    x = torch.randn(4, 6)
    want = x @ lin.weight.T + lin.bias + (x @ wrapped.lora_A.T @ wrapped.lora_B.T) * 2.0
    torch.testing.assert_close(wrapped(x), want)
    assert wrapped.bias is lin.bias


def test_training_changes_only_adapters_and_extras(base, ids):
    model, before = _trained(base, ids)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    adapters = set(lora_state_dict(model))
    assert changed == adapters | set(EXTRAS)


def test_rank_overrides_and_layers(base):
    model = copy.deepcopy(base)
    names = apply_lora(model, rank=2, alpha=4.0, targets=["q_proj", "z_proj"], layers=[1, 3],
                       rank_overrides={"z_proj": 5})
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.z_proj",
                     "model.layers.3.self_attn.q_proj"]  # layer 3 is sparse: no z_proj there
    z = model.model.layers[1].self_attn.z_proj
    assert z.rank == 5 and z.lora_A.shape == (5, 64) and z.scaling == pytest.approx(4.0 / 5)
    assert model.model.layers[1].self_attn.q_proj.rank == 2
    assert not isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)


def test_save_load_roundtrip_exact(base, ids, tmp_path):
    fingerprint = model_fingerprint(base)
    model, _ = _trained(base, ids)
    y = _out(model, ids)
    files = save_delta(tmp_path / "delta", model, extra_names=EXTRAS, base_fingerprint=fingerprint,
                       dtype=torch.float32)
    assert files[-1].name == "delta.json" and all(f.exists() for f in files)
    fresh = copy.deepcopy(base)
    meta = load_delta(tmp_path / "delta", fresh)
    assert meta["rank"] == 4 and meta["rank_overrides"] == {"z_proj": 6} and meta["base_fingerprint"] == fingerprint
    assert fresh.model.layers[1].self_attn.z_proj.rank == 6
    torch.testing.assert_close(_out(fresh, ids), y, rtol=0, atol=0)
    # the file holds only the delta: adapters + extras
    with safe_open(str(files[0]), framework="pt") as f:
        assert set(f.keys()) == set(lora_state_dict(model)) | set(EXTRAS)


def test_save_bf16_default_is_close(base, ids, tmp_path):
    model, _ = _trained(base, ids)
    save_delta(tmp_path / "d", model, extra_names=EXTRAS, base_fingerprint=model_fingerprint(base))
    assert json.loads((tmp_path / "d" / "delta.json").read_text())["dtype"] == "bfloat16"
    fresh = copy.deepcopy(base)
    load_delta(tmp_path / "d", fresh)
    y, y_loaded = _out(model, ids), _out(fresh, ids)
    assert not torch.equal(y, y_loaded)  # bf16 rounding is real ...
    assert_close(y_loaded, y, 1e-2, "logits")  # ... and small


def test_merge_keeps_outputs_and_official_keys(base, ids):
    model = copy.deepcopy(base)
    apply_lora(model, rank=4, alpha=8.0)
    _randomize_adapters(model)
    y = _out(model, ids)
    assert not torch.allclose(y, _out(base, ids), atol=1e-3)  # the adapters matter
    weight = model.model.layers[2].mlp.up_proj.weight
    merge_lora(model)
    assert type(model.model.layers[2].mlp.up_proj) is nn.Linear
    assert model.model.layers[2].mlp.up_proj.weight is weight and weight.requires_grad  # same Parameter, unfrozen
    assert list(model.state_dict()) == list(base.state_dict())
    assert_close(_out(model, ids), y, 1e-5, "logits")
    apply_lora(model, rank=2, alpha=2.0)  # merged: adapters can be applied again


def test_sharding_under_small_max_file_bytes(base, ids, tmp_path):
    model = copy.deepcopy(base)
    apply_lora(model, rank=4, alpha=8.0)
    max_bytes = 8 * 1024
    files = save_delta(tmp_path / "d", model, extra_names=EXTRAS, base_fingerprint="x", max_file_bytes=max_bytes)
    shards = files[:-1]
    assert len(shards) > 3
    assert [f.name for f in shards] == [f"delta-{i:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(1, len(shards) + 1)]
    assert all(f.stat().st_size <= max_bytes for f in shards)
    meta = json.loads(files[-1].read_text())
    assert set(meta["weight_map"].values()) == {f.name for f in shards}
    assert set(meta["weight_map"]) == set(lora_state_dict(model)) | set(EXTRAS)
    with pytest.raises(ValueError, match="raise max_file_bytes"):
        save_delta(tmp_path / "tiny", model, extra_names=EXTRAS, base_fingerprint="x", max_file_bytes=1024)
    assert not (tmp_path / "tiny").exists()


def test_overwrite_refused_then_atomic_replace(base, tmp_path):
    model = copy.deepcopy(base)
    apply_lora(model, rank=2, alpha=2.0)
    target = tmp_path / "d"
    save_delta(target, model, extra_names=[], base_fingerprint="first")
    with pytest.raises(FileExistsError, match="--force"):
        save_delta(target, model, extra_names=[], base_fingerprint="second")
    assert json.loads((target / "delta.json").read_text())["base_fingerprint"] == "first"
    save_delta(target, model, extra_names=[], base_fingerprint="second", overwrite=True, max_file_bytes=8192)
    assert json.loads((target / "delta.json").read_text())["base_fingerprint"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp or old directories left behind
    assert not list(target.glob("delta-*-of-00001.safetensors"))  # the old single shard is gone


def test_fingerprint():
    a = randomize_(SALAForCausalLM(preset("tiny")), seed=1)
    b = randomize_(SALAForCausalLM(preset("tiny")), seed=2)
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(copy.deepcopy(a)) == model_fingerprint(a.state_dict())
    assert len(model_fingerprint(a)) == 16
    assert model_fingerprint(copy.deepcopy(a).to(torch.bfloat16)) == model_fingerprint(a)  # dtype-invariant
    c = copy.deepcopy(a)
    with torch.no_grad():
        c.model.norm.weight[-1] += 0.5
    assert model_fingerprint(c) != model_fingerprint(a)


def test_fingerprint_mismatch_refused(base, tmp_path):
    model = copy.deepcopy(base)
    apply_lora(model, rank=2, alpha=2.0)
    save_delta(tmp_path / "d", model, extra_names=[], base_fingerprint=model_fingerprint(base))
    other = randomize_(SALAForCausalLM(preset("tiny")), seed=99)
    with pytest.raises(ValueError, match=f"belongs to the base model with fingerprint {model_fingerprint(base)}"):
        load_delta(tmp_path / "d", other)
    assert not any(isinstance(m, LoRALinear) for m in other.modules())  # refused before touching the model
    meta = load_delta(tmp_path / "d", other, expected_fingerprint=model_fingerprint(base))  # caller vouches
    assert meta["base_fingerprint"] == model_fingerprint(base)


def test_load_strict_errors(base, tmp_path):
    model = copy.deepcopy(base)
    apply_lora(model, rank=2, alpha=2.0, targets=["q_proj"])
    fp = model_fingerprint(base)
    save_delta(tmp_path / "d", model, extra_names=["model.norm.weight"], base_fingerprint=fp)
    meta_file = tmp_path / "d" / "delta.json"
    meta = json.loads(meta_file.read_text())

    def load_with(**changes):
        meta_file.write_text(json.dumps({**meta, **changes}))
        fresh = copy.deepcopy(base)
        try:
            load_delta(tmp_path / "d", fresh)
        finally:
            assert not any(isinstance(m, LoRALinear) for m in fresh.modules())  # rolled back on error

    with pytest.raises(ValueError, match=r"lacks tensor\(s\) \['model.layers.0.self_attn.k_proj.lora_A'"):
        load_with(targets=["q_proj", "k_proj"], modules=None)
    with pytest.raises(ValueError, match="other modules"):
        load_with(targets=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.lora_A has shape \(2, 64\), the model "
                                         r"expects \(3, 64\)"):
        load_with(rank=3)
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.norm.weight'\]"):
        load_with(extra_names=[])
    with pytest.raises(ValueError, match="model.nope.weight has no counterpart"):
        load_with(extra_names=["model.nope.weight"])
    with pytest.raises(FileNotFoundError, match="no delta.json"):
        load_delta(tmp_path, copy.deepcopy(base))


@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=["q_proj", "qq_proj"]), "unknown LoRA target 'qq_proj'"),
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(alpha=0.0), "alpha must be > 0"),
    (dict(layers=[4]), r"layers must be non-empty indices in \[0, 4\)"),
    (dict(rank_overrides={"up_proj": 4}, targets=["q_proj"]), "'up_proj' is not one of targets"),
    (dict(rank_overrides={"q_proj": 0}), r"rank_overrides\['q_proj'\] must be an integer >= 1"),
])
def test_apply_errors(base, kwargs, match):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=match):
        apply_lora(model, **{"rank": 2, "alpha": 2.0, **kwargs})
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_apply_twice_and_optional_gates(base):
    model = copy.deepcopy(base)
    apply_lora(model, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        merge_lora(copy.deepcopy(base))
    with pytest.raises(ValueError, match="call apply_lora"):
        save_delta("unused", copy.deepcopy(base), extra_names=[], base_fingerprint="x")
    gateless = SALAForCausalLM(preset("tiny", use_output_gate=False, attn_use_output_gate=False))
    names = apply_lora(gateless, rank=2, alpha=2.0)  # default targets: absent gates are skipped, not an error
    assert len(names) == 4 * 7


def test_overwrite_keeps_files_sala_did_not_write(base, tmp_path):
    """Issue 17: an overwrite used to delete the whole delta folder, a user's notes included."""
    model = copy.deepcopy(base)
    apply_lora(model, rank=2, alpha=2.0)
    target = tmp_path / "d"
    save_delta(target, model, extra_names=[], base_fingerprint="first", max_file_bytes=8192)
    (target / "NOTES.md").write_text("mine\n")
    save_delta(target, model, extra_names=[], base_fingerprint="second", overwrite=True)
    assert (target / "NOTES.md").read_text() == "mine\n"
    assert json.loads((target / "delta.json").read_text())["base_fingerprint"] == "second"
    assert sorted(p.name for p in target.glob("delta-*.safetensors")) == ["delta-00001-of-00001.safetensors"]
