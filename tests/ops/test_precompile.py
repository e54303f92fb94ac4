"""Precompiling the sparse selection: every compile-time block-count class a chunked prefill up to the planned
length launches is compiled ahead by ``SALAModel.precompile`` (the engine's runner calls it at start), so a first
long request compiles nothing new (issue 15: the 128K bench row paid new variants inside its TTFT)."""

from __future__ import annotations

import pytest
import torch

import sala.ops.infllm_v2.topk as topk
from sala.model import SALAForCausalLM


class _Recorder:
    """Stands in for the Triton selection kernel: records each launch's compile key as Triton would form it (the
    constexprs, and for each specialised integer argument whether it is 1 or divisible by 16), then launches the
    real kernel."""

    def __init__(self, kernel):
        self.kernel, self.nbp, self.keys, self.rows = kernel, [], [], []
        names = list(kernel.arg_names) if hasattr(kernel, "arg_names") else list(kernel.fn.arg_names)
        exempt = getattr(kernel, "do_not_specialize", None)  # compiled JITFunction, or the interpreter's kwargs
        exempt = set(exempt if exempt is not None else getattr(kernel, "kwargs", {}).get("do_not_specialize") or ())
        assert "T" in exempt  # the recorder must see the kernel's real exemptions
        self.specialised = [i for i, n in enumerate(names) if n not in exempt and not n.isupper()]

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.nbp.append(kwargs["NBP"])
            ints = tuple((args[i] == 1, args[i] % 16 == 0) for i in self.specialised
                         if i < len(args) and isinstance(args[i], int))
            self.keys.append((tuple(sorted(kwargs.items())), ints))
            self.rows.append(args[5])  # T
            return launch(*args, **kwargs)
        return run


def test_precompile_covers_every_class_a_chunked_prefill_launches(monkeypatch, tiny_sparse_config):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SALA_BACKEND", "triton")
    model = SALAForCausalLM(tiny_sparse_config).eval()
    recorder = _Recorder(topk._select_kernel)
    monkeypatch.setattr(topk, "_select_kernel", recorder)
    max_len = 264  # block_size 16: up to 17 blocks, classes 1..32
    classes = model.model.precompile(max_len)
    assert classes == [1, 2, 4, 8, 16, 32]
    assert sorted(set(recorder.nbp)) == classes
    precompiled = set(recorder.keys)
    recorder.nbp.clear()
    recorder.keys.clear()
    recorder.rows.clear()
    cache = model.model.new_cache()
    ids = torch.randint(3, tiny_sparse_config.vocab_size, (1, max_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a in range(0, max_len, 48):  # full chunks of 48 rows, the last one of 24
            model(ids[:, a:a + 48], past_key_values=cache, use_cache=True)
    assert recorder.nbp and set(recorder.nbp) <= set(classes)
    full = {key for key, rows in zip(recorder.keys, recorder.rows) if rows % 16 == 0}
    assert full and full <= precompiled, full - precompiled  # full chunks: nothing new to compile


def test_precompile_is_a_no_op_without_triton_or_sparse_attention(tiny_sparse_config, monkeypatch):
    monkeypatch.delenv("SALA_BACKEND", raising=False)
    model = SALAForCausalLM(tiny_sparse_config).eval()
    assert model.model.precompile(4096) == []  # CPU tensors: the cpu backend compiles nothing
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SALA_BACKEND", "triton")
    assert model.model.precompile(32) == []  # below dense_len (64) selection never runs
    tiny_sparse_config.sparse_attention = False
    assert SALAForCausalLM(tiny_sparse_config).model.precompile(4096) == []
    from sala.ops import precompile_selection
    from sala.ops.infllm_v2 import InfLLMv2Params

    with pytest.raises(ValueError, match="max_keys >= 1 and kv_heads >= 1"):
        precompile_selection(0, InfLLMv2Params(), 2, torch.float32, torch.device("cpu"))


def _compiled_variants(kernel) -> int:
    """Kernels Triton compiled for this JIT function on the current CUDA device (its per-device kernel cache)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps no per-device kernel cache to inspect")
    return sum(len(entry[0]) for entry in caches.values())


@pytest.mark.gpu
def test_after_precompile_full_chunks_compile_nothing_on_a_gpu():
    """On a GPU: the runner's precompile, then a chunked prefill of full 8192-token chunks up to 64K keys, compiles
    no new selection variant (the cause suspected for the 128K bench row)."""
    from sala.engine.kv_cache import StaticCache
    from sala.engine.runner import ModelRunner
    from sala.model import preset

    config = preset("small", max_position_embeddings=70000)
    model = SALAForCausalLM(config).to("cuda", torch.bfloat16).eval()
    cache = StaticCache(config, 1, 65536, torch.bfloat16, "cuda")
    runner = ModelRunner(model, cache, cuda_graphs=False)  # precompiles up to 65536 keys
    before = _compiled_variants(topk._select_kernel)
    ids = torch.randint(3, config.vocab_size, (65536,), device="cuda")
    for a in range(0, 65536, 8192):
        runner.prefill(0, ids[a:a + 8192], want_logits=a + 8192 >= 65536)
    assert _compiled_variants(topk._select_kernel) == before
