"""A tiny tokenizer shipped with sala (``sala/assets``) and tiny random official-format checkpoints for demos
and tests, so every command runs offline with no download.

The tokenizer is a byte-level BPE (any text round-trips) with 500 entries, built by
:func:`build_demo_tokenizer` from the small corpus below. Special tokens follow MiniCPM's conventions
(spec §9): ``<unk>`` 0, ``<s>`` 1 (BOS, prepended), ``</s>`` 2 (EOS and pad), plus ``<|im_start|>`` 3 and
``<|im_end|>`` 4 for the ChatML template. A checkpoint written by :func:`make_demo_checkpoint` stops on
``[2, 4]`` like the released model stops on ``[2, 73440]``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Iterator

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
DEMO_VOCAB_SIZE = 500
DEMO_EOS_IDS = [2, 4]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A long context model reads a whole book before it answers.
Hybrid attention mixes linear layers, whose state has a fixed size, with sparse softmax layers that pick the
blocks of the past that matter. The engine fills a cache once, then writes one token at a time.
Hello! How are you today? I am fine, thank you. What is the capital of France? The capital of France is Paris.
Please summarise the following document in three sentences. Here is a question about the text above.
user assistant system think answer reason because therefore however although first second third finally
def main(): return 0  # code, numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, and punctuation: , . ; : ! ? ( ) [ ] { }
In the beginning there was a token, and the token was followed by another token, and so on, until the end.
Memory, speed and quality: measure each, compare with a baseline, and write the numbers down.
"""


def demo_tokenizer_dir() -> Path:
    """Directory of the bundled tokenizer files (``sala/assets``)."""
    return Path(str(resources.files("sala") / "assets"))


def build_demo_tokenizer(out_dir: str | Path) -> Path:
    """Rebuild the bundled tokenizer files into ``out_dir`` (deterministic; how ``sala/assets`` was made)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "</s>"}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": True, "add_eos_token": False,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "clean_up_tokenization_spaces": False,
        "model_max_length": 1048576, "chat_template": CHATML_TEMPLATE,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out


def copy_demo_tokenizer(directory: str | Path) -> None:
    """Copy the bundled tokenizer files into ``directory``."""
    src = demo_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, Path(directory) / name)


def make_demo_checkpoint(directory: str | Path, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Write a random official-format SALA checkpoint (``config.json``, safetensors, generation config) plus the
    demo tokenizer to ``directory``; returns it. ``overrides`` go to the preset config (e.g. ``vocab_size``)."""
    import torch

    from sala.model import SALAForCausalLM, preset as make_config

    config = make_config(preset, bos_token_id=1, eos_token_id=list(DEMO_EOS_IDS), pad_token_id=2, **overrides)
    if config.vocab_size < DEMO_VOCAB_SIZE:
        raise ValueError(f"preset {preset!r} has vocab_size {config.vocab_size} < the demo tokenizer's {DEMO_VOCAB_SIZE}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SALAForCausalLM(config)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, list(DEMO_EOS_IDS)
    model.generation_config.pad_token_id = 2
    out = Path(directory)
    with quiet_hf_progress():
        model.save_pretrained(out)
    copy_demo_tokenizer(out)
    return out


@contextlib.contextmanager
def quiet_hf_progress(quiet: bool = True) -> Iterator[None]:
    """Silence transformers' progress bars (shard writing, weight loading) inside the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
