"""Tiny random dense source checkpoints (Llama, Mistral, Qwen2, Qwen3 via transformers; MiniCPM written by hand)
plus a small BPE tokenizer trained on the built-in text, so nothing is downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from sala.convert.default_text import DEFAULT_TEXT

VOCAB = 320
DIMS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6)


def save_tokenizer(directory: Path) -> None:
    """Byte-level BPE with ``VOCAB`` entries trained on the built-in text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([DEFAULT_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random norm weights and biases, so copying a norm or bias wrongly changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=gen))


def hf_source(directory: Path, family: str, *, shard: str | None = None, seed: int = 0, **overrides) -> Path:
    """save_pretrained a random tiny ``family`` model (sharded when ``shard`` is a size like "40KB")."""
    import transformers as tf

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    cfg_name, model_name = classes[family]
    kwargs = {**DIMS, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, **overrides}
    torch.manual_seed(seed)
    model = getattr(tf, model_name)(getattr(tf, cfg_name)(**kwargs))
    _perturb(model, seed)
    model.save_pretrained(str(directory), max_shard_size=shard) if shard else model.save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory


def minicpm_source(directory: Path, *, seed: int = 0, tie: bool = True, shard: bool = False, **overrides) -> Path:
    """A MiniCPM checkpoint (remote-code format: Llama tensor names + muP keys) written by hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {**DIMS, **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**dims, tie_word_embeddings=False))
    _perturb(model, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight")
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMConfig", "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
        **dims, "hidden_act": "silu", "rope_theta": 10000.0, "rope_scaling": None, "scale_emb": 12,
        "scale_depth": 1.4, "dim_model_base": 16, "tie_word_embeddings": tie, "torch_dtype": "float32",
        "bos_token_id": 0, "eos_token_id": 1,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if shard:
        names = sorted(state)
        half = math.ceil(len(names) / 2)
        parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for file, keys in parts.items():
            save_file({k: state[k] for k in keys}, str(directory / file), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(directory)
    return directory
