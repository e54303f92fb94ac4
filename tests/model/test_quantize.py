"""FP8 weight quantisation of a whole model (``quantize_fp8_``): which Linears are replaced, logits close to the
unquantised model, generate() through the HybridCache, fused projections dropped, dtype casts keep the fp8
format, state_dict round trip through safetensors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sala.model import SALAForCausalLM
from sala.model.checkpoint_io import CheckpointError
from sala.model.quantize import FP8Config, FP8Linear, quantize_fp8_
from sala.utils.testing import assert_close, rel_l2
from tests.conftest import randomize_

FP8 = torch.float8_e4m3fn


def _model(config, seed=0, **over):
    """A random tiny model. std 0.1 keeps each projection's gain below 1 (0.1 * sqrt(hidden 64)), as in a trained
    network; at randomize_'s default 0.2 the random layers amplify any rounding 2-3x (bf16's logit error too)."""
    for key, value in over.items():
        setattr(config, key, value)
    return randomize_(SALAForCausalLM(config), std=0.1, seed=seed).float().eval()


def _ids(config, B=2, T=70, seed=3):  # 70 tokens: past dense_len = 64, so the sparse path runs too
    return torch.randint(3, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _expected_names(model) -> set[str]:
    names = set()
    for i, layer in enumerate(model.model.layers):
        attn = ["q_proj", "k_proj", "v_proj", "o_proj"] + [n for n in ("z_proj", "o_gate") if hasattr(layer.self_attn, n)]
        names |= {f"model.layers.{i}.self_attn.{n}" for n in attn}
        names |= {f"model.layers.{i}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    return names


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_fp8_linear_module_from_a_linear(bias):
    from sala.ops import fp8_linear, quantize_fp8_weight

    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(48, 24, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(0.1 * torch.randn(24, 48, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(24, generator=g))
    m = FP8Linear.from_linear(lin)
    q, s = quantize_fp8_weight(lin.weight)
    assert torch.equal(m.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(m.weight_scale, s)
    assert (m.bias is None) if not bias else torch.equal(m.bias, lin.bias)
    x = torch.randn(3, 5, 48, generator=g)
    with torch.no_grad():
        out = m(x)
        assert torch.equal(out, fp8_linear(x, q, s, lin.bias))
        assert_close(out, lin(x), 6e-2, "FP8Linear vs Linear")
    assert (m.in_features, m.out_features) == (48, 24)


def test_replaces_exactly_the_decoder_projections(tiny_sparse_config):
    model = _model(tiny_sparse_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = quantize_fp8_(model)
    expected = _expected_names(model)
    assert len(names) == len(set(names)) and set(names) == expected
    assert any(".z_proj" in n for n in names) and any(".o_gate" in n for n in names)  # both mixer kinds present
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if name in expected:
            assert type(module) is FP8Linear and module.weight.dtype == FP8 and module.weight_scale.dtype == torch.float32
        else:
            assert type(module) is not FP8Linear
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    state = model.state_dict()
    replaced_weights = {n + ".weight" for n in expected}
    assert set(state) == set(before) | {n + ".weight_scale" for n in expected}
    for key, value in before.items():  # embeddings, norms, lm_head: untouched
        if key not in replaced_weights:
            assert torch.equal(state[key], value), key
    w = model.model.layers[0].mlp.down_proj
    assert "float8_e4m3fn" in repr(w) and f"in_features={w.in_features}" in repr(w)


def test_skip_leaves_named_projections(tiny_sparse_config):
    model = _model(tiny_sparse_config)
    names = quantize_fp8_(model, skip=("lm_head", "o_proj", "model.layers.2.mlp"))
    assert not any(n.endswith("o_proj") or n.startswith("model.layers.2.mlp.") for n in names)
    assert set(names) == {n for n in _expected_names(model)
                          if not (n.endswith("o_proj") or n.startswith("model.layers.2.mlp."))}
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    assert type(model.model.layers[2].mlp.up_proj) is nn.Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "qkv-bias"])
def test_logits_stay_close_to_the_unquantised_model(tiny_sparse_config, dtype, bias):
    model = _model(tiny_sparse_config, qkv_bias=bias).to(dtype)
    ids = _ids(tiny_sparse_config)
    quant = copy.deepcopy(model)
    quantize_fp8_(quant)
    with torch.no_grad():
        ref = model(ids).logits
        out = quant(ids).logits
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = rel_l2(out, ref)
    assert err < 0.1, f"fp8 logits rel L2 {err:.3e}"
    assert err > 1e-3  # the projections really are quantised
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.8, f"greedy next-token agreement {agree:.2f}"


def test_generate_with_the_hybrid_cache(tiny_sparse_config):
    model = _model(tiny_sparse_config)
    quantize_fp8_(model)
    a = _ids(tiny_sparse_config, B=1, T=60, seed=4)
    with torch.no_grad():
        out = model.generate(a, max_new_tokens=8, do_sample=False)  # decode crosses dense_len = 64
        seq = a
        for _ in range(8):  # per-token activation scales: the cached decode equals a full recompute
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert out.shape == (1, 68) and torch.equal(out, seq)


@pytest.mark.parametrize("group", [None, 32], ids=["rowwise", "group32"])
def test_fused_projections_become_fused_fp8_groups(tiny_sparse_config, group):
    """Quantising drops the bf16 fused blocks; fuse_projections() then fuses the FP8Linear groups (codes, scales and
    biases concatenated, the modules' buffers views of them): same logits as the separate fp8 projections, one
    input quantisation and one GEMM per group; a module moved afterwards unfuses its group."""
    from sala.model.quantize import FusedFP8Linears

    plain, fused = _model(tiny_sparse_config, qkv_bias=True), _model(tiny_sparse_config, qkv_bias=True)
    ids = _ids(tiny_sparse_config)
    fused.fuse_projections()
    assert fused.model.layers[0].self_attn._fused is not None and fused.model.layers[0].mlp._fused is not None
    quantize_fp8_(plain, group_size=group)
    quantize_fp8_(fused, group_size=group)
    for layer in fused.model.layers:
        assert layer.self_attn._fused is None and layer.mlp._fused is None
    with torch.no_grad():
        want = plain(ids).logits
        assert torch.equal(fused(ids).logits, want)
        fused.fuse_projections()
        attn = fused.model.layers[1].self_attn
        assert isinstance(attn._fused, FusedFP8Linears) and isinstance(fused.model.layers[1].mlp._fused, FusedFP8Linears)
        assert attn.q_proj.weight.data_ptr() == attn._fused.weight.data_ptr()  # views, not copies
        calls = []
        import sala.model.quantize as quantize

        real, real_glued = quantize.fp8_linear, quantize.fp8_glue_linear
        quantize.fp8_linear = lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k)
        quantize.fp8_glue_linear = lambda *a, **k: calls.append(a[0]) or real_glued(*a, **k)
        try:
            assert_close(fused(ids).logits, want, 1e-6, "fused fp8 groups vs separate")
        finally:
            quantize.fp8_linear, quantize.fp8_glue_linear = real, real_glued
        layers = len(fused.model.layers)
        assert len(calls) == layers * 4  # per layer: fused q/k/v(/gate), o_proj, fused gate/up, down_proj
        assert calls.count("silu_mul") == layers  # down_proj takes SwiGLU's two inputs
        state = {k: v.clone() for k, v in fused.state_dict().items()}
        assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"].view(torch.uint8),
                           plain.state_dict()["model.layers.1.self_attn.q_proj.weight"].view(torch.uint8))
        attn.k_proj = copy.deepcopy(attn.k_proj)  # replaced module: the group no longer serves
        assert_close(fused(ids).logits, want, 1e-6, "after unfusing")
        assert attn._fused.weight is None
    with torch.inference_mode():  # fused under inference mode (the engine), then loaded outside it
        fused.fuse_projections()
    fused.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert_close(fused(ids).logits, want, 1e-6, "after load_state_dict into the fused block")
    with pytest.raises(ValueError, match="quantised already"):
        quantize_fp8_(fused, group_size=None)  # would rewrite quantization_config for codes it did not make


def test_state_dict_round_trip_through_safetensors(tiny_sparse_config, tmp_path):
    model = _model(tiny_sparse_config, qkv_bias=True)
    quantize_fp8_(model)
    path = tmp_path / "fp8.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_file(str(path))
    assert loaded["model.layers.0.self_attn.q_proj.weight"].dtype == FP8
    assert loaded["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    other = _model(tiny_sparse_config, seed=5)  # different random weights, then the same structure
    quantize_fp8_(other)
    other.load_state_dict(loaded)
    ids = _ids(tiny_sparse_config)
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)
    fresh = _model(tiny_sparse_config, seed=6)
    quantize_fp8_(fresh)
    with pytest.raises(RuntimeError, match="FP8Linear loads float8_e4m3fn weights"):
        fresh.load_state_dict(_model(tiny_sparse_config, seed=7).state_dict(), strict=False)


def test_dtype_casts_keep_the_fp8_format(tiny_sparse_config):
    model = _model(tiny_sparse_config, qkv_bias=True)
    quantize_fp8_(model)
    q = model.model.layers[0].self_attn.q_proj
    weight, scale = q.weight.clone(), q.weight_scale.clone()
    model.to(torch.bfloat16)
    assert q.weight.dtype == FP8 and torch.equal(q.weight.float(), weight.float())
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, scale)
    assert q.bias.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(_ids(tiny_sparse_config)).logits
    assert torch.isfinite(out).all()


def test_refuses_non_sala_models_and_adapters(tiny_sparse_config):
    with pytest.raises(ValueError, match="wants a SALA model"):
        quantize_fp8_(nn.Sequential(nn.Linear(4, 4)))

    class Adapter(nn.Linear):
        pass

    model = _model(tiny_sparse_config)
    model.model.layers[1].mlp.up_proj = Adapter(tiny_sparse_config.hidden_size, tiny_sparse_config.intermediate_size)
    with pytest.raises(ValueError, match="up_proj is a Adapter"):
        quantize_fp8_(model)


@pytest.mark.parametrize("group", [None, 32], ids=["rowwise", "group32"])
def test_from_pretrained_quantises_at_load(tiny_sparse_config, tmp_path, group):
    model = _model(tiny_sparse_config, qkv_bias=True)
    model.save_pretrained(tmp_path / "plain")
    loaded = SALAForCausalLM.from_pretrained(tmp_path / "plain", quantization_config=FP8Config(group_size=group)).eval()
    direct = copy.deepcopy(model)
    names = quantize_fp8_(direct, group_size=group)
    for name in names:
        module = loaded.get_submodule(name)
        assert type(module) is FP8Linear and module.group_size == group
        assert torch.equal(module.weight_scale, direct.get_submodule(name).weight_scale)
    ids = _ids(tiny_sparse_config)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, direct(ids).logits)
    assert loaded.config.quantization_config.group_size == group


def test_pre_quantised_checkpoint_round_trip(tiny_sparse_config, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(tiny_sparse_config, qkv_bias=True)
    quantize_fp8_(model, group_size=32, skip=("lm_head", "o_proj"))
    model.save_pretrained(tmp_path / "fp8")
    saved = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "sala_fp8", "group_size": 32, "modules_to_not_convert": ["lm_head", "o_proj"],
                     "calibrated": False}
    ids = _ids(tiny_sparse_config)
    with torch.no_grad():
        want = model(ids).logits
        for loader in (SALAForCausalLM, AutoModelForCausalLM):
            again = loader.from_pretrained(tmp_path / "fp8").eval()
            assert type(again.model.layers[0].mlp.up_proj) is FP8Linear
            assert type(again.model.layers[0].self_attn.o_proj) is nn.Linear  # skipped at save, skipped at load
            assert torch.equal(again(ids).logits, want)
        half = SALAForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
        # a quantization_config passed for a checkpoint quantised already: the checkpoint's own config wins
        with pytest.warns(UserWarning, match="quantization_config` from the model will be used"):
            again = SALAForCausalLM.from_pretrained(tmp_path / "fp8", quantization_config=FP8Config(group_size=64))
        assert again.model.layers[0].mlp.up_proj.group_size == 32
    up = half.model.layers[1].mlp.up_proj
    assert up.weight.dtype == FP8 and up.weight_scale.dtype == torch.float32  # the format's dtypes survive dtype=
    assert torch.equal(up.weight_scale, model.model.layers[1].mlp.up_proj.weight_scale)


def test_pre_quantised_checkpoint_errors(tiny_sparse_config, tmp_path):
    model = _model(tiny_sparse_config)
    model.save_pretrained(tmp_path / "plain")
    quantize_fp8_(model, group_size=32)
    model.save_pretrained(tmp_path / "fp8")

    def edit(folder, **quant):
        path = tmp_path / folder / "config.json"
        cfg = json.loads(path.read_text())
        cfg["quantization_config"] = {**cfg.get("quantization_config", {}), **quant}
        path.write_text(json.dumps(cfg))

    edit("fp8", group_size=64)  # scales of groups of 32 on disk, config says 64
    with pytest.raises(CheckpointError, match=r"weight_scale has shape \[\d+, 2\], config expects \[\d+, 1\]"):
        SALAForCausalLM.from_pretrained(tmp_path / "fp8")
    edit("plain", quant_method="sala_fp8", group_size=32)  # an unquantised checkpoint claiming to be fp8
    with pytest.raises(CheckpointError, match="missing .* tensors, e.g. .*weight_scale"):
        SALAForCausalLM.from_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="unknown keys \\['block'\\]"):
        FP8Config(block=128)
    with pytest.raises(ValueError, match="power of two"):
        FP8Config(group_size=100)


def test_pre_quantised_checkpoint_with_bf16_weights_is_refused(tiny_sparse_config, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(tiny_sparse_config)
    quantize_fp8_(model, group_size=32)
    model.save_pretrained(tmp_path / "fp8")
    path = tmp_path / "fp8" / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.bfloat16)  # e.g. a tool that "converted the checkpoint to bf16"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name} is BF16, .*sala_fp8, group_size 32.* expects F8_E4M3"):
        SALAForCausalLM.from_pretrained(tmp_path / "fp8")
    with pytest.raises(CheckpointError, match=f"{name} is BF16"):  # the config as an object, not a dict
        SALAForCausalLM.from_pretrained(tmp_path / "fp8", config=model.config)


@pytest.mark.parametrize("group", [None, 32], ids=["rowwise", "group32"])
def test_gptq_calibration_beats_round_to_nearest(tiny_sparse_config, group):
    """GPTQ from calibration batches: on held-out inputs of each projection (captured from the unquantised model),
    ||X (W_q - W)^T|| is smaller than with rounding to nearest; same scales, so only the codes moved. Embeddings of
    rank 8 make the inputs correlated, as a trained model's are (with isotropic inputs there is nothing to gain)."""
    model = _model(tiny_sparse_config)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape[0], 8, generator=g) @ torch.randn(8, emb.shape[1], generator=g) / 8**0.5
                  + 0.1 * torch.randn(emb.shape, generator=g))
    rtn, gptq = copy.deepcopy(model), copy.deepcopy(model)
    quantize_fp8_(rtn, group_size=group)
    calibration = [_ids(tiny_sparse_config, B=4, T=70, seed=s) for s in (10, 11)]
    names = quantize_fp8_(gptq, group_size=group, calibration=calibration)
    assert gptq.config.quantization_config.calibrated and len(names) == len(_expected_names(model))
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: inputs.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model(_ids(tiny_sparse_config, B=4, seed=20))
    for h in hooks:
        h.remove()

    def output_error(quant):
        total = 0.0
        for n in names:
            m = quant.get_submodule(n)
            w = m.weight.float() * (m.weight_scale[:, None] if group is None
                                    else m.weight_scale.repeat_interleave(group, 1)[:, :m.in_features])
            total += ((inputs[n] @ (w - model.get_submodule(n).weight).t()) ** 2).sum().item()
        return total ** 0.5

    for n in names:
        assert torch.equal(gptq.get_submodule(n).weight_scale, rtn.get_submodule(n).weight_scale)
    err_rtn, err_gptq = output_error(rtn), output_error(gptq)
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize_fp8_(copy.deepcopy(model), calibration=[])


@pytest.mark.gpu
def test_quantised_bf16_model_on_cuda(tiny_sparse_config):
    """On a GPU the projections take the fp8 GEMM (hidden 64, intermediate 128: multiples of 16)."""
    model = _model(tiny_sparse_config).to("cuda", torch.bfloat16)
    quant = copy.deepcopy(model)
    quantize_fp8_(quant)
    ids = _ids(tiny_sparse_config).cuda()
    with torch.no_grad():
        ref, out = model(ids).logits, quant(ids).logits
        gen = quant.generate(ids[:1, :60], max_new_tokens=8, do_sample=False)
    assert rel_l2(out, ref) < 0.1 and (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert gen.shape == (1, 68)


def test_each_layer_is_calibrated_on_the_quantised_model_own_inputs(tiny_sparse_config, monkeypatch):
    """GPTQ calibrates layer i on the stream that layers 0..i-1, already quantised, produce: exactly the finished
    quantised model's hidden state i (the inputs are chained layer by layer from layer 0's captured inputs)."""
    import sala.model.quantize as quantize
    from sala.ops import scaled_residual

    model = _model(tiny_sparse_config)
    ids = _ids(tiny_sparse_config, B=2, T=70)
    seen = []
    real = quantize._layer_hessians

    def spy(layer, linears, inputs):
        [(h, pending, *_)] = inputs
        seen.append(h.clone() if pending is None else scaled_residual(h, pending, layer.residual_scale))
        return real(layer, linears, inputs)

    monkeypatch.setattr(quantize, "_layer_hessians", spy)
    quantize_fp8_(model, group_size=32, calibration=[ids])
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states
    assert len(seen) == len(model.model.layers)
    for i, stream in enumerate(seen):
        assert torch.equal(stream, want[i]), f"layer {i}"


def test_layer_hessians_are_each_projection_inputs_second_moment(tiny_sparse_config):
    """X^T X / rows of each projection's own inputs, over two batches, whether it shares its input (q/k/v, gate/up)
    or not (o_proj, down_proj); computed here from inputs captured independently."""
    from sala.model.quantize import _first_layer_inputs, _layer_hessians

    model = _model(tiny_sparse_config)
    layer = model.model.layers[1]
    batches = [_ids(tiny_sparse_config, B=2, T=70, seed=s) for s in (1, 2)]
    inputs = _first_layer_inputs(model, model.model.layers[0], batches)
    with torch.no_grad():
        for args in inputs:
            args[0], args[1] = model.model.layers[0](*args)
    names = {"q": layer.self_attn.q_proj, "v": layer.self_attn.v_proj, "o": layer.self_attn.o_proj,
             "up": layer.mlp.up_proj, "down": layer.mlp.down_proj}
    captured = {n: [] for n in names}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: captured[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in names.items()]
    with torch.no_grad():
        for args in inputs:
            layer(*args)
    for h in hooks:
        h.remove()
    got = _layer_hessians(layer, names, inputs)
    for n in names:
        x = torch.cat(captured[n]).double()
        assert_close(got[n].double(), x.t() @ x / x.shape[0], 1e-6, f"{n} hessian")
    assert not torch.allclose(got["q"], got["o"])  # different inputs give different products


def test_glue_before_a_projection_is_quantised_in_one_pass(tiny_sparse_config, monkeypatch):
    """A prefill through the Triton kernels (interpreter) of a group-quantised model: SwiGLU before down_proj and
    the output gate before o_proj go into the fp8 input quantisation (no written glue result), with the same
    logits as the glue kernel followed by the linear."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SALA_BACKEND", "triton")
    import sala.ops.fp8.triton_gemm as triton_gemm

    model = _model(tiny_sparse_config, attn_use_output_gate=True, use_output_gate=True)
    quantize_fp8_(model, group_size=32)
    ids = _ids(tiny_sparse_config, B=1, T=24)  # 24 tokens: past the in-GEMM quantisation of decode-sized inputs
    glues = []
    real = triton_gemm.triton_quantize_groups
    monkeypatch.setattr(triton_gemm, "triton_quantize_groups",
                        lambda *a, **k: glues.append((k.get("glue") or (None,))[0]) or real(*a, **k))
    with torch.no_grad():
        got = model(ids).logits
        monkeypatch.setattr(FP8Linear, "glued", None)  # glued_linear then runs the glue, then the linear
        want = model(ids).logits
    layers = len(model.model.layers)
    assert glues.count("silu_mul") == layers and glues.count("sigmoid_gate") == layers
    assert torch.equal(got, want)
    # a hook on the projection is honoured: the glued path steps aside for nn.Module.__call__
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SALA_BACKEND", "triton")
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert seen == [(1, 24, tiny_sparse_config.intermediate_size)]
