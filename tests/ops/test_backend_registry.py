"""The op backend registry (``sala.ops.common.dispatch``): which implementation each op runs for ``auto``,
``naive``, ``cpu`` and ``triton`` on CPU tensors, ``SALA_BACKEND`` forcing, the error for an unknown backend name,
and a backend added by registering functions (then removed)."""

from __future__ import annotations

import pytest
import torch

import sala.ops as ops
from sala.ops.common import dispatch
from sala.ops.common.dispatch import backend_names, implementations, register, resolve, unregister
from sala.ops.elementwise.naive import naive_scaled_residual
from sala.ops.infllm_v2 import InfLLMv2Params
from sala.ops.lightning.naive import naive_chunk_lightning
from sala.ops.norm.naive import naive_rms_norm

CPU = torch.device("cpu")

# Which backends each op implements itself; any other backend name runs the op's ``naive`` implementation.
OWN_BACKENDS = {
    "silu_mul": {"naive", "triton"},
    "sigmoid_gate": {"naive", "triton"},
    "scaled_residual": {"naive", "triton"},
    "rms_norm": {"naive", "triton"},
    "residual_rms_norm": {"naive", "triton"},
    "apply_rope": {"naive", "triton"},
    "qk_norm_rope": {"naive", "triton"},
    "chunk_lightning": {"naive", "cpu", "triton"},
    "lightning_step": {"naive", "triton"},
    "compress_keys": {"naive", "triton"},
    "stage1_block_scores": {"naive", "cpu", "triton"},
    "select_blocks": {"naive", "cpu", "triton"},
    "block_sparse_attention": {"naive", "cpu", "triton"},
    "infllm_v2_attention": {"naive", "cpu", "triton"},
    "dense_causal_attention": {"naive", "cpu", "triton"},
    "varlen_causal_attention": {"naive", "cpu", "triton"},
    "append_compressed_keys": {"naive", "triton"},
    "decode_attention_batch": {"naive", "triton"},
    "fp8_linear": {"naive", "cpu", "triton"},
    "precompile_selection": {"naive", "triton"},
    "kl_rows": {"naive", "triton"},
}

# Ops whose ``triton`` implementation is a CUDA library call for these arguments (fp8_linear with row-wise scales:
# cuBLASLt): CPU tensors run the reference even under the Triton interpreter.
CUDA_ONLY_TRITON = {"fp8_linear"}


def _args(op: str, dtype=torch.float32) -> tuple:
    """Arguments (as each op's public entry passes them to ``dispatch.call``) for the ops whose Triton
    implementation checks its inputs; the others look at none, so none are given."""
    x, y = torch.randn(2, 3, 8, dtype=dtype), torch.randn(2, 3, 8, dtype=dtype)
    w = torch.ones(8, dtype=dtype)
    q, k = torch.randn(1, 3, 2, 8, dtype=dtype), torch.randn(1, 3, 1, 8, dtype=dtype)
    cos, sin = torch.ones(1, 3, 1, 8), torch.zeros(1, 3, 1, 8)
    fp8_weight = torch.randn(16, 8).to(torch.float8_e4m3fn), torch.rand(16) + 0.5
    return {
        "silu_mul": (x, y), "sigmoid_gate": (x, y), "scaled_residual": (x, y, 0.5),
        "rms_norm": (x, w, 1e-6), "residual_rms_norm": (x, y, 0.5, w, 1e-6),
        "apply_rope": (q, cos, sin), "qk_norm_rope": (q, k, w, w, 1e-6, 1e-6, (cos, sin)),
        "fp8_linear": (x, *fp8_weight, None, dtype, None),
        "kl_rows": (torch.randn(3, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype), 1.0, True),
    }.get(op, ())


def _fn(op: str, backend: str):
    return implementations(op)[backend].fn


def test_every_op_registers_its_backends():
    assert {op: set(implementations(op)) for op in OWN_BACKENDS} == OWN_BACKENDS
    assert set(dispatch._IMPLS) == set(OWN_BACKENDS)  # a new op family gets a row in the table above
    assert backend_names() == ("auto", "naive", "cpu", "triton")


@pytest.mark.parametrize("op", sorted(OWN_BACKENDS))
def test_resolution_on_cpu_tensors(op, monkeypatch):
    """auto and cpu: the op's ``cpu`` implementation, or its reference when it has none; naive: the reference."""
    monkeypatch.delenv("SALA_BACKEND", raising=False)
    cpu_impl = _fn(op, "cpu" if "cpu" in OWN_BACKENDS[op] else "naive")
    assert resolve(op, "auto", CPU, *_args(op)) is cpu_impl
    assert resolve(op, "cpu", CPU, *_args(op)) is cpu_impl
    assert resolve(op, "naive", CPU, *_args(op)) is _fn(op, "naive")


@pytest.mark.parametrize("op", sorted(OWN_BACKENDS))
def test_sala_backend_forces_auto(op, monkeypatch):
    """SALA_BACKEND decides what ``auto`` runs; an explicit backend= still wins over it."""
    monkeypatch.setenv("SALA_BACKEND", "naive")
    assert resolve(op, "auto", CPU, *_args(op)) is _fn(op, "naive")
    if "cpu" in OWN_BACKENDS[op]:
        assert resolve(op, "cpu", CPU, *_args(op)) is _fn(op, "cpu")
    monkeypatch.setenv("SALA_BACKEND", "cpu")
    assert resolve(op, "auto", CPU, *_args(op)) is _fn(op, "cpu" if "cpu" in OWN_BACKENDS[op] else "naive")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may take Triton under the interpreter
    monkeypatch.setenv("SALA_BACKEND", "triton")
    assert resolve(op, "auto", CPU, *_args(op)) is _fn(op, "naive" if op in CUDA_ONLY_TRITON else "triton")
    assert resolve(op, "naive", CPU, *_args(op)) is _fn(op, "naive")


def test_sala_backend_forcing_reaches_the_public_entries(monkeypatch):
    """The cpu implementations really run under auto (and not under SALA_BACKEND=naive), spied where they live."""
    import sala.ops.infllm_v2.dense as dense
    import sala.ops.lightning.cpu as lightning_cpu

    calls = []
    for mod, name in ((lightning_cpu, "cpu_chunk_lightning"), (dense, "sdpa_dense_causal_attention")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    q = torch.randn(1, 5, 2, 8)
    slopes = ops.lightning_decay_slopes(2)

    def run():
        calls.clear()
        ops.chunk_lightning(q, q, q, slopes, 0.5)
        ops.dense_causal_attention(q, q, q, None, 0.5)
        return list(calls)

    monkeypatch.delenv("SALA_BACKEND", raising=False)
    assert run() == ["cpu_chunk_lightning", "sdpa_dense_causal_attention"]
    monkeypatch.setenv("SALA_BACKEND", "naive")
    assert run() == []
    o, _ = ops.chunk_lightning(q, q, q, slopes, 0.5)
    assert torch.equal(o, naive_chunk_lightning(q, q, q, slopes, 0.5)[0])
    monkeypatch.setenv("SALA_BACKEND", "cpu")
    assert run() == ["cpu_chunk_lightning", "sdpa_dense_causal_attention"]


def test_triton_declines_inputs_it_cannot_take(monkeypatch):
    """An implementation's ``accepts`` sends other inputs to the reference: fp64 norms, mismatched glue."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("rms_norm", "triton", CPU, *_args("rms_norm")) is _fn("rms_norm", "triton")
    assert resolve("rms_norm", "triton", CPU, *_args("rms_norm", torch.float64)) is naive_rms_norm
    a = torch.randn(4, 8)
    assert resolve("silu_mul", "triton", CPU, a, a.half()) is _fn("silu_mul", "naive")
    a.requires_grad_(True)
    assert resolve("residual_rms_norm", "triton", CPU, a, a, 0.5, torch.ones(8), 1e-6) is _fn("residual_rms_norm", "naive")


def test_unknown_backend_names_are_refused_clearly(monkeypatch):
    monkeypatch.delenv("SALA_BACKEND", raising=False)
    x, w = torch.randn(2, 8), torch.ones(8)
    want = r"backend must be one of 'auto', 'naive', 'cpu', 'triton'; got 'cuda'"
    with pytest.raises(ValueError, match=want):
        ops.rms_norm(x, w, 1e-6, backend="cuda")
    with pytest.raises(ValueError, match=want):
        resolve("chunk_lightning", "cuda", CPU)
    with pytest.raises(KeyError, match="no op named 'rms_nrom'"):
        resolve("rms_nrom", "auto", CPU)
    monkeypatch.setenv("SALA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SALA_BACKEND must be one of .*got 'bogus'"):
        ops.rms_norm(x, w, 1e-6)


def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors or TRITON_INTERPRET=1"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6, backend="triton")


@pytest.fixture
def mine():
    """A backend 'mine' with one op of its own (rms_norm), recording its calls; removed afterwards."""
    calls = []

    def mine_rms_norm(x, weight, eps):
        calls.append(x)
        return naive_rms_norm(x, weight, eps) + 1

    register("rms_norm", "mine", mine_rms_norm)
    try:
        yield calls
    finally:
        unregister("rms_norm", "mine")


def test_registering_a_backend_routes_calls_to_it(mine, monkeypatch):
    monkeypatch.delenv("SALA_BACKEND", raising=False)
    x, w = torch.randn(2, 8), torch.rand(8) + 0.5
    assert backend_names() == ("auto", "naive", "cpu", "triton", "mine")
    out = ops.rms_norm(x, w, 1e-6, backend="mine")
    assert len(mine) == 1 and mine[0] is x and torch.equal(out, naive_rms_norm(x, w, 1e-6) + 1)
    assert ops.rms_norm(x, w, 1e-6) is not None and len(mine) == 1  # auto never picks it
    # ops without a 'mine' implementation run their reference; composites hand 'mine' to the entries they call
    h, y = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.equal(ops.scaled_residual(h, y, 0.5, backend="mine"), naive_scaled_residual(h, y, 0.5))
    r, normed = ops.residual_rms_norm(h, y, 0.5, w, 1e-6, backend="mine")
    assert len(mine) == 2 and torch.equal(normed, naive_rms_norm(r, w, 1e-6) + 1)


def test_unregistering_a_backend_removes_the_name():
    register("rms_norm", "mine", naive_rms_norm)
    assert "mine" in backend_names()
    assert unregister("rms_norm", "mine").fn is naive_rms_norm
    assert "mine" not in backend_names()
    with pytest.raises(ValueError, match="got 'mine'"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6, backend="mine")
    with pytest.raises(KeyError, match="has no 'mine' implementation"):
        unregister("rms_norm", "mine")


def test_accepts_and_takes_backend(monkeypatch):
    """A registered implementation runs only for inputs its ``accepts`` takes; ``takes_backend`` hands it the
    resolved name (here: a ``cpu`` scaled_residual, reached through residual_rms_norm's reference under auto)."""
    monkeypatch.delenv("SALA_BACKEND", raising=False)
    seen = []

    def cpu_scaled_residual(h, y, alpha, backend):
        seen.append(backend)
        return naive_scaled_residual(h, y, alpha)

    register("scaled_residual", "cpu", cpu_scaled_residual, takes_backend=True,
             accepts=lambda h, y, alpha: h.dtype == torch.float32)
    try:
        h, w = torch.randn(2, 8), torch.ones(8)
        ops.residual_rms_norm(h, h, 0.5, w, 1e-6)  # auto on CPU tensors -> cpu -> the reference composite
        assert seen == ["cpu"]
        ops.scaled_residual(h.double(), h.double(), 0.5, backend="cpu")  # declined: the reference runs
        assert seen == ["cpu"]
    finally:
        unregister("scaled_residual", "cpu")
    assert "cpu" not in implementations("scaled_residual")


def test_registration_mistakes_are_refused():
    with pytest.raises(ValueError, match="already has a 'naive' implementation"):
        register("rms_norm", "naive", naive_rms_norm)
    with pytest.raises(ValueError, match="'auto' is a choice between backends"):
        register("rms_norm", "auto", naive_rms_norm)
    with pytest.raises(ValueError, match="cannot be removed"):
        unregister("rms_norm", "naive")
    assert implementations("rms_norm")["naive"].fn is naive_rms_norm


def test_decode_batch_rows_run_on_the_resolved_backend(monkeypatch):
    """decode_attention_batch has no cpu implementation: its row loop (the reference) runs each row's dense
    attention on the resolved backend, so under auto the CPU rows still take SDPA."""
    import sala.ops.infllm_v2.dense as dense

    monkeypatch.delenv("SALA_BACKEND", raising=False)
    calls = []
    real = dense.sdpa_dense_causal_attention
    monkeypatch.setattr(dense, "sdpa_dense_causal_attention", lambda *a: calls.append(1) or real(*a))
    keys = torch.randn(2, 16, 1, 8)
    params = InfLLMv2Params(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=1, topk=2)
    slot, pos = torch.tensor([0, 1]), torch.tensor([3, 9])
    ops.decode_attention_batch(torch.randn(2, 2, 8), keys, keys, None, None, slot, pos, params, 0.3, None)
    assert len(calls) == 2
    ops.decode_attention_batch(torch.randn(2, 2, 8), keys, keys, None, None, slot, pos, params, 0.3, None,
                               backend="naive")
    assert len(calls) == 2
