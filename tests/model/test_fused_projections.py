"""Inference-time projection fusion (``SALAForCausalLM.fuse_projections``): one GEMM for q/k/v/gate and for
gate/up gives the separate GEMMs' results, keeps the checkpoint's parameters (as views), leaves training on the
separate path, and stops serving once a parameter is replaced."""

from __future__ import annotations

import pytest
import torch

from sala.model import SALAForCausalLM
from sala.utils.testing import assert_close
from tests.conftest import randomize_


def _model(config, seed=0, **over):
    for key, value in over.items():
        setattr(config, key, value)
    return randomize_(SALAForCausalLM(config), seed=seed).eval()


def _ids(config, B=2, T=70, seed=3):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "qkv-bias"])
def test_fused_forward_equals_separate(tiny_sparse_config, bias):
    model = _model(tiny_sparse_config, qkv_bias=bias)
    ids = _ids(tiny_sparse_config)  # 70 tokens: past dense_len, both mixers and the sparse path run
    names = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids).logits
        model.fuse_projections()
        got = model(ids).logits
    assert_close(got, want, 1e-6, "fused logits")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == names  # checkpoint layout unchanged
    attn = model.model.layers[0].self_attn
    block = attn._fused.weight
    assert attn.q_proj.weight.data_ptr() == block.data_ptr()  # the Linears' weights are views of one block
    assert attn.k_proj.weight.data_ptr() == block[attn.q_proj.out_features :].data_ptr()


def test_training_keeps_separate_gemms_and_gradients(tiny_sparse_config):
    ref, fused = _model(tiny_sparse_config, seed=1), _model(tiny_sparse_config, seed=1)
    fused.fuse_projections()
    ids = _ids(tiny_sparse_config, B=1, T=40)
    for m in (ref, fused):
        m.train()
        m(ids, labels=ids).loss.backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert q.grad is not None, name
        assert_close(q.grad, p.grad, 1e-6, name)


def test_replaced_parameters_stop_the_fused_path(tiny_sparse_config):
    model = _model(tiny_sparse_config, seed=2)
    model.fuse_projections()
    ids = _ids(tiny_sparse_config, B=1, T=30)
    model.double()  # new parameter tensors: the stale fp32 block must not be used, nor kept alive
    assert all(getattr(m, "_fused", None) is None for m in model.modules())  # dropped by the cast itself
    with torch.no_grad():
        got = model(ids).logits
    fresh = _model(tiny_sparse_config, seed=2).double()
    with torch.no_grad():
        assert_close(got, fresh(ids).logits, 1e-12, "after .double()")
    model.fuse_projections()  # fusing again serves the new parameters
    with torch.no_grad():
        assert_close(model(ids).logits, got, 1e-12, "re-fused")


def test_load_state_dict_after_fusion_reaches_the_fused_block(tiny_sparse_config):
    model, other = _model(tiny_sparse_config, seed=4), _model(tiny_sparse_config, seed=5)
    model.fuse_projections()
    model.load_state_dict(other.state_dict())  # in-place copies into the views
    ids = _ids(tiny_sparse_config, B=1, T=30)
    with torch.no_grad():
        assert_close(model(ids).logits, other(ids).logits, 1e-6, "loaded weights")


def test_swapped_module_and_refusion(tiny_sparse_config):
    """A Linear swapped for another module (an adapter, a quantised layer) is used, not the old block; re-fusing
    after a dtype change serves the new parameters, and the optimizer's Parameter objects survive fusion."""
    model = _model(tiny_sparse_config, seed=6)
    params_before = [id(p) for p in model.parameters()]
    model.fuse_projections()
    assert [id(p) for p in model.parameters()] == params_before  # an optimizer built earlier still holds them
    ids = _ids(tiny_sparse_config, B=1, T=20)
    attn = model.model.layers[0].self_attn
    new_q = torch.nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    torch.nn.init.normal_(new_q.weight, std=0.3)
    attn.q_proj = new_q
    with torch.no_grad():
        got = model(ids).logits
        model.model.layers[0].self_attn._fused = None  # the separate path: the reference
        want = model(ids).logits
    assert_close(got, want, 1e-6, "swapped q_proj")
    model.fuse_projections()
    model.double()
    model.fuse_projections()  # stale block replaced at once, not at the next forward
    assert attn._fused.weight.dtype == torch.float64 and attn._fused.serves(attn._input_linears())


def test_fusion_under_inference_mode_keeps_parameters_trainable(tiny_sparse_config):
    model = _model(tiny_sparse_config, seed=7)
    with torch.inference_mode():
        model.fuse_projections()
    ids = _ids(tiny_sparse_config, B=1, T=20)
    model(ids, labels=ids).loss.backward()  # no "inference tensors cannot be saved for backward"
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_autocast_mixed_residual_dtypes(tiny_sparse_config, monkeypatch):
    """Under autocast the residual stream is fp32 and the mixer output bf16: the add+norm takes the two-op path.
    Fused == separate projections under autocast, and both stay within bf16 error of the fp32 model."""
    import sala.model.modeling_sala as modeling

    model = _model(tiny_sparse_config, seed=8)
    ids = _ids(tiny_sparse_config, B=1, T=20)
    seen, add_norm = set(), modeling.residual_rms_norm

    def spy(h, y, *args, **kwargs):
        seen.add((h.dtype, y.dtype))
        return add_norm(h, y, *args, **kwargs)

    monkeypatch.setattr(modeling, "residual_rms_norm", spy)
    with torch.no_grad():
        want = model(ids).logits  # fp32 throughout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            separate = model(ids).logits
        model.fuse_projections()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids).logits
    assert (torch.float32, torch.bfloat16) in seen  # the mixed add really ran
    assert_close(logits, separate, 1e-6, "fused vs separate under autocast")  # measured: identical
    assert_close(logits, want, 3e-2, "autocast vs fp32")  # measured 1.1e-2


def test_mixers_get_autocast_dtype_operands(tiny_sparse_config, monkeypatch):
    """Autocast does not reach the Triton mixers: under it, q, k, v enter the Lightning and the sparse attention in
    autocast's dtype (fp32 qk-norm weights had promoted q and k to fp32 beside a bf16 v, which ran training's
    Lightning dots in 3xTF32), and the Lightning writes its output in it too (an fp32 output kept the backward's
    gradient, and so its three passes, in fp32). The logits stay within bf16 error of the fp32 model; without
    autocast everything keeps the model's dtype. Both layer kinds have qk-norm here, so both had fp32 q and k."""
    import sala.model.modeling_sala as modeling
    from sala.model.cache import NoCache

    model = _model(tiny_sparse_config, seed=9, attn_qk_norm=True)
    ids = _ids(tiny_sparse_config, B=1, T=20)
    seen, lightning, attend = [], modeling.chunk_lightning, NoCache.attend

    def spy_lightning(q, k, v, *args, **kwargs):
        seen.append(("lightning", q.dtype, k.dtype, v.dtype, kwargs["output_dtype"]))
        return lightning(q, k, v, *args, **kwargs)

    def spy_attend(self, q, k, v, *args, **kwargs):
        seen.append(("sparse", q.dtype, k.dtype, v.dtype))
        return attend(self, q, k, v, *args, **kwargs)

    monkeypatch.setattr(modeling, "chunk_lightning", spy_lightning)
    monkeypatch.setattr(NoCache, "attend", spy_attend)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits  # no cache: the sparse layers attend through NoCache
        assert {dt for _, *dts in seen for dt in dts} == {torch.float32}
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids, use_cache=False).logits
    assert {kind for kind, *_ in seen} == {"lightning", "sparse"}
    assert all(set(dts) == {torch.bfloat16} for _, *dts in seen), seen
    assert_close(got, want, 3e-2, "autocast vs fp32")


@pytest.mark.parametrize("fused", [False, True])
def test_cpu_mlp_row_chunks_equal_the_whole(tiny_sparse_config, monkeypatch, fused):
    """Long CPU inputs run the MLP ``CPU_ROWS`` tokens at a time (small activations); a batch of 2 x 37 tokens
    in chunks of 8 (the last one short, chunks crossing the batch rows) equals the one-call MLP."""
    from sala.model.modeling_sala import SALAMLP

    mlp = randomize_(SALAForCausalLM(tiny_sparse_config)).float().model.layers[1].mlp
    if fused:
        mlp.fuse_projections()
    x = torch.randn(2, 37, tiny_sparse_config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        whole = mlp(x)
        monkeypatch.setattr(SALAMLP, "CPU_ROWS", 8)
        chunked = mlp(x)
    assert chunked.shape == whole.shape
    assert_close(chunked, whole, rtol=1e-6)
    with torch.enable_grad():  # training keeps one call (autograd through the chunks' writes is not wanted)
        y = mlp(x.requires_grad_())
    assert y.grad_fn is not None and "CopySlices" not in type(y.grad_fn).__name__
