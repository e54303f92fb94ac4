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


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf q/k row order (rotary pairs interleaved); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_source(path: Path, *, seed: int = 0, tie: bool = True, layers: int = 2, hidden: int = 48, heads: int = 3,
                kv_heads: int = 1, head_dim: int = 16, intermediate: int = 64, context: int = 1024,
                rope_theta: float = 100000.0, architecture: str = "llama") -> dict[str, torch.Tensor]:
    """Write a tiny Llama as llama.cpp would (F32 tensors, permuted q/k, gpt2-BPE tokenizer with ChatML template in
    the metadata) and return the reference HF state dict (tied: without lm_head) it must load back as."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = path.parent / f".{path.stem}_tokenizer"
    save_tokenizer(tok_dir)
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {t["content"] for t in spec["added_tokens"]}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokens), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=context,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, tie_word_embeddings=tie,
    ))
    _perturb(model, seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight")

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-llama-test")
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def put(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.float().numpy())

    put("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _llama_cpp_permute(state[p + "self_attn.q_proj.weight"], heads))
        put(f"blk.{i}.attn_k.weight", _llama_cpp_permute(state[p + "self_attn.k_proj.weight"], kv_heads))
        put(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    if not tie:
        put("output.weight", state["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state
