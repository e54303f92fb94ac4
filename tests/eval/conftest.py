"""Fixtures of the eval tests: tiny random models (a SALA preset, a dense Llama directory with the bundled
tokenizer, with and without a chat template) and a small English text written here. Nothing is downloaded."""

from __future__ import annotations

import json
import random

import pytest
import torch

# Short sentences of plain English, shuffled into a few thousand words of haystack.
SENTENCES = [
    "The river ran quietly past the old mill.", "A small boat drifted toward the northern shore.",
    "Children played in the meadow until the evening bell.", "The baker opened his shop before sunrise.",
    "Snow covered the hills for most of the winter.", "Travellers rested at the inn by the bridge.",
    "The library kept maps of every road in the valley.", "Farmers brought apples and pears to the market.",
    "A gentle wind moved the tall grass by the lake.", "The lighthouse keeper wrote a letter every week.",
    "Two cats slept in the sun on the garden wall.", "The teacher read a story about a brave fox.",
    "Rain fell softly on the roofs of the village.", "An old clock struck noon in the town square.",
    "The musicians practised in the hall after dinner.", "Fresh bread and honey were served at breakfast.",
]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny matmuls are much slower with 2 threads than with 1 on small CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def english_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out, n = [], 0
    while n < words:
        s = rng.choice(SENTENCES)
        out.append(s)
        n += len(s.split())
    return " ".join(out)


@pytest.fixture(scope="session")
def haystack_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "haystack.txt"
    path.write_text(english_text(6000))
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from sala.engine.demo import demo_tokenizer_dir
    from sala.engine.loader import load_tokenizer

    return load_tokenizer(demo_tokenizer_dir())


def make_llama_dir(directory, chat_template: bool = True, max_positions: int = 1024, seed: int = 0):
    """A tiny random LlamaForCausalLM checkpoint with the bundled tokenizer (optionally without chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sala.engine.demo import copy_demo_tokenizer

    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=4,
                         pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # init std 0.02 gives near-uniform logits; make them informative
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    copy_demo_tokenizer(directory)
    if not chat_template:
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("chat_template", None)
        cfg_path.write_text(json.dumps(cfg))
        for extra in directory.glob("chat_template.*"):
            extra.unlink()
    return directory


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("llama"), max_positions=2048)


@pytest.fixture(scope="session")
def llama_plain_dir(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("llama_plain"), chat_template=False, max_positions=512)
