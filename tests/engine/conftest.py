"""Fixtures for engine tests: tiny random models (fixed seeds), a demo checkpoint with the bundled tokenizer."""

from __future__ import annotations

import pytest
import torch

from sala.model import SALAForCausalLM, preset

# spec §5.5: dense == sparse for queries whose block index is < K_sel, so a path-independent tiny config needs
# dense_len <= (topk + window_size / block_size) * block_size = (3 + 2) * 16 = 80.
PATH_INDEPENDENT_SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3, dense_len=64)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny matmuls are ~20x slower with 2 threads than with 1 on small CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(sparse_config: dict | None = None, seed: int = 0, **overrides) -> SALAForCausalLM:
    torch.manual_seed(seed)
    config = preset("tiny-sparse", sparse_config=sparse_config or PATH_INDEPENDENT_SPARSE, **overrides)
    return SALAForCausalLM(config).eval()


@pytest.fixture(scope="session")
def sparse_model() -> SALAForCausalLM:
    """tiny-sparse with a path-independent sparse config (dense below 64 tokens, InfLLM-v2 from 64)."""
    return make_model()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from sala.engine.demo import make_demo_checkpoint

    return make_demo_checkpoint(tmp_path_factory.mktemp("demo"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    from sala.engine.loader import load_model

    return load_model(str(demo_dir), device="cpu", dtype="float32")


def random_prompt(n: int, seed: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()
