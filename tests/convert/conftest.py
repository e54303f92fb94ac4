"""Session-wide tiny source checkpoints for the convert tests (built once, read-only afterwards)."""

from __future__ import annotations

import pytest

from tests.convert.convert_sources import hf_source, minicpm_source


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> dict:
    """family -> checkpoint dir. Llama (q/k/v/o biases), Qwen3 (qk-norm, head_dim != hidden/heads) and MiniCPM
    (tied, muP) are sharded; Qwen2 has q/k/v biases; Mistral has a sliding window."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "llama": hf_source(root / "llama", "llama", shard="40KB", attention_bias=True),
        "mistral": hf_source(root / "mistral", "mistral", sliding_window=512),
        "qwen2": hf_source(root / "qwen2", "qwen2"),
        "qwen3": hf_source(root / "qwen3", "qwen3", shard="40KB", head_dim=24),
        "qwen3_tied": hf_source(root / "qwen3_tied", "qwen3", tie_word_embeddings=True),
        "minicpm": minicpm_source(root / "minicpm", tie=True, shard=True),
        "minicpm_untied": minicpm_source(root / "minicpm_untied", tie=False),
    }
