"""Shared fixtures: fixed seeds, tiny random official-format checkpoints. Nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in the CPU interpreter in CI; must be set before triton JIT-compiles anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with fresh random values (norm weights around 1), so no test runs on init zeros/ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.3 * (torch.rand(p.shape, generator=g) - 0.5))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def tiny_sparse_config():
    """Tiny config whose InfLLM-v2 path is reached at 64 tokens. dense_len <= K_sel * block (5 * 16 = 80), so
    every position below dense_len attends to all its blocks either way: results are path-independent."""
    from sala.model import preset

    return preset(
        "tiny-sparse",
        sparse_config=dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3, dense_len=64),
    )
